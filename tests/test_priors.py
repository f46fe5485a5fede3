"""generate_priors.py: the same bytes for any number of processes and for a top-up, images that record what made
them (so the folder refuses other settings and holds nothing but images), and train_dreambooth.py topping a folder up
with the same code."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import generate_priors
from test_train import train_args

ONE, TWO = ["--num_processes", 1], ["--multi_gpu", "--num_processes", 2]
CPU = {"ACCELERATE_USE_CPU": "true"}  # joins two CPU processes with gloo; without it each would run alone


def priors_argv(model, class_dir, n, *extra):
    return ["--model", model, "--class_prompt", "a photo of dog", "--class_dir", str(class_dir),
            "--num_class_images", str(n), "--num_inference_steps", "2", "--resolution", "64", *map(str, extra)]


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def recorded(path):
    """What a generated class image says made it."""
    with Image.open(path) as image:
        return json.loads(image.text[generate_priors.PRIOR_TEXT])


def test_one_and_two_processes_write_the_same_bytes(run, tiny_model, tmp_path):
    # 5 images in batches of 3: process 0 takes batch 0 (images 0-2), process 1 batch 1 (3-4 and one discarded)
    one, two = tmp_path / "one", tmp_path / "two"
    run("generate_priors.py", *priors_argv(tiny_model, one, 5, "--sample_batch_size", 3), launch=ONE)
    run("generate_priors.py", *priors_argv(tiny_model, two, 5, "--sample_batch_size", 3), launch=TWO, env=CPU)
    assert sorted(p.name for p in two.iterdir()) == [generate_priors.prior_image_name(i) for i in range(5)]  # images only
    assert pngs(one) == pngs(two)


def test_batch_size_changes_rounding_only(tiny_model, tmp_path):
    """Each image has its own generator, so batch 1 and batch 3 make the same images; a batched forward pass rounds
    differently, which moves a few pixel values by one level (the README says so)."""
    for b in (1, 3):
        generate_priors.main(priors_argv(tiny_model, tmp_path / str(b), 6, "--sample_batch_size", b))
    for name in pngs(tmp_path / "1"):
        a, c = (np.asarray(Image.open(tmp_path / b / name), dtype=int) for b in ("1", "3"))
        assert np.abs(a - c).max() <= 1 and (a != c).mean() < 1e-3, name


def test_top_up_makes_exactly_the_missing_files(tiny_model, tmp_path):
    d = tmp_path / "priors"
    generate_priors.main(priors_argv(tiny_model, d, 5, "--seed", 3, "--sample_batch_size", 3))
    original = pngs(d)
    made = recorded(d / "000000.png")
    assert made["settings"]["class_prompt"] == "a photo of dog" and made["settings"]["seed"] == 3
    assert made["settings"]["unet_sha256"] == generate_priors.denoiser_fingerprint(tiny_model)
    assert made["settings"]["pretrained_model_name_or_path"] == tiny_model and "diffusers" in made["versions"]

    # a killed run: two images gone (one in each batch), a temporary file left behind that must not count
    (d / "000001.png").unlink()
    (d / "000004.png").unlink()
    (d / ".000002.png.tmp").write_bytes(b"half")
    assert generate_priors.missing_prior_indices(d, 5) == [1, 4]
    # another batch size on the command line: the folder's own is kept, so the bytes are the same
    generate_priors.main(priors_argv(tiny_model, d, 5, "--seed", 3, "--sample_batch_size", 2))
    assert pngs(d) == original


def test_other_settings_are_refused_unless_overwrite(tiny_model, tmp_path):
    d = tmp_path / "priors"
    generate_priors.main(priors_argv(tiny_model, d, 2))
    original = pngs(d)
    with pytest.raises(SystemExit) as e:
        generate_priors.main(priors_argv(tiny_model, d, 3, "--num_inference_steps", 3, "--guidance_scale", 5))
    assert str(e.value).startswith(f"error: class folder {d} was made with other settings "
                                   "(num_inference_steps 2 -> 3; guidance_scale 7.5 -> 5.0)")
    assert pngs(d) == original
    generate_priors.main(priors_argv(tiny_model, d, 2, "--num_inference_steps", 3, "--overwrite"))
    assert pngs(d).keys() == original.keys() and pngs(d) != original
    assert recorded(d / "000000.png")["settings"]["num_inference_steps"] == 3


def test_a_changed_model_under_the_same_path_is_refused(tiny_model, tmp_path):
    model, d = tmp_path / "model", tmp_path / "priors"
    shutil.copytree(tiny_model, model)
    generate_priors.main(priors_argv(str(model), d, 1))
    (weights,) = (model / "unet").glob("*.safetensors")
    state = load_file(weights)
    state["conv_in.bias"] = state["conv_in.bias"] + 1
    save_file(state, weights)
    with pytest.raises(SystemExit, match=r"\(unet_sha256 '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"):
        generate_priors.main(priors_argv(str(model), d, 2))


def test_user_class_photos_without_a_manifest_are_used_as_they_are(tiny_model, tmp_path, capsys):
    d = tmp_path / "priors"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "mine.png")
    generate_priors.main(priors_argv(tiny_model, d, 1))
    assert sorted(p.name for p in d.iterdir()) == ["mine.png"]
    captured = capsys.readouterr()
    assert "holds no images made by generate_priors.py: its images are used as they are" in captured.err
    assert "already holds 1 class images; nothing to do" in captured.out


def test_priors_refuse_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="error: model folder not found"):
        generate_priors.main(priors_argv(str(tmp_path / "nope"), tmp_path / "d", 1))
    assert not (tmp_path / "d").exists()


def test_the_trainer_tops_up_with_the_same_code_and_settings(run, tiny_model, photos, tmp_path):
    """A folder of 2 from generate_priors (2 steps, batch 2), trained with --num_class_images 3: image 2 is the one
    generate_priors makes for 3, byte for byte, because the trainer takes the folder's own sampler settings."""
    short, full = tmp_path / "short", tmp_path / "full"
    run("generate_priors.py", *priors_argv(tiny_model, short, 2, "--sample_batch_size", 2), launch=ONE)
    run("generate_priors.py", *priors_argv(tiny_model, full, 3, "--sample_batch_size", 2), launch=ONE)
    prior = ["--with_prior_preservation", "--class_dir", short, "--class_prompt", "a photo of dog", "--num_class_images", 3,
             "--max_train_steps", 1, "--report_to", "none"]
    proc = run("train_dreambooth.py", *train_args(tiny_model, photos, tmp_path / "out", *prior), launch=ONE)
    assert "generating 1 class images" in proc.stdout
    assert pngs(short) == pngs(full)

    # another class prompt for the same folder: refused before any model loads, nothing written
    prior[prior.index("a photo of dog")] = "a photo of cat"
    proc = run("train_dreambooth.py", *train_args(tiny_model, photos, tmp_path / "out2", *prior), quiet=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: class folder {short} was made with other settings (class_prompt 'a photo of dog' -> 'a photo of cat'); "
        "use another folder, or make them again with generate_priors.py --overwrite")
    assert not (tmp_path / "out2").exists()


def test_a_folder_of_an_older_version_with_manifest_json_still_tops_up(tiny_model, tmp_path):
    """Versions before this one wrote the settings into class_dir/manifest.json and not into the images."""
    from PIL.PngImagePlugin import PngInfo

    d = tmp_path / "priors"
    generate_priors.main(priors_argv(tiny_model, d, 2))
    settings = recorded(d / "000000.png")["settings"]
    for name in ("000000.png", "000001.png"):  # as the older version wrote them: no text
        with Image.open(d / name) as image:
            image.save(d / name, pnginfo=PngInfo())
    (d / generate_priors.PRIOR_MANIFEST).write_text(json.dumps({"settings": settings}))
    with pytest.raises(SystemExit, match="was made with other settings"):
        generate_priors.main(priors_argv(tiny_model, d, 3, "--num_inference_steps", 3))
    generate_priors.main(priors_argv(tiny_model, d, 3))
    assert recorded(d / "000002.png")["settings"] == settings


def test_diffusers_dreambooth_script_reads_the_folder(tiny_model, tmp_path):
    """diffusers' train_dreambooth.py takes every entry of the class folder as an image (Path.iterdir, Image.open,
    exif_transpose): a folder made here, topped up after an interruption, holds nothing else."""
    from PIL import ImageOps

    d = tmp_path / "priors"
    generate_priors.main(priors_argv(tiny_model, d, 3, "--sample_batch_size", 2))
    (d / "000001.png").unlink()
    generate_priors.main(priors_argv(tiny_model, d, 3, "--sample_batch_size", 2))
    entries = list(d.iterdir())
    assert len(entries) == 3
    for path in entries:
        with Image.open(path) as image:
            assert ImageOps.exif_transpose(image).convert("RGB").size == (64, 64)
