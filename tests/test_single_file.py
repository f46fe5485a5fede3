"""Single-file checkpoints in the original (LDM / SGM) layout, proven by a real loader: diffusers' from_single_file,
which reads the layout the web UIs read, loads the file back offline (the model folder as its config) to the same
weights and the same image, for SD (epsilon and v-prediction) and SDXL."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import families
import export
import singlefile
from test_train import train_args


def image(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def same_model(folder, single_file, atol=1e-5):
    """The pipeline from the folder and the one from the single file (the folder giving the configs): equal weights
    (after the file's precision), and images within `atol`; returns the largest pixel difference."""
    family = families.read_model(str(folder))[0]
    cls, kw = family.pipeline_class(), dict(family.pipeline_kwargs)
    a = cls.from_pretrained(folder, **kw)
    b = cls.from_single_file(str(single_file), config=str(folder), local_files_only=True, **kw)
    with safe_open(single_file, "pt") as f:
        dtype = f.get_tensor(next(iter(f.keys()))).dtype  # the file's precision
    for name in ["unet", "vae", *(n for n, _ in family.text_encoders)]:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k].to(dtype).float(), sb[k].float()) for k in sa), name
    difference = np.abs(image(a) - image(b)).max()
    assert difference <= atol, difference
    return difference


@pytest.mark.parametrize("model, architecture", [("tiny_model", "stable-diffusion-v1"),
                                                  ("tiny_model_v", "stable-diffusion-v1"),
                                                  ("tiny_sdxl", "stable-diffusion-xl-v1-base")])
def test_a_model_round_trips_through_from_single_file(request, tmp_path, model, architecture):
    folder = request.getfixturevalue(model)
    path = singlefile.save_single_file(folder, tmp_path / "model.safetensors", torch.float32, {"instance_prompt": "sks"})
    same_model(folder, path)
    with safe_open(path, "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["modelspec.architecture"] == architecture and meta["dreambooth.instance_prompt"] == "sks"
    assert ("v_pred" in keys) == (model == "tiny_model_v") and meta["modelspec.prediction_type"] == (
        "v" if model == "tiny_model_v" else "epsilon")
    prefix = "conditioner.embedders." if model == "tiny_sdxl" else "cond_stage_model.transformer.text_model."
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys) and any(k.startswith(prefix) for k in keys)


def test_fp16_file_is_half_the_size_and_close(tiny_sdxl, tmp_path):
    full = singlefile.save_single_file(tiny_sdxl, tmp_path / "fp32.safetensors", torch.float32)
    half = singlefile.save_single_file(tiny_sdxl, tmp_path / "fp16.safetensors", torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    same_model(tiny_sdxl, half, atol=0.05)  # weights rounded to fp16: pixels within 5% on the tiny random model


def test_training_writes_single_files_of_the_pipeline_and_its_exports(run, tiny_model, photos, tmp_path):
    out = tmp_path / "sks-dog"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, "--max_train_steps", 2, "--export_steps", 2,
                                           "--save_single_file", "--export_precision", "fp32", "--report_to", "none"))
    same_model(out, out / "sks-dog.safetensors")
    same_model(out / "export-2", out / "export-2" / "sks-dog-step-2.safetensors")
    with safe_open(out / "sks-dog.safetensors", "pt") as f:
        settings = json.loads(f.metadata()["dreambooth.settings"])
    assert settings["optimizer_steps"] == 2 and settings["instance_prompt"] == "a photo of sks dog"
    # infer.py names the single file's hash in A1111's metadata, as the web UIs do
    import hashlib

    import infer
    from PIL import Image

    infer.main(["--model", str(out), "--prompt", "a photo of sks dog", "--num_images_per_prompt", "1",
                "--num_inference_steps", "2", "--height", "64", "--width", "64", "--output_dir", str(tmp_path / "images")])
    (png,) = (tmp_path / "images").glob("*.png")
    expected = hashlib.sha256((out / "sks-dog.safetensors").read_bytes()).hexdigest()[:10]
    assert f"Model hash: {expected}, Model: sks-dog," in Image.open(png).text["parameters"]
    # the converter from the shell writes the same file
    from safetensors.torch import load_file

    written = load_file(out / "sks-dog.safetensors")
    export.main([str(out / "export-2"), "--single_file", "--precision", "fp32"])
    again = load_file(out / "export-2" / "sks-dog-step-2.safetensors")
    assert written.keys() == again.keys() and all(torch.equal(written[k], again[k]) for k in written)  # final = step 2


def test_training_and_sampling_from_a_single_file(run, tiny_model, photos, tmp_path):
    """What many web-UI users have is one file: it trains (converted once, through diffusers' from_single_file, into
    the cache) to the same weights as the diffusers folder it came from, and infer.py samples it."""
    from test_train import weights

    single = singlefile.save_single_file(tiny_model, tmp_path / "tiny.safetensors", torch.float32)
    common = ["--max_train_steps", 2, "--report_to", "none", "--train_text_encoder"]
    run("train_dreambooth.py", *train_args(tiny_model, photos, tmp_path / "from-folder", *common))
    proc = run("train_dreambooth.py", *train_args(single, photos, tmp_path / "from-file", *common,
                                                  "--single_file_config", tiny_model))
    assert "converting tiny.safetensors (StableDiffusionPipeline) to diffusers' layout once" in proc.stderr
    for component in ("unet", "text_encoder"):
        a, b = weights(tmp_path / "from-folder", component), weights(tmp_path / "from-file", component)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    argv = ["--prompt", "a photo of sks dog", "--num_images_per_prompt", 1, "--num_inference_steps", 2,
            "--height", 64, "--width", 64]
    proc = run("infer.py", "--model", single, "--single_file_config", tiny_model, *argv, "--output_dir",
               tmp_path / "file-images", launch=False)
    assert "converting" not in proc.stderr  # the conversion is cached
    run("infer.py", "--model", tiny_model, *argv, "--output_dir", tmp_path / "folder-images", launch=False)
    (a,), (b,) = (list((tmp_path / d).glob("*.png")) for d in ("file-images", "folder-images"))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
