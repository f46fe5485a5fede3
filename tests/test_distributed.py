"""Several processes and machines through accelerate, on CPU processes joined with gloo; the shipped accelerate
configs; and the launches that cannot work, refused in one line. DeepSpeed and FSDP need GPUs: those tests skip
without CUDA (tools/check_gpu_configs.sh runs them on a GPU machine)."""

import json
import socket
import subprocess
import sys

import pytest
import torch
import yaml

import cli
from conftest import ROOT, script_env
from test_bad_input import refuse
from test_train import generates, train_args

CONFIGS = {  # file: what the README says it sets up
    "accelerate_config.yaml": {"distributed_type": "NO", "num_processes": 1, "mixed_precision": "fp16"},
    "configs/accelerate-multi-gpu.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1, "num_processes": 2},
    "configs/accelerate-multi-node.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 2, "machine_rank": 0},
    "configs/accelerate-deepspeed-zero2-offload.yaml": {"distributed_type": "DEEPSPEED"},
    "configs/accelerate-fsdp.yaml": {"distributed_type": "FSDP", "mixed_precision": "bf16"},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_accelerate_configs_load_and_say_what_the_readme_says(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / name))
    for key, value in CONFIGS[name].items():
        assert str(getattr(config, key)).split(".")[-1] == str(value), key
    if "deepspeed" in name:
        assert config.deepspeed_config["zero_stage"] == 2 and config.deepspeed_config["offload_optimizer_device"] == "cpu"
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # follows the script's flag
    if "fsdp" in name:
        assert config.fsdp_config["fsdp_use_orig_params"] is True  # trained and frozen weights in one module
    assert f"configs/{name.split('/')[-1]}" in (ROOT / "README.md").read_text() or name == "accelerate_config.yaml"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback_complete_one_run(tiny_model, photos, hf_home, tmp_path):
    out, port = tmp_path / "out", free_port()
    env = {**script_env(hf_home), "ACCELERATE_USE_CPU": "true"}
    launches = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_dreambooth.py"),
         *map(str, train_args(tiny_model, photos, out, "--train_text_encoder", "--max_train_steps", 2,
                              "--train_batch_size", 1, "--report_to", "none"))],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [p.communicate(timeout=600) for p in launches]
    for p, (stdout, stderr) in zip(launches, results):
        assert p.returncode == 0, stderr[-3000:]
        assert "2 process(es), global batch 2 (1 per device x 1 accumulation x 2)" in stdout
    assert "saved the fine-tuned pipeline" in results[0][0] and "saved" not in results[1][0]  # the main process only
    assert json.loads((out / "run_config.json").read_text())["config"]["num_processes"] == 2
    generates(out)


def test_launches_that_cannot_work_are_refused(case, monkeypatch):
    args, _, out = case
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    if torch.cuda.device_count() == 0:
        assert refuse(args) == ("error: 2 processes were launched on a machine without GPUs: add --cpu to "
                                "`accelerate launch` (or ACCELERATE_USE_CPU=true) to train on CPU processes")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        assert refuse(args) == "error: the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed"
    assert not out.exists()


def test_the_launch_check_counts_gpus(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(SystemExit, match="asks for 4 processes on this machine, which has 2 GPU"):
        cli.check_launch()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cli.check_launch()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed and FSDP need GPUs")
@pytest.mark.parametrize("config", ["configs/accelerate-deepspeed-zero2-offload.yaml", "configs/accelerate-fsdp.yaml"])
def test_gpu_configs_train_unet_and_text_encoder(run, tiny_model, photos, tmp_path, config):
    spec = yaml.safe_load((ROOT / config).read_text())
    if spec["num_processes"] > torch.cuda.device_count():
        pytest.skip(f"{config} needs {spec['num_processes']} GPUs")
    out = tmp_path / "out"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, "--train_text_encoder", "--max_train_steps", 2,
                                           "--gradient_accumulation_steps", 2, "--report_to", "none"),
        launch=["--config_file", ROOT / config])
    generates(out)


def test_an_fsdp_config_on_cpu_processes_is_said_to_run_as_data_parallelism(monkeypatch, capsys):
    """accelerate turns an FSDP launch on CPU processes into plain DDP (FSDP needs GPUs): the run says so once."""
    import cli

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        cli.check_launch()
    assert capsys.readouterr().err.strip() == (
        "note: the accelerate config asks for FSDP, which needs GPUs: accelerate runs these CPU processes as plain "
        "data parallelism (each holds the whole model)")
