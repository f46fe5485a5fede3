"""Shared fixtures: tiny pipelines of each family (SD, SDXL, FLUX.1, SD 3.5, Z-Image, FLUX.2 klein) written to disk with save_pretrained (loaded back by the scripts
through the real from_pretrained path), a few subject photos, and a helper that runs a script as a user would."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

# No model hub here: set before huggingface_hub is imported, for the in-process tests too.
os.environ["HF_HUB_OFFLINE"] = "1"
# pytest.ini runs the tests in two worker processes (pytest-xdist): one CPU thread for each worker and every script it
# starts, set before torch is imported, so that two workers on two cores do not fight over them (a worker's scripts
# and in-process checks also sum floats in the same order, which the tests of exact equality need).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import make_tiny_model  # noqa: E402


def free_port():
    """A port no other process listens on: each multi-process launch gets its own, as two run at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(tmp_home):
    env = dict(os.environ)
    # No hub, no tracker service, and no user accelerate config that could change the launch.
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_home), WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(make_tiny_model.make_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sd")))


@pytest.fixture(scope="session")
def tiny_model_v(tmp_path_factory):
    return str(make_tiny_model.make_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sd-v"), "v_prediction"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return str(make_tiny_model.make_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"), family="sdxl"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """FLUX.1-dev-shaped: guidance-distilled, CLIP + T5, the resolution-dependent shift."""
    return str(make_tiny_model.make_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-flux"), family="flux"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """SD 3.5-shaped: two CLIPs with projections and T5, MMDiT with qk norm and a dual-attention layer."""
    return str(make_tiny_model.make_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sd3"), family="sd3"))


@pytest.fixture(scope="session")
def tiny_z_image(tmp_path_factory):
    """Z-Image-shaped: a Qwen3 text encoder with its chat template, the single-stream transformer with refiners."""
    return str(make_tiny_model.make_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-z-image"),
                                                  family="z-image"))


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory):
    """FLUX.2 klein-shaped: a 28-layer Qwen3 causal LM (hidden states 9, 18, 27 read), FLUX.2's VAE, the base model."""
    return str(make_tiny_model.make_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-klein"),
                                                  family="flux2-klein"))


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory):
    """Qwen-Image-shaped: a Qwen2.5-VL text encoder whose tokenizer splits the pipeline's template into its 34 tokens,
    the dual-stream transformer, the video VAE with per-channel mean and std."""
    return str(make_tiny_model.make_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-qwen-image"),
                                                  family="qwen-image"))


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    make_tiny_model.make_sample_photos(str(folder), n=4, size=72)
    return str(folder)


@pytest.fixture
def run(hf_home):
    """run(script, *args, launch=True, quiet=False): the script as a subprocess, through `accelerate launch` (one CPU
    process, or the launcher flags given as a list, with a port of its own) or plain `python` (launch=False).
    Returns the CompletedProcess with stdout and stderr as text."""

    def _run(script, *args, launch=True, quiet=False, check=True, env=None):
        cmd = [sys.executable]
        if launch:
            flags = ([*launch, "--main_process_port", free_port()] if isinstance(launch, list)
                     else ["--num_processes", "1"])
            cmd += ["-m", "accelerate.commands.launch", *map(str, flags), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"] + (["--quiet"] if quiet else [])
        cmd += [str(ROOT / script), *map(str, args)]
        proc = subprocess.run(cmd, cwd=ROOT, env={**script_env(hf_home), **(env or {})}, capture_output=True, text=True,
                              timeout=900)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                 f"--- stderr\n{proc.stderr[-8000:]}")
        return proc

    return _run


@pytest.fixture
def make_accelerator():
    """accelerate's Accelerator on CPU for an in-process test; its process-wide state is reset before and after, so
    tests that ask for different mixed precisions do not meet."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield lambda **kwargs: Accelerator(cpu=True, **kwargs)
    AcceleratorState._reset_state(True)


@pytest.fixture
def case(tmp_path, tiny_model, photos):
    """Arguments of a valid run, with an output folder that does not exist yet."""
    inst = tmp_path / "photos"
    shutil.copytree(photos, inst)
    out = tmp_path / "out"
    args = {"--pretrained_model_name_or_path": tiny_model, "--instance_dir": str(inst),
            "--instance_prompt": "a photo of sks dog", "--output_dir": str(out), "--resolution": "64"}
    return args, inst, out


@pytest.fixture(scope="session")
def priors(tmp_path_factory, tiny_model):
    """6 class images from generate_priors.py (2 sampling steps)."""
    folder = tmp_path_factory.mktemp("priors")
    subprocess.run([sys.executable, ROOT / "generate_priors.py", "--model", tiny_model, "--class_prompt", "a photo of dog",
                    "--class_dir", folder, "--num_class_images", "6", "--num_inference_steps", "2", "--resolution", "64"],
                   check=True, capture_output=True, env=script_env(tmp_path_factory.mktemp("home")))
    return folder
