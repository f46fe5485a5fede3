"""Several processes and machines through accelerate, on CPU processes joined with gloo; the shipped accelerate
configs; and the launches that cannot work, refused in one line. DeepSpeed needs GPUs: its test skips without CUDA
(tools/check_gpu_configs.sh runs it on a GPU machine). FSDP runs here through tests/fsdp_on_cpu.py (what it covers
and what not is in its docstring)."""

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import cli
from conftest import ROOT, free_port, script_env
from test_bad_input import refuse
from test_train import generates, train_args, weights

CONFIGS = {  # file: what the README says it sets up
    "accelerate_config.yaml": {"distributed_type": "NO", "num_processes": 1, "mixed_precision": "fp16"},
    "configs/accelerate-multi-gpu.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1, "num_processes": 2},
    "configs/accelerate-multi-node.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 2, "machine_rank": 0},
    "configs/accelerate-deepspeed-zero2-offload.yaml": {"distributed_type": "DEEPSPEED"},
    "configs/accelerate-fsdp.yaml": {"distributed_type": "FSDP", "mixed_precision": "bf16"},
    "configs/accelerate-fsdp2.yaml": {"distributed_type": "FSDP", "mixed_precision": "bf16", "num_processes": 8},
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
    if name.endswith("fsdp.yaml"):
        assert config.fsdp_config["fsdp_use_orig_params"] is True  # trained and frozen weights in one module
    if name.endswith("fsdp2.yaml"):  # shard units from the model; every process starts from the main one's weights
        assert config.fsdp_config["fsdp_version"] == 2 and "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    assert f"configs/{name.split('/')[-1]}" in (ROOT / "README.md").read_text() or name == "accelerate_config.yaml"


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
@pytest.mark.parametrize("config", ["configs/accelerate-deepspeed-zero2-offload.yaml", "configs/accelerate-fsdp.yaml",
                                    "configs/accelerate-fsdp2.yaml"])
def test_gpu_configs_train_unet_and_text_encoder(run, tiny_model, photos, tmp_path, config):
    """On GPUs (tools/gpu_check.sh, tools/check_gpu_configs.sh). The FSDP2 config runs on as many GPUs as there are
    (its shard units come from the model, so any count works; its 8 are a suggestion)."""
    spec = yaml.safe_load((ROOT / config).read_text())
    processes = min(spec["num_processes"], torch.cuda.device_count()) if config.endswith("fsdp2.yaml") \
        else spec["num_processes"]
    if processes > torch.cuda.device_count():
        pytest.skip(f"{config} needs {spec['num_processes']} GPUs")
    out = tmp_path / "out"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, "--train_text_encoder", "--max_train_steps", 2,
                                           "--gradient_accumulation_steps", 2, "--report_to", "none"),
        launch=["--config_file", ROOT / config, "--num_processes", processes])
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


def fsdp_on_two_cpu_processes(tmp_path):
    """The `run` fixture's launcher flags for configs/accelerate-fsdp2.yaml on 2 CPU processes (the shipped file, with
    its process count and device changed), through tests/fsdp_on_cpu.py."""
    spec = {**yaml.safe_load((ROOT / "configs/accelerate-fsdp2.yaml").read_text()), "num_processes": 2, "use_cpu": True}
    (tmp_path / "fsdp-on-cpu.yaml").write_text(yaml.safe_dump(spec))
    return dict(launch=["--config_file", tmp_path / "fsdp-on-cpu.yaml"], env={"ACCELERATE_USE_CPU": "true"})


def max_difference(a, b, skip="^$"):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a if not re.search(skip, k))


# attention key biases: their gradient is zero in exact arithmetic (softmax ignores a shift shared by a query's
# logits), so it is rounding noise, which Adam scales up to steps of the learning rate: rounding, not a difference
KEY_BIAS = r"k_proj\.bias$"


@pytest.mark.parametrize("mode", ["full", pytest.param("lora", marks=pytest.mark.slow)])  # slow: CI time
def test_fsdp2_on_two_cpu_processes_resumes_exactly_and_matches_data_parallelism(run, tiny_flux, photos, tmp_path, mode):
    """configs/accelerate-fsdp2.yaml on two CPU processes trains FLUX.1's transformer and CLIP text encoder sharded:
    checkpoints in FSDP's sharded layout that resume bit for bit, a final pipeline (or LoRA file) gathered whole, and
    the same weights as plain data parallelism on the same two processes, within the rounding of the reduction
    (FSDP reduce-scatters the gradients where DDP all-reduces them). Not against one process: each process draws its
    own noise, so one process at twice the batch trains on other noise. (The text encoder's attention key biases
    are left out of that comparison: see KEY_BIAS.)"""
    from diffusers import FluxPipeline

    fsdp, out = fsdp_on_two_cpu_processes(tmp_path), tmp_path / "fsdp"
    extra = ["--train_text_encoder", "--max_train_steps", 3, "--checkpointing_steps", 1, "--train_batch_size", 1,
             "--report_to", "none", *(["--lora_rank", 4] if mode == "lora" else [])]
    script = [ROOT / "train_dreambooth.py"]  # what tests/fsdp_on_cpu.py runs
    run("tests/fsdp_on_cpu.py", *script, *train_args(tiny_flux, photos, out, *extra), **fsdp)
    record = json.loads((out / "run_config.json").read_text())["config"]
    assert record["distributed_type"] == "FSDP" and record["num_processes"] == 2
    assert sorted(p.name for p in (out / "checkpoint-1" / "pytorch_model_fsdp_0").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # one piece per process

    def result(folder):
        if mode == "lora":
            return {k: v.float() for k, v in load_file(folder / "pytorch_lora_weights.safetensors").items()}
        return {f"{name}.{k}": v.float() for name in ("transformer", "text_encoder")
                for k, v in weights(folder, name).items()}

    trained = result(out)
    resumed = tmp_path / "resumed"
    resume = ["--resume_from_checkpoint", out / "checkpoint-1"]
    run("tests/fsdp_on_cpu.py", *script, *train_args(tiny_flux, photos, resumed, *extra, *resume), **fsdp)
    assert max_difference(trained, result(resumed)) == 0.0

    ddp = tmp_path / "ddp"
    run("train_dreambooth.py", *train_args(tiny_flux, photos, ddp, *extra),
        launch=["--multi_gpu", "--num_processes", 2], env={"ACCELERATE_USE_CPU": "true"})
    assert json.loads((ddp / "run_config.json").read_text())["config"]["distributed_type"] == "MULTI_CPU"
    assert max_difference(trained, result(ddp), KEY_BIAS) < 1e-6
    if mode == "full":
        assert max_difference(result(tiny_flux), trained) > 1e-4  # trained: 3 steps at 1e-4
        assert max_difference(weights(tiny_flux, "vae"), weights(out, "vae")) == 0.0
        pipe = FluxPipeline.from_pretrained(out)
    else:
        assert any(k.startswith("text_encoder.") for k in trained)
        pipe = FluxPipeline.from_pretrained(tiny_flux)
        pipe.load_lora_weights(out)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)

    # an FSDP checkpoint resumed without FSDP: refused before anything loads
    proc = run("train_dreambooth.py", *train_args(tiny_flux, photos, tmp_path / "plain", *extra, *resume), quiet=True,
               check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {out / 'checkpoint-1'} was written by FSDP (weights and optimizer in its layout): resume it under an "
        "FSDP accelerate config (accelerate launch --config_file ...)")
