"""The outputs of this version against those of a reference commit, on this machine: the same runs with both (SD and
SDXL; full, LoRA, pivotal tuning, buckets with masks, two subjects), and the same bytes or bit-identical tensors
in every file they write (weights, checkpoints, validation images, LoRA and kohya files, single files, exports,
class images, infer.py's PNGs). For restructurings that promise to change nothing: run it before landing one.

    .venv/bin/python -m pytest -m slow tests/test_same_outputs.py                       # against REFERENCE
    SAME_OUTPUTS_REFERENCE=<commit> .venv/bin/python -m pytest -m slow tests/test_same_outputs.py

The reference is checked out from this repository's history into a temporary git worktree; both versions run in the
same environment with one thread, so any difference is the code's."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import ROOT, script_env

# The last commit before the family table and the module split (the LoRA key-layout fix included).
REFERENCE = os.environ.get("SAME_OUTPUTS_REFERENCE", "3313b17")
SKIP = ("code", "logs", "wandb")  # the scripts' own source, TensorBoard events (timestamps)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if not (ROOT / ".git").exists():
        pytest.skip("needs the repository's history (a git clone)")
    folder = tmp_path_factory.mktemp("reference") / "tree"
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", folder, REFERENCE], check=True, capture_output=True)
    yield folder
    subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", folder], capture_output=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model, tiny_sdxl):
    """Photos (square; and mixed shapes, two with masks) and a concepts list of two subjects."""
    import make_tiny_model

    folder = tmp_path_factory.mktemp("same-data")
    make_tiny_model.make_sample_photos(str(folder / "photos"), n=4, size=72)
    make_tiny_model.make_sample_photos(str(folder / "photos2"), n=3, size=72, seed=1)
    mixed = folder / "mixed"
    mixed.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80), (120, 60)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(mixed / f"p{i}.png")
        if i < 2:
            mask = Image.new("L", (w, h), 0)
            ImageDraw.Draw(mask).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=255)
            mask.save(mixed / f"p{i}.mask.png")
    return folder


def cases(data, sd, sdxl):
    """(name, [(script, args)]) run in a fresh folder by both versions; {out} is that folder."""
    common = ["--resolution", 64, "--train_batch_size", 2, "--seed", 0, "--max_train_steps", 3, "--checkpointing_steps",
              2, "--export_steps", 2, "--validation_prompt", "a photo of sks dog", "--num_validation_images", 1,
              "--validation_inference_steps", 2, "--validation_steps", 2, "--report_to", "none"]
    photos = ["--instance_dir", data / "photos", "--instance_prompt", "a photo of sks dog", "--output_dir", "{out}/run"]
    priors = ["--with_prior_preservation", "--class_dir", "{out}/priors", "--class_prompt", "a photo of dog",
              "--num_class_images", 3, "--sample_batch_size", 2]
    infer = ["--model", "{out}/run", "--prompt", "a photo of sks dog", "--num_images_per_prompt", 2,
             "--num_inference_steps", 2, "--height", 64, "--width", 64, "--output_dir", "{out}/images"]
    concepts = [{"instance_prompt": "a photo of sks dog", "instance_data_dir": str(data / "photos"),
                 "class_prompt": "a photo of dog", "class_data_dir": "{out}/priors-dog"},
                {"instance_prompt": "a photo of zwx cat", "instance_data_dir": str(data / "photos2"),
                 "class_prompt": "a photo of cat", "class_data_dir": "{out}/priors-cat"}]
    return [
        ("sd-full", [("generate_priors.py", ["--model", sd, "--class_prompt", "a photo of dog", "--class_dir",
                                             "{out}/priors", "--num_class_images", 3, "--num_inference_steps", 2,
                                             "--resolution", 64]),
                     ("train_dreambooth.py", ["--model", sd, *photos, *common, *priors, "--train_text_encoder",
                                              "--save_single_file"]),
                     ("infer.py", infer), ("export.py", ["{out}/run/export-2", "--single_file"])]),
        ("sd-lora", [("train_dreambooth.py", ["--model", sd, *photos, *common, "--lora_rank", 4, "--lora_alpha", 8,
                                              "--learning_rate", 1e-2, "--train_text_encoder", *priors]),
                     ("infer.py", infer), ("infer.py", [*infer[:-1], "{out}/fused", "--fuse_lora"])]),
        ("sdxl-full", [("train_dreambooth.py", ["--model", sdxl, *photos, *common, "--train_text_encoder",
                                                "--save_single_file"]), ("infer.py", infer)]),
        ("sdxl-pivotal", [("train_dreambooth.py", ["--model", sdxl, *photos, *common, "--lora_rank", 4,
                                                   "--learning_rate", 1e-2, "--train_text_encoder_ti",
                                                   "--initializer_concept", "dog"]), ("infer.py", infer)]),
        ("sdxl-buckets-masks", [("train_dreambooth.py", [
            "--model", sdxl, "--instance_dir", data / "mixed", "--instance_prompt", "a photo of sks dog",
            "--output_dir", "{out}/run", *common, *priors, "--aspect_ratio_buckets", "64,64;48,80;80,48",
            "--mask_background_weight", 0.1, "--cache_latents", "--center_crop"])]),
        ("sd-two-subjects", [("generate_priors.py", ["--model", sd, "--concepts_list", "{out}/concepts.json",
                                                     "--num_class_images", 2, "--num_inference_steps", 2,
                                                     "--resolution", 64]),
                             ("train_dreambooth.py", ["--model", sd, "--concepts_list", "{out}/concepts.json",
                                                      "--output_dir", "{out}/run", *common, "--lora_rank", 4,
                                                      "--with_prior_preservation", "--num_class_images", 2])]),
    ], concepts


def run_case(tree, out, steps, concepts, hf_home):
    import json

    out.mkdir(parents=True)
    (out / "concepts.json").write_text(json.dumps(concepts).replace("{out}", str(out)))
    for script, args in steps:
        cmd = [sys.executable, str(tree / script), *(str(a).replace("{out}", str(out)) for a in args)]
        proc = subprocess.run(cmd, cwd=tree, env={**script_env(hf_home), **ONE_THREAD}, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{tree.name}: {script} exited {proc.returncode}\n{proc.stderr[-3000:]}"


def files(folder):
    return {p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and not set(p.relative_to(folder).parts) & set(SKIP)}


def same(a, b):
    """Bit-identical content: tensors for safetensors and torch pickles, pixels for PNGs (their text chunks hold
    paths), bytes otherwise; JSON records and model cards hold paths and versions and are left out."""
    from safetensors.torch import load_file

    if a.suffix == ".safetensors":
        x, y = load_file(a), load_file(b)
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    if a.suffix == ".png":
        return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    if a.suffix in (".bin", ".pt"):
        return equal_objects(torch.load(a, weights_only=False), torch.load(b, weights_only=False))
    if a.suffix in (".json", ".md", ".pkl") or a.name.startswith("events."):
        return True
    return a.read_bytes() == b.read_bytes()


def equal_objects(x, y):
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(equal_objects(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(equal_objects(i, j) for i, j in zip(x, y))
    return x == y


@pytest.mark.parametrize("case", ["sd-full", "sd-lora", "sdxl-full", "sdxl-pivotal", "sdxl-buckets-masks",
                                  "sd-two-subjects"])
def test_this_version_writes_what_the_reference_wrote(reference, data, tiny_model, tiny_sdxl, hf_home, tmp_path, case):
    all_cases, concepts = cases(data, tiny_model, tiny_sdxl)
    steps = dict(all_cases)[case]
    ref, new = tmp_path / "ref" / case, tmp_path / "new" / case
    run_case(reference, ref, steps, concepts, hf_home)
    run_case(ROOT, new, steps, concepts, hf_home)
    assert files(ref) == files(new), f"files only in the reference: {sorted(files(ref) - files(new))[:5]}; only " \
                                     f"here: {sorted(files(new) - files(ref))[:5]}"
    different = [str(p) for p in sorted(files(ref)) if not same(ref / p, new / p)]
    assert not different, f"{len(different)} of {len(files(ref))} files differ: {different[:8]}"
    shutil.rmtree(tmp_path / "ref")
