"""Training options chosen before the loop, so the step reads the same: the optimizer (AdamW, 8-bit AdamW, Prodigy),
the exponential moving average of the weights, DoRA adapters and training the text encoder for part of the run.
Each checked against what it promises, on the tiny models."""

import json
import re
import shutil

import pytest
import torch

from test_lora_files import assert_diffusers_names
from test_resume import assert_same_run
from test_train import train_args, weights

EMA = ["--use_ema", "--ema_decay", 0.5, "--train_batch_size", 1, "--max_train_steps", 3, "--checkpointing_steps", 1]


def test_ema_is_the_hand_computed_average_of_the_raw_weights(run, tiny_model, photos, tmp_path):
    """The result of a --use_ema run is the average of the raw weights that each step's checkpoint holds: EMAModel's
    decay min(ema_decay, (1 + t) / (10 + t)) with t = step - 1 (0, then 2/11, then 3/12 here)."""
    out = tmp_path / "run"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, *EMA, "--save_raw_weights", "--report_to", "none"))
    average = weights(tiny_model, "unet")
    for step in (1, 2, 3):
        decay = min(0.5, step / (9 + step)) if step > 1 else 0.0
        raw = weights(out / f"checkpoint-{step}", "unet")
        average = {k: decay * average[k] + (1 - decay) * raw[k] for k in average}
    result = weights(out, "unet")
    assert all(torch.allclose(result[k], average[k], atol=1e-6) for k in average)
    assert not all(torch.equal(result[k], raw[k]) for k in raw)  # the average, not the last step
    kept = weights(out / "raw", "unet")  # --save_raw_weights: the last step's raw weights beside it
    assert all(torch.equal(kept[k], raw[k]) for k in raw)


@pytest.mark.parametrize("options", [["--use_ema", "--ema_decay", 0.9, "--lora_rank", 4, "--learning_rate", 1e-3],
                                     ["--optimizer", "prodigy"], ["--lora_rank", 4, "--use_dora", "--learning_rate", 1e-3],
                                     ["--train_text_encoder_frac", 0.75], ["--train_text_encoder_frac", 0.25]],
                         ids=["ema-lora", "prodigy", "dora", "text-encoder-switch-after-resume",
                              "text-encoder-switch-before-resume"])
def test_the_option_resumes_bit_identically(run, tiny_model, photos, tmp_path, options):
    common = [*options, "--train_batch_size", 1, "--max_train_steps", 4, "--checkpointing_steps", 2,
              "--train_text_encoder"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    run("train_dreambooth.py", *train_args(tiny_model, photos, reference, *common), launch=False)
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, *common, "--resume_from_checkpoint", "latest"),
        launch=False)
    if "--lora_rank" in options:
        from safetensors.torch import load_file

        ref, new = (load_file(f / "pytorch_lora_weights.safetensors") for f in (reference, out))
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    else:
        assert_same_run(reference, out, from_step=2)
    record = json.loads((reference / "run_config.json").read_text())["config"]
    assert record["optimizer"] == ("prodigy" if "prodigy" in options else "adamw")


@pytest.mark.parametrize("flags, optimizer, learning_rate", [
    ([], "AdamW", 5e-6), (["--use_8bit_adam"], "AdamW8bit", 5e-6), (["--optimizer", "adamw8bit"], "AdamW8bit", 5e-6),
    (["--optimizer", "prodigy"], "Prodigy", 1.0),  # Prodigy's learning rate multiplies the step size it estimates
    (["--optimizer", "prodigy", "--learning_rate", 0.5], "Prodigy", 0.5)])
def test_the_optimizer_and_its_default_learning_rate(tiny_model, photos, tmp_path, flags, optimizer, learning_rate):
    import train_dreambooth

    argv = train_args(tiny_model, photos, tmp_path / "o")
    argv[argv.index("--learning_rate"):argv.index("--learning_rate") + 2] = []  # train_args gives one
    args = train_dreambooth.parse_args([str(a) for a in argv + flags])
    train_dreambooth.check_args(args)
    made = train_dreambooth.make_optimizer(args, [torch.nn.Parameter(torch.zeros(4))])
    assert type(made).__name__ == optimizer and made.param_groups[0]["lr"] == learning_rate
    assert args.use_8bit_adam == (optimizer == "AdamW8bit")


def test_dora_adapters_load_in_diffusers_whole(run, tiny_sdxl, photos, tmp_path):
    """SDXL with both text encoders: every DoRA magnitude and LoRA matrix of the file reaches the pipeline through
    diffusers' load_lora_weights (transformers' loader skips a text encoder's magnitude under peft's usual key), the
    image changes, and no kohya copy is written (the web UIs' DoRA readers disagree with peft on the magnitude's axis)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    out = tmp_path / "dora"
    proc = run("train_dreambooth.py", *train_args(tiny_sdxl, photos, out, "--lora_rank", 4, "--use_dora",
               "--train_text_encoder", "--learning_rate", 1e-2, "--max_train_steps", 3, "--report_to", "none"),
               launch=False)
    assert "no kohya-format copy" in proc.stderr and not (out / "pytorch_lora_weights_kohya.safetensors").exists()
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert_diffusers_names(out / "pytorch_lora_weights.safetensors", tiny_sdxl, "sdxl",
                           ["unet", "text_encoder", "text_encoder_2"], dora=True)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    image = lambda: pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images[0]
    base = image()
    pipe.load_lora_weights(out)
    loaded = {f"{name}.{k}": v for name in ("unet", "text_encoder", "text_encoder_2")
              for k, v in getattr(pipe, name).named_parameters() if "lora_" in k}

    def same_name(key):  # the file's names (diffusers' format) and the pipeline's (peft's) on one spelling
        key = re.sub(r"\.(lora\.down|lora_linear_layer\.down|lora_A\.default_0)\.weight$", ".A", key.replace("text_model.", ""))
        key = re.sub(r"\.(lora\.up|lora_linear_layer\.up|lora_B\.default_0)\.weight$", ".B", key)
        return re.sub(r"\.lora_magnitude_vector(\.default_0)?(\.weight)?$", ".M", key)
    saved = {same_name(k): v for k, v in saved.items()}
    assert saved.keys() == {same_name(k) for k in loaded}
    assert all(torch.equal(v.detach(), saved[same_name(k)]) for k, v in loaded.items())
    assert abs(image() - base).max() > 1e-3


@pytest.mark.parametrize("family, options", [("sd", ["--learning_rate", 1e-3]),
                                             ("sdxl", ["--lora_rank", 4, "--learning_rate", 1e-2])],
                         ids=["sd-full", "sdxl-lora"])
def test_the_text_encoder_stops_changing_after_its_fraction(run, tiny_model, tiny_sdxl, photos, tmp_path, family, options):
    """--train_text_encoder_frac 0.5 of 4 steps: the text encoders (or their adapters) change in steps 1 and 2 and not
    after, although AdamW's momentum and weight decay would move them on zero gradients; the UNet keeps changing.
    Two processes: DDP does not wait for the gradients that stop coming."""
    from safetensors.torch import load_file

    model, encoders = (tiny_model, ["text_encoder"]) if family == "sd" else (tiny_sdxl, ["text_encoder", "text_encoder_2"])
    out = tmp_path / "run"
    proc = run("train_dreambooth.py", *train_args(model, photos, out, *options, "--train_text_encoder",
               "--train_text_encoder_frac", 0.5, "--train_batch_size", 1, "--max_train_steps", 4,
               "--checkpointing_steps", 1, "--adam_weight_decay", 0.1, "--report_to", "none"),
               launch=["--multi_gpu", "--num_processes", 2], env={"ACCELERATE_USE_CPU": "true"})
    assert "text encoder(s) frozen after step 2" in proc.stdout

    def state(step, name):  # the trained weights, or the adapters, of one checkpoint
        if "--lora_rank" in options:
            return {k: v for k, v in load_file(out / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors").items()
                    if k.startswith(f"{name}.")}
        return weights(out / f"checkpoint-{step}", name)

    def same(a, b):
        assert a and a.keys() == b.keys()
        return all(torch.equal(a[k], b[k]) for k in a)
    for name in encoders:
        assert not same(state(1, name), state(2, name))  # trains in step 2
        assert same(state(2, name), state(3, name)) and same(state(3, name), state(4, name))  # and not after
    assert not same(state(3, "unet"), state(4, "unet"))
    assert json.loads((out / "run_config.json").read_text())["config"]["text_encoder_steps"] == 2
