"""infer.py on the tiny model: files produced, determinism, settings inside each image, every scheduler."""

import json

import pytest
from PIL import Image

import dreambooth_utils as du
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
