"""The speed options change no result: cached latents and pre-computed prompt embeddings train the same weights as
encoding every step; and the benchmark script runs (its numbers go to BENCHMARKS.md, never into assertions)."""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, script_env
from test_bad_input import refuse
from test_train import train_args, weights


def test_cached_latents_and_embeddings_train_the_same_weights(run, tiny_model, photos, tmp_path):
    # batch 1: the VAE and the text encoder then see one image and one prompt at a time either way, as the caches do
    common = ["--train_batch_size", 1, "--center_crop", "--random_flip", "--max_train_steps", 4, "--report_to", "none",
              "--logging_steps", 2]
    run("train_dreambooth.py", *train_args(tiny_model, photos, tmp_path / "live", *common))
    proc = run("train_dreambooth.py", *train_args(tiny_model, photos, tmp_path / "cached", *common, "--cache_latents",
                                                  "--pre_compute_text_embeddings"))
    assert "caching latents" in proc.stderr
    live, cached = weights(tmp_path / "live", "unet"), weights(tmp_path / "cached", "unet")
    assert all(torch.equal(live[k], cached[k]) for k in live)


def test_caches_with_prior_preservation_and_validation(run, tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    run("train_dreambooth.py", *train_args(
        tiny_model, photos, out, "--center_crop", "--cache_latents", "--pre_compute_text_embeddings", "--channels_last",
        "--with_prior_preservation", "--class_dir", tmp_path / "priors", "--class_prompt", "a photo of dog",
        "--num_class_images", 2, "--sample_batch_size", 2, "--max_train_steps", 2, "--validation_prompt", "a dog",
        "--num_validation_images", 1, "--validation_inference_steps", 2, "--report_to", "none"))
    assert (out / "validation" / "step-000002.png").is_file() and (out / "model_index.json").is_file()


def test_cache_conflicts_are_refused(case):
    args, _, out = case
    assert refuse(args, "--pre_compute_text_embeddings", "--train_text_encoder").startswith(
        "error: --pre_compute_text_embeddings needs a frozen text encoder")
    assert not out.exists()


@pytest.mark.parametrize("model, row", [("tiny", "baseline"),
                                        pytest.param("tiny-sdxl", "SDXL full UNet", marks=pytest.mark.slow)])
def test_benchmark_prints_a_table(hf_home, model, row):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), "--model", model, "--steps", "1",
                           "--warmup", "1", "--only", row], cwd=ROOT, env=script_env(hf_home),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "| configuration | steps/s | s/step | peak memory (GiB) |" in lines
    (line,) = [line for line in lines if line.startswith(f"| {row}")]
    steps_per_second, seconds, memory = (float(cell) for cell in line.strip("|").split("|")[1:])
    assert steps_per_second > 0 and seconds > 0 and memory > 0
