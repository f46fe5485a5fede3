"""LoRA DreamBooth (--lora_rank): only the adapters train, the files load with diffusers' load_lora_weights and in
kohya's format, infer.py uses them, and resume stays exact."""

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

import families
import infer
from test_lora_files import assert_diffusers_names, assert_kohya_names, older_layout
from test_resume import command
from test_train import scalars, train_args

LORA = ["--lora_rank", 4, "--lora_alpha", 8, "--learning_rate", 1e-2]


def image(model, out, *extra):
    infer.main([str(a) for a in ["--model", model, "--prompt", "a photo of sks dog", "--num_images_per_prompt", 1,
                                 "--num_inference_steps", 2, "--height", 64, "--width", 64, "--output_dir", out, *extra]])
    (png,) = out.glob("*.png")
    with Image.open(png) as img:
        return np.asarray(img)


def test_lora_trains_only_adapters_and_loads_everywhere(run, tiny_model, photos, priors, tmp_path, capsys):
    out = tmp_path / "run"
    run("train_dreambooth.py", *train_args(
        tiny_model, photos, out, *LORA, "--with_prior_preservation", "--class_dir", priors, "--class_prompt",
        "a photo of dog", "--num_class_images", 2, "--train_text_encoder", "--use_8bit_adam",
        "--gradient_accumulation_steps", 2, "--train_batch_size", 1, "--max_train_steps", 3, "--checkpointing_steps", 3,
        "--export_steps", 3, "--validation_prompt", "a dog", "--num_validation_images", 1,
        "--validation_inference_steps", 2))
    names = {p.name for p in out.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "run_config.json"} <= names
    assert not names & {"unet", "model_index.json"}
    assert (out / "export-3" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation" / "step-000003.png").is_file()

    # a checkpoint holds the adapters alone, in diffusers' format (the frozen base weights are the base model's)
    assert sorted(p.name for p in (out / "checkpoint-3").glob("*.safetensors")) == [
        "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"]
    trained = load_file(out / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    for component in ("unet", "text_encoder"):
        adapters = [v for k, v in trained.items() if k.startswith(component + ".") and ".up." in k]
        assert adapters and all(v.abs().sum() > 0 for v in adapters)  # "up" (B) starts at zero: these were trained

    base = image(tiny_model, tmp_path / "base")
    tuned = image(str(out), tmp_path / "lora")  # the run folder: base model from run_config.json, adapters on top
    assert not np.array_equal(base, tuned)
    assert np.array_equal(image(str(out), tmp_path / "zero", "--lora_scale", 0), base)
    fused = image(str(out), tmp_path / "fused", "--fuse_lora")  # W + BA in one matrix: the same up to rounding
    assert np.abs(fused.astype(int) - tuned).max() <= 2
    assert np.array_equal(image(str(out / "checkpoint-3"), tmp_path / "checkpoint"), tuned)
    kohya = out / "pytorch_lora_weights_kohya.safetensors"
    assert np.array_equal(image(tiny_model, tmp_path / "kohya", "--lora", kohya), tuned)
    assert_kohya_names(kohya, tiny_model, "sd", ["unet", "text_encoder"])  # the names ComfyUI and AUTOMATIC1111 map
    assert_diffusers_names(out / families.LORA_WEIGHTS, tiny_model, "sd", ["unet", "text_encoder"])

    # a run of an earlier version (text-encoder keys without text_model): export.py --kohya writes its kohya file again
    old = tmp_path / "old"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("checkpoint-*", "export-*", "logs", "validation"))
    older_layout(old)
    (old / kohya.name).unlink()
    proc = run("export.py", old, "--kohya", launch=False)
    assert f"wrote {old / kohya.name}" in proc.stdout
    again, ref = load_file(old / kohya.name), load_file(kohya)
    assert again.keys() == ref.keys() and all(torch.equal(again[k], ref[k]) for k in ref)
    capsys.readouterr()


def test_only_the_adapters_train(tiny_model, photos, tmp_path, make_accelerator):
    """The optimizer gets the parameters that require grad: with LoRA those are the adapters alone, so the base
    weights cannot move."""
    import train_dreambooth

    args = train_dreambooth.parse_args([str(a) for a in train_args(tiny_model, photos, tmp_path / "out", *LORA,
                                                                    "--train_text_encoder")])
    train_dreambooth.check_args(args)
    accelerator = make_accelerator()
    _, _, encoders, _ = train_dreambooth.load_models(args, accelerator, families.SD)
    unet = train_dreambooth.load_denoiser(args, accelerator, families.SD, encoders)
    for module in (unet, *encoders.values()):
        trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        assert all(p.dtype == torch.float32 for p in module.parameters() if p.requires_grad)


def test_adapter_file_is_a_small_fraction_of_the_unet(run, tiny_model, photos, tmp_path):
    out = tmp_path / "run"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, *LORA, "--max_train_steps", 1, "--report_to", "none"))
    lora = (out / "pytorch_lora_weights.safetensors").stat().st_size
    unet = sum(f.stat().st_size for f in (Path(tiny_model) / "unet").glob("*.safetensors"))
    assert lora < 0.1 * unet, f"LoRA rank 4 file: {lora:,} bytes, the tiny UNet's {unet:,}"


def test_lora_resume_is_bit_identical(run, tiny_model, photos, priors, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    args = [*LORA, "--max_train_steps", 4]
    run("train_dreambooth.py", *command(tiny_model, photos, priors, reference, *args), launch=False)
    shutil.copytree(reference, out)
    for path in out.iterdir():  # as if the run had died after checkpoint 2 (mid-epoch)
        if path.name not in ("checkpoint-2",):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run("train_dreambooth.py", *command(tiny_model, photos, priors, out, *args, "--resume_from_checkpoint", "latest"),
        launch=False)
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        ref, new = load_file(reference / name), load_file(out / name)
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref), name
    ref_logs, new_logs = scalars(reference / "logs"), scalars(out / "logs")
    assert new_logs["loss"] == {s: v for s, v in ref_logs["loss"].items() if s > 2}
