"""Exact resume: a run interrupted at a checkpoint (or by SIGTERM) and resumed ends bit-identical to the run that was
never interrupted: the same logged loss at every step and the same final weights, compared with torch.equal.

Each comparison uses one launcher for both runs: `accelerate launch` sets the CPU thread count, and a different
thread count sums floats in another order (same losses to print precision, weights a few bits apart)."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, script_env
from test_train import scalars, train_args, weights

TRAINED = ("unet", "text_encoder")
PIPELINE = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json")


def command(tiny_model, photos, priors, out, *extra):
    """Prior preservation, text encoder trained, accumulation 2, 8-bit Adam, cosine with warmup. 4 instance and 6 class
    images at batch 1 make 6 micro-batches, so 3 optimizer steps an epoch: checkpoints every 2 steps fall mid-epoch."""
    return train_args(tiny_model, photos, out, "--with_prior_preservation", "--class_dir", priors,
                      "--class_prompt", "a photo of dog", "--num_class_images", 6, "--train_text_encoder",
                      "--use_8bit_adam", "--gradient_accumulation_steps", 2, "--train_batch_size", 1,
                      "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--max_train_steps", 6, "--random_flip",
                      "--checkpointing_steps", 2, "--checkpoints_total_limit", 2, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, photos, priors, hf_home):
    """The uninterrupted run: 6 steps, checkpoints at 2, 4 and 6 of which the newest 2 are kept."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run([sys.executable, ROOT / "train_dreambooth.py", *map(str, command(tiny_model, photos, priors, out))],
                   check=True, capture_output=True, env=script_env(hf_home), cwd=ROOT)
    return out


def interrupted_copy(reference, out, keep):
    """The reference run folder as if the run had died just after checkpoint `keep`."""
    shutil.copytree(reference, out)
    for path in [*out.glob("checkpoint-*"), out / "logs", *(out / name for name in PIPELINE)]:
        if path.name.startswith("checkpoint-") and path.name == f"checkpoint-{keep}":
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def assert_same_run(reference, resumed, from_step, trained=TRAINED):
    for component in trained:
        ref, new = weights(reference, component), weights(resumed, component)
        assert ref.keys() == new.keys()
        different = [k for k in ref if not torch.equal(ref[k], new[k])]
        assert not different, f"{component}: {len(different)} of {len(ref)} tensors differ, e.g. {different[:3]}"
    ref_logs, new_logs = scalars(reference / "logs"), scalars(resumed / "logs")
    for tag in [t for t in ("loss", "instance_loss", "prior_loss", "lr", "grad_norm") if t in ref_logs]:
        expected = {step: v for step, v in ref_logs[tag].items() if step > from_step}
        assert new_logs[tag] == expected, tag


def test_total_limit_keeps_the_newest_checkpoints_and_each_carries_its_config(reference):
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(reference.glob("*.tmp"))
    for step in (4, 6):
        assert (reference / f"checkpoint-{step}" / "run_config.json").is_file()
        assert (reference / f"checkpoint-{step}" / "random_states_0.pkl").is_file()


def test_checkpoints_hold_the_trained_models_in_diffusers_layout(reference):
    """checkpoint-N/unet and checkpoint-N/text_encoder load with from_pretrained(subfolder=...), as diffusers' docs
    show; the weights are stored once (no model.safetensors beside them). The last checkpoint is the final model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    assert not (reference / "checkpoint-6" / "model.safetensors").exists()
    unet = UNet2DConditionModel.from_pretrained(reference, subfolder="checkpoint-6/unet")
    text_encoder = CLIPTextModel.from_pretrained(reference, subfolder="checkpoint-6/text_encoder")
    for module, component in ((unet, "unet"), (text_encoder, "text_encoder")):
        final, saved = weights(reference, component), module.state_dict()
        assert all(torch.equal(final[k], saved[k]) for k in final), component


def test_a_checkpoint_in_accelerates_own_layout_still_resumes(reference, tiny_model, photos, priors, tmp_path, run):
    """Checkpoints of earlier versions hold model.safetensors ("unet.*", "text_encoder.*"): rebuilt from
    checkpoint-4, the resume is as exact as from the new layout."""
    from safetensors.torch import save_file

    out = tmp_path / "run"
    interrupted_copy(reference, out, keep=4)
    checkpoint = out / "checkpoint-4"
    state = {f"{name}.{k}": v for name in TRAINED for k, v in weights(checkpoint, name).items()}
    save_file(state, checkpoint / "model.safetensors")
    for name in TRAINED:
        shutil.rmtree(checkpoint / name)
    run("train_dreambooth.py", *command(tiny_model, photos, priors, out, "--resume_from_checkpoint", "latest"),
        launch=False)
    assert_same_run(reference, out, from_step=4)


def test_resume_mid_epoch_is_bit_identical(run, reference, tiny_model, photos, priors, tmp_path):
    out = tmp_path / "run"
    interrupted_copy(reference, out, keep=4)
    # a save that died half-way: `latest` must not pick it
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-5.tmp")
    (out / "checkpoint-5.tmp" / "optimizer.bin").unlink()
    # checkpoint 4 is step 1 of epoch 1: the resumed run must replay that epoch's order and skip its first 2 batches
    proc = run("train_dreambooth.py", *command(tiny_model, photos, priors, out, "--resume_from_checkpoint", "latest"),
               launch=False)
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in proc.stdout
    assert "changed settings" not in proc.stderr
    assert_same_run(reference, out, from_step=4)


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches(reference, tiny_model, photos, priors, hf_home, tmp_path):
    """SIGTERM as a cluster sends it, with two dataloader workers (which must not change the data either)."""
    out = tmp_path / "run"
    args = [sys.executable, ROOT / "train_dreambooth.py",
            *map(str, command(tiny_model, photos, priors, out, "--dataloader_num_workers", 2))]
    proc = subprocess.Popen(args, cwd=ROOT, env=script_env(hf_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:  # the banner comes after the handler is installed and before the first step
        if line.startswith("DreamBooth:"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    stopped = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]
    assert len(stopped) == 1 and stopped[0] < 6, f"expected one checkpoint before the end, got {stopped}\n{stdout}"
    step = stopped[0]
    assert f"stopped by SIGTERM after step {step}" in stdout and "--resume_from_checkpoint latest" in stdout
    assert not (out / "model_index.json").exists()  # stopped runs leave no final pipeline
    shutil.rmtree(out / "logs")
    subprocess.run(args + ["--resume_from_checkpoint", "latest"], check=True, capture_output=True, cwd=ROOT,
                   env=script_env(hf_home))
    assert_same_run(reference, out, from_step=step)


def test_two_processes_resume_with_every_process_random_state(run, tiny_model, photos, priors, tmp_path):
    """Each process draws its own noise, so each one's random state must come back. 6 examples over 2 processes at
    batch 1 are 3 micro-batches each an epoch: with accumulation 2 the epoch ends on a short step."""
    two = dict(launch=["--multi_gpu", "--num_processes", 2], env={"ACCELERATE_USE_CPU": "true"})
    reference, out = tmp_path / "reference", tmp_path / "run"
    args = ["--max_train_steps", 4, "--checkpointing_steps", 1, "--checkpoints_total_limit", 4]
    run("train_dreambooth.py", *command(tiny_model, photos, priors, reference, *args), **two)
    assert (reference / "checkpoint-1" / "random_states_1.pkl").is_file()
    interrupted_copy(reference, out, keep=1)
    proc = run("train_dreambooth.py", *command(tiny_model, photos, priors, out, *args, "--resume_from_checkpoint",
                                               out / "checkpoint-1"), **two)
    assert "at step 1" in proc.stdout
    assert_same_run(reference, out, from_step=1)


def test_fp16_resume_exports_and_a_corrupt_checkpoint(run, tiny_model, photos, tmp_path):
    """Under fp16 the trainable weights are fp32 again after loading (or the grad scaler would fail with "Attempting
    to unscale FP16 gradients"); exports are fp16 pipelines that infer.py loads; a corrupt checkpoint is refused."""
    out = tmp_path / "run"
    args = train_args(tiny_model, photos, out, "--mixed_precision", "fp16", "--max_train_steps", 2,
                      "--checkpointing_steps", 1, "--export_steps", 1, "--exports_total_limit", 1, "--report_to", "none")
    run("train_dreambooth.py", *args)
    assert sorted(p.name for p in out.glob("export-*")) == ["export-2"]
    assert {t.dtype for t in weights(out / "export-2", "unet").values()} == {torch.float16}
    run("infer.py", "--model", out / "export-2", "--prompt", "a photo of sks dog", "--num_inference_steps", 2,
        "--height", 64, "--width", 64, "--num_images_per_prompt", 1, "--output_dir", tmp_path / "samples", launch=False)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1

    proc = run("train_dreambooth.py", *args, "--max_train_steps", 3, "--resume_from_checkpoint", out / "checkpoint-1")
    assert "resuming with changed settings (max_train_steps, num_epochs, total_optimizer_steps)" in proc.stderr
    assert {t.dtype for t in weights(out, "unet").values()} == {torch.float32}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    broken = out / "checkpoint-broken"
    shutil.copytree(out / "checkpoint-1", broken)
    (broken / "optimizer.bin").write_bytes(b"not a checkpoint")
    proc = run("train_dreambooth.py", *args, "--resume_from_checkpoint", broken, quiet=True, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot load checkpoint {broken}")


def test_data_seed_moves_the_data_alone_and_a_resume_keeps_it(run, reference, tiny_model, photos, priors, tmp_path):
    """--data_seed defaults to --seed's (the same run, bit for bit); another one gives another run, which a resume
    without the flag continues exactly (it is recorded); and with one photo, center-cropped and unflipped, where the
    data's order cannot change anything, two data seeds give bit-identical weights: noise, timesteps and start stay
    --seed's."""
    same, other = tmp_path / "same", tmp_path / "other"
    run("train_dreambooth.py", *command(tiny_model, photos, priors, same, "--data_seed", 0), launch=False)
    assert_same_run(reference, same, from_step=0)
    run("train_dreambooth.py", *command(tiny_model, photos, priors, other, "--data_seed", 1), launch=False)
    assert json.loads((other / "run_config.json").read_text())["config"]["data_seed"] == 1
    ref, moved = weights(reference, "unet"), weights(other, "unet")
    assert any(not torch.equal(ref[k], moved[k]) for k in ref)
    resumed = tmp_path / "resumed"
    interrupted_copy(other, resumed, keep=4)
    run("train_dreambooth.py", *command(tiny_model, photos, priors, resumed, "--resume_from_checkpoint", "latest"),
        launch=False)
    assert_same_run(other, resumed, from_step=4)

    one = tmp_path / "one-photo"
    one.mkdir()
    shutil.copy(sorted(Path(photos).iterdir())[0], one)
    for data_seed in (1, 2):
        run("train_dreambooth.py", *train_args(tiny_model, one, tmp_path / f"one-{data_seed}", "--max_train_steps", 2,
                                               "--train_batch_size", 1, "--center_crop", "--data_seed", data_seed),
            launch=False)
    first, second = weights(tmp_path / "one-1", "unet"), weights(tmp_path / "one-2", "unet")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], weights(tiny_model, "unet")[k]) for k in first)  # it did train
