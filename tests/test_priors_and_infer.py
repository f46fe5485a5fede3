"""generate_priors.py and infer.py on the tiny model: files produced, determinism, top-up by index, metadata."""

import json
from pathlib import Path

import pytest
from PIL import Image

import dreambooth_utils as du
import generate_priors
import infer


def priors_argv(model, class_dir, n, *extra):
    return ["--model", model, "--class_prompt", "a photo of dog", "--class_dir", str(class_dir),
            "--num_class_images", str(n), "--num_inference_steps", "2", "--resolution", "64", *map(str, extra)]


def test_priors_are_named_by_index_recorded_and_topped_up_exactly(tiny_model, tmp_path):
    d = tmp_path / "priors"
    # batch size 1: a batched forward pass can round differently from a single one (see the note on issue 3)
    generate_priors.main(priors_argv(tiny_model, d, 4, "--seed", 3, "--sample_batch_size", 1))
    names = sorted(p.name for p in d.iterdir())
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "manifest.json"]
    original = {n: (d / n).read_bytes() for n in names if n.endswith(".png")}
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["config"]["class_prompt"] == "a photo of dog" and manifest["config"]["seed"] == 3
    assert manifest["config"]["pretrained_model_name_or_path"] == tiny_model and "diffusers" in manifest["versions"]

    # a killed run: one image gone, one temporary file left behind
    (d / "000002.png").unlink()
    (d / ".000001.png.tmp").write_bytes(b"half")
    assert du.missing_prior_indices(d, 4) == [2]
    generate_priors.main(priors_argv(tiny_model, d, 4, "--seed", 3, "--sample_batch_size", 1))
    assert {n: (d / n).read_bytes() for n in original} == original  # the same bytes, image 2 made again alone


def test_a_different_seed_gives_different_priors(tiny_model, tmp_path):
    generate_priors.main(priors_argv(tiny_model, tmp_path / "a", 1, "--seed", 0))
    generate_priors.main(priors_argv(tiny_model, tmp_path / "b", 1, "--seed", 1))
    assert (tmp_path / "a" / "000000.png").read_bytes() != (tmp_path / "b" / "000000.png").read_bytes()


def test_full_class_folder_generates_nothing(tiny_model, tmp_path, capsys):
    d = tmp_path / "priors"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "mine.png")
    generate_priors.main(priors_argv(tiny_model, d, 1))
    assert sorted(p.name for p in d.iterdir()) == ["mine.png"]
    assert "nothing to do" in capsys.readouterr().out


def test_priors_refuse_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="error: model not found"):
        generate_priors.main(priors_argv(str(tmp_path / "nope"), tmp_path / "d", 1))
    assert not (tmp_path / "d").exists()


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
    assert settings["image_seed"] == du.image_seed(5, 1)
    assert parameters.splitlines() == [
        "a photo of sks dog", "Negative prompt: blurry",
        f"Steps: 2, Sampler: PNDMScheduler, CFG scale: 7.5, Seed: {du.image_seed(5, 1)}, Size: 64x64, Model: tiny-sd"]


@pytest.mark.parametrize("scheduler", sorted(du.SCHEDULERS))
def test_every_scheduler_runs_from_the_models_config(tiny_model_v, tmp_path, scheduler):
    infer.main(infer_argv(tiny_model_v, tmp_path, "--scheduler", scheduler, "--num_images_per_prompt", 1))
    (png,) = tmp_path.glob("*.png")
    with Image.open(png) as img:
        assert f"Sampler: {scheduler}," in img.text["parameters"]
    pipe = du.load_pipeline(tiny_model_v)
    du.set_scheduler(pipe, scheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # carried over from the model's config


def test_infer_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(SystemExit, match="has no unet, vae, text_encoder, tokenizer, scheduler subfolder"):
        infer.main(infer_argv(str(tmp_path / "model"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()
