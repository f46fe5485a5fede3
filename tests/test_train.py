"""train_dreambooth.py run for real through `accelerate launch` on a tiny model: what it saves, what changed and what
did not, what it logged, and what it recorded about itself."""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file


def weights(folder, component):
    state = {}
    for f in sorted(Path(folder, component).glob("*.safetensors")):
        state.update(load_file(f))
    assert state, f"no safetensors in {folder}/{component}"
    return state


def changed_fraction(base, tuned):
    assert base.keys() == tuned.keys()
    return sum(not torch.equal(base[k], tuned[k]) for k in base) / len(base)


def generates(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(Path(logdir).rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events under {logdir}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def train_args(model, photos, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--instance_dir", photos, "--instance_prompt", "a photo of sks dog",
            "--output_dir", out, "--resolution", 64, "--train_batch_size", 2, "--learning_rate", 1e-4,
            "--lr_warmup_steps", 0, "--seed", 0, *extra]


def test_prior_preservation_with_text_encoder_8bit_adam_and_accumulation(run, tiny_model, photos, tmp_path):
    priors, out = tmp_path / "priors", tmp_path / "out"
    run("generate_priors.py", "--model", tiny_model, "--class_prompt", "a photo of dog", "--class_dir", priors,
        "--num_class_images", 3, "--num_inference_steps", 2, "--resolution", 64, launch=False)
    proc = run("train_dreambooth.py", *train_args(
        tiny_model, photos, out, "--with_prior_preservation", "--class_dir", priors, "--class_prompt", "a photo of dog",
        "--num_class_images", 3, "--prior_loss_weight", 0.5, "--train_text_encoder", "--use_8bit_adam",
        "--gradient_accumulation_steps", 2, "--max_train_steps", 3, "--snr_gamma", 5, "--offset_noise"))
    assert "4 instance images, 3 class images" in proc.stdout
    assert "global batch 4 (2 per device x 2 accumulation x 1)" in proc.stdout

    generates(out)
    assert changed_fraction(weights(tiny_model, "unet"), weights(out, "unet")) > 0.9
    assert changed_fraction(weights(tiny_model, "text_encoder"), weights(out, "text_encoder")) > 0.5
    assert changed_fraction(weights(tiny_model, "vae"), weights(out, "vae")) == 0  # frozen: bit-identical
    assert all(t.dtype == torch.float32 for t in weights(out, "unet").values())

    record = json.loads((out / "run_config.json").read_text())
    assert record["config"]["prior_loss_weight"] == 0.5 and record["config"]["total_optimizer_steps"] == 3
    assert record["config"]["num_class_images_used"] == 3 and record["config"]["use_8bit_adam"] is True
    assert {"torch", "diffusers", "transformers", "accelerate", "bitsandbytes"} <= record["versions"].keys()
    assert "train_dreambooth.py" in record["command"] and "--with_prior_preservation" in record["command"]
    code = sorted(p.name for p in (out / "code").iterdir())  # the code as it ran: the script and the suite's modules
    assert code == ["cli.py", "export.py", "families.py", "generate_priors.py", "imagedata.py", "loading.py",
                    "model_calls.py", "objectives.py", "runs.py", "singlefile.py", "train_dreambooth.py"]
    for name in code:
        assert (out / "code" / name).read_text() == (Path(__file__).parent.parent / name).read_text()

    logged = scalars(out / "logs")
    assert sorted(logged["loss"]) == [1, 2, 3]
    for step in (1, 2, 3):  # the logged loss is the instance loss plus the weighted prior loss
        expected = logged["instance_loss"][step] + 0.5 * logged["prior_loss"][step]
        assert abs(logged["loss"][step] - expected) < 1e-5 * max(1.0, expected)
        assert logged["prior_loss"][step] > 0


def test_v_prediction_fp16_mixed_precision_and_generated_class_images(run, tiny_model_v, photos, tmp_path):
    priors, out = tmp_path / "priors", tmp_path / "out"
    priors.mkdir()
    Image.open(Path(photos) / "photo_0.png").save(priors / "my_own_dog.png")  # a user-supplied class image counts
    proc = run("train_dreambooth.py", *train_args(
        tiny_model_v, photos, out, "--with_prior_preservation", "--class_dir", priors, "--class_prompt", "a photo of dog",
        "--num_class_images", 2, "--train_text_encoder", "--mixed_precision", "fp16", "--gradient_checkpointing",
        "--random_flip", "--dataloader_num_workers", 1, "--max_train_steps", 2))
    assert "generating 1 class images" in proc.stdout
    assert sorted(p.name for p in priors.iterdir()) == ["000000.png", "my_own_dog.png"]
    with Image.open(priors / "000000.png") as img:
        assert img.size == (64, 64)

    generates(out)
    # trainable weights stay fp32 under fp16 mixed precision, and are what gets saved
    for component in ("unet", "text_encoder"):
        tuned = weights(out, component)
        assert all(t.dtype == torch.float32 for t in tuned.values())
        assert changed_fraction(weights(tiny_model_v, component), tuned) > 0.5
    record = json.loads((out / "run_config.json").read_text())["config"]
    assert record["prediction_type"] == "v_prediction" and record["mixed_precision_resolved"] == "fp16"


def test_unet_only_from_a_local_imagefolder_dataset(run, tiny_model, photos, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    rows = []
    for i, p in enumerate(sorted(Path(photos).glob("*.png"))):
        Image.open(p).save(data / p.name)
        rows.append(json.dumps({"file_name": p.name, "text": f"a photo of sks dog, view {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    args = train_args(tiny_model, photos, out, "--max_train_steps", 2, "--mixed_precision", "bf16",
                      "--report_to", "none", "--caption_column", "text", "--dataset_name", data)
    args[args.index("--instance_dir"):args.index("--instance_dir") + 2] = []
    proc = run("train_dreambooth.py", *args)
    assert "4 instance images, 0 class images" in proc.stdout

    generates(out)
    assert changed_fraction(weights(tiny_model, "unet"), weights(out, "unet")) > 0.9
    assert changed_fraction(weights(tiny_model, "text_encoder"), weights(out, "text_encoder")) == 0
    assert changed_fraction(weights(tiny_model, "vae"), weights(out, "vae")) == 0
    assert not (out / "logs").exists()


def test_two_processes_train_unet_and_text_encoder_with_accumulation(run, tiny_model, photos, tmp_path):
    # ACCELERATE_USE_CPU joins two CPU processes with gloo; without it each process would silently run alone, so the
    # test checks that the script saw both.
    out = tmp_path / "out"
    proc = run("train_dreambooth.py", *train_args(tiny_model, photos, out, "--train_text_encoder",
                                                  "--gradient_accumulation_steps", 2, "--max_train_steps", 2,
                                                  "--train_batch_size", 1),
               launch=["--multi_gpu", "--num_processes", 2], env={"ACCELERATE_USE_CPU": "true"})
    assert "2 process(es), global batch 4 (1 per device x 2 accumulation x 2)" in proc.stdout
    assert json.loads((out / "run_config.json").read_text())["config"]["num_processes"] == 2
    generates(out)
    assert changed_fraction(weights(tiny_model, "text_encoder"), weights(out, "text_encoder")) > 0.5
