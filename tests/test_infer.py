"""infer.py on the tiny model: files produced, determinism, settings inside each image, every scheduler."""

import json

import numpy as np
import pytest
from PIL import Image

import loading
import imagedata
import infer


def infer_argv(model, out, *extra):
    return ["--model", model, "--prompt", "a photo of sks dog", "--num_images_per_prompt", "2",
            "--num_inference_steps", "2", "--height", "64", "--width", "64", "--output_dir", str(out), *map(str, extra)]


def test_infer_is_deterministic_and_carries_its_settings(tiny_model, tmp_path):
    infer.main(infer_argv(tiny_model, tmp_path / "a", "--seed", 5, "--prompt", "a dog", "--negative_prompt", "blurry"))
    infer.main(infer_argv(tiny_model, tmp_path / "b", "--seed", 5, "--prompt", "a dog", "--negative_prompt", "blurry"))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["p00-a_photo_of_sks_dog-i000-seed5.png", "p00-a_photo_of_sks_dog-i001-seed5.png",
                     "p01-a_dog-i000-seed5.png", "p01-a_dog-i001-seed5.png"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "a" / files[1]).read_bytes()

    with Image.open(tmp_path / "a" / files[1]) as img:
        assert img.size == (64, 64)
        settings = json.loads(img.text["dreambooth"])
        parameters = img.text["parameters"]
    assert settings["prompt"] == "a photo of sks dog" and settings["image_index"] == 1 and settings["seed"] == 5
    assert settings["image_seed"] == imagedata.image_seed(5, 1)
    assert parameters.splitlines() == [
        "a photo of sks dog", "Negative prompt: blurry",
        "Steps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 5, Size: 64x64, Model: tiny-sd, Image index: 1"]


A1111_NAMES = {"ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a", "dpm++_2m": "DPM++ 2M",
               "dpm++_2m_karras": "DPM++ 2M Karras", "unipc": "UniPC",  # as AUTOMATIC1111 writes them
               "flow_euler": "Euler"}  # and Forge for FLUX


@pytest.mark.parametrize("scheduler", sorted(loading.SCHEDULERS))
def test_every_scheduler_runs_from_the_models_config(tiny_model_v, tiny_flux, tmp_path, scheduler):
    """The noise-prediction samplers on a v-prediction SD model (its prediction type carries over), the flow ones on
    FLUX.1 (its shift carries over)."""
    model = tiny_flux if scheduler in loading.FLOW_SCHEDULERS else tiny_model_v
    infer.main(infer_argv(model, tmp_path, "--scheduler", scheduler, "--num_images_per_prompt", 1))
    (png,) = tmp_path.glob("*.png")
    with Image.open(png) as img:
        assert f"Sampler: {A1111_NAMES[scheduler]}, CFG scale" in img.text["parameters"]
        assert json.loads(img.text["dreambooth"])["scheduler"] == scheduler
    pipe = loading.load_pipeline(model)
    loading.set_scheduler(pipe, scheduler)
    if model == tiny_flux:
        assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.max_shift == 1.15
    else:
        assert pipe.scheduler.config.prediction_type == "v_prediction"  # carried over from the model's config


def test_image_j_alone_is_the_same_bytes_and_the_metadata_round_trips(tiny_model, tmp_path):
    full, alone = tmp_path / "full", tmp_path / "alone"
    common = ["--num_images_per_prompt", 5, "--batch_size", 2, "--seed", 7, "--grid"]
    infer.main(infer_argv(tiny_model, full, *common))
    infer.main(infer_argv(tiny_model, alone, *common, "--image_index", 3))
    (one,) = [p for p in alone.glob("*.png") if "grid" not in p.name]
    assert one.name == "p00-a_photo_of_sks_dog-i003-seed7.png"
    assert one.read_bytes() == (full / one.name).read_bytes()
    with Image.open(full / "p00-a_photo_of_sks_dog-grid-seed7.png") as sheet:
        assert sheet.size == (4 * 64, 2 * 64)
    with Image.open(one) as img:
        settings = json.loads(img.text["dreambooth"])
    assert settings == {"prompt": "a photo of sks dog", "negative_prompt": None, "seed": 7, "image_index": 3,
                        "image_seed": imagedata.image_seed(7, 3), "num_images_per_prompt": 5, "batch_size": 2,
                        "num_inference_steps": 2, "guidance_scale": 7.5, "sampler": "PLMS", "scheduler": "PNDMScheduler", "width": 64,
                        "height": 64, "model": tiny_model, "dtype": "fp32"}


def test_prompts_file_and_a_long_prompt(tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    long = "a photo of sks dog " + "x" * 100 + " on the moon"
    prompts.write_text(f"a dog\n\n{long}\n")
    infer.main(infer_argv(tiny_model, tmp_path / "out", "--prompts_file", prompts, "--num_images_per_prompt", 1,
                          "--negative_prompt", "blurry " + "y" * 100 + " ugly"))
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n.split("-")[0] for n in names] == ["p00", "p01", "p02"]  # --prompt first, then the file's lines
    err = capsys.readouterr().err
    assert "prompt 2 is longer than the text encoder's 77 tokens; this part is cut: '" in err
    assert err.split("prompt 2 is longer")[1].split("this part is cut: '")[1].split("'\n")[0].endswith("on the moon")
    assert "note: the negative prompt is longer than the text encoder's 77 tokens; this part is cut: '" in err
    assert "indexing errors" not in err  # transformers' warning: the pipeline truncates, nothing is mis-indexed


@pytest.mark.parametrize("flags", [["--train_text_encoder"], ["--pre_compute_text_embeddings"]],
                         ids=["text-encoder-trained", "embeddings-pre-computed"])
def test_a_training_checkpoint_loads_on_its_recorded_base_model(run, tiny_model, photos, tmp_path, flags):
    """checkpoint-2 of a 2-step run holds the final weights: its images are the final pipeline's, pixel for pixel
    (the files differ only in the model name they carry). With pre-computed embeddings the checkpoint holds no text
    encoder, and the base model's is used."""
    from test_train import train_args

    out = tmp_path / "run"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, *flags, "--max_train_steps", 2,
                                           "--checkpointing_steps", 2, "--report_to", "none"))
    infer.main(infer_argv(str(out), tmp_path / "final"))
    infer.main(infer_argv(str(out / "checkpoint-2"), tmp_path / "checkpoint"))
    final = sorted((tmp_path / "final").glob("*.png"))
    assert len(final) == 2
    for path in final:
        assert np.array_equal(pixels(path), pixels(tmp_path / "checkpoint" / path.name))
    infer.main(infer_argv(tiny_model, tmp_path / "base"))
    assert not np.array_equal(pixels(tmp_path / "base" / final[0].name), pixels(final[0]))  # the trained weights loaded


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img)


def refuse(*argv):
    with pytest.raises(SystemExit) as e:
        infer.main([str(a) for a in argv])
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_input(tiny_model, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "model").mkdir()
    assert refuse(*infer_argv(str(tmp_path / "model"), out)) == (
        f"error: {tmp_path / 'model'} is neither a diffusers pipeline folder (no model_index.json) nor a training checkpoint")
    assert refuse(*infer_argv(str(tmp_path / "nope"), out)) == f"error: model folder not found: {tmp_path / 'nope'}"
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    assert refuse(*infer_argv(str(tmp_path / "run"), out)) == (
        f"error: {tmp_path / 'run'} holds no pipeline yet (the run has not finished); its newest checkpoint is "
        f"{tmp_path / 'run' / 'checkpoint-3'}")
    assert refuse("--model", tiny_model) == "error: give --prompt (repeatable) or --prompts_file"
    (tmp_path / "empty.txt").write_text("\n\n")
    assert refuse("--model", tiny_model, "--prompts_file", tmp_path / "empty.txt") == (
        f"error: prompts file {tmp_path / 'empty.txt'} has no prompts")
    assert refuse("--model", tiny_model, "--prompts_file", tmp_path / "nope.txt").startswith(
        f"error: cannot read prompts file {tmp_path / 'nope.txt'}")
    assert refuse(*infer_argv(tiny_model, out, "--image_index", 2)) == (
        "error: --image_index must be between 0 and --num_images_per_prompt - 1 (1)")
    assert refuse(*infer_argv(tiny_model, out, "--cpu_offload", "--device", "cpu")).startswith(
        "error: --cpu_offload needs a CUDA GPU")
    assert not out.exists()


@pytest.mark.slow
def test_compile_gives_the_same_images_up_to_rounding(tiny_model, tmp_path):
    """torch.compile of the UNet (about 40 s of compiling on a CPU, hence slow): fused kernels round differently."""
    infer.main(infer_argv(tiny_model, tmp_path / "eager", "--num_images_per_prompt", 1))
    infer.main(infer_argv(tiny_model, tmp_path / "compiled", "--num_images_per_prompt", 1, "--compile"))
    (eager,) = (tmp_path / "eager").glob("*.png")
    diff = np.abs(pixels(eager).astype(int) - pixels(tmp_path / "compiled" / eager.name).astype(int))
    assert diff.max() <= 2


def unet_lora(model, folder):
    """A LoRA file of random adapters on the UNet's attention (to_q, to_k, to_v) alone, in diffusers' format."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian"))
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))


def test_a_lora_of_other_layer_sizes_is_one_line(tiny_model, tiny_sdxl, tmp_path, capsys):
    unet_lora(tiny_model, tmp_path / "lora")
    with pytest.raises(SystemExit) as e:
        infer.main(infer_argv(tiny_sdxl, tmp_path / "out", "--lora", tmp_path / "lora"))
    assert str(e.value).startswith(f"error: the LoRA {tmp_path / 'lora'} does not fit {tiny_sdxl}: its adapters are "
                                   "shaped for another model's layers (") and str(e.value).endswith(
        "); a LoRA goes on a model of the family and size it was trained on")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_lora_without_text_encoder_adapters_loads_without_diffusers_warning(run, tiny_model, tmp_path):
    """Most LoRAs (the demo's) adapt the UNet alone: diffusers' "No LoRA keys associated to CLIPTextModel ... open an
    issue" is expected there, so infer.py keeps it from the user; the adapters still change the image."""
    unet_lora(tiny_model, tmp_path / "lora")
    proc = run("infer.py", *infer_argv(tiny_model, tmp_path / "with", "--lora", tmp_path / "lora",
                                       "--num_images_per_prompt", 1), launch=False)  # diffusers' logging as a user has it
    assert "No LoRA keys" not in proc.stderr
    infer.main(infer_argv(tiny_model, tmp_path / "without", "--num_images_per_prompt", 1))
    (a,), (b,) = (tmp_path / "with").glob("*.png"), (tmp_path / "without").glob("*.png")
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
