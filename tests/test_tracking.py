"""What the trackers receive (TensorBoard read back from its event files, W&B from an offline run), validation images
that never change training, and flags from a YAML file."""

import json
import os
import struct

import pytest
import torch
import yaml
from PIL import Image

import train_dreambooth
from test_bad_input import refuse
from test_train import train_args, weights

VALIDATION = ["--validation_prompt", "a photo of sks dog", "--validation_prompt", "a dog", "--num_validation_images", 2,
              "--validation_steps", 2, "--validation_inference_steps", 2]


def events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(logdir.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    acc.Reload()
    scalars = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    images = {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    return scalars, images


def test_validation_images_are_logged_and_never_change_training(run, tiny_model, photos, tmp_path):
    common = ["--train_text_encoder", "--max_train_steps", 3, "--train_batch_size", 1]
    run("train_dreambooth.py", *train_args(tiny_model, photos, tmp_path / "plain", *common))
    # the run with validation takes its flags from a YAML file
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"validation_prompt": ["a photo of sks dog", "a dog"], "num_validation_images": 2,
                                      "validation_steps": 2, "validation_inference_steps": 2}))
    out = tmp_path / "validated"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, *common, "--config", config))

    for component in ("unet", "text_encoder"):
        plain, validated = weights(tmp_path / "plain", component), weights(out, component)
        assert all(torch.equal(plain[k], validated[k]) for k in plain), component

    scalars, images = events(out / "logs")
    for tag in ("loss", "instance_loss", "lr", "grad_norm", "seconds_per_step", "images_per_second"):
        assert scalars[tag] == [1, 2, 3], tag
    # the base model at step 0, every 2 steps, and the final model
    assert images == {"validation/0": [0, 2, 3], "validation/1": [0, 2, 3]}
    grids = sorted(p.name for p in (out / "validation").iterdir())
    assert grids == ["step-000000.png", "step-000002.png", "step-000003.png"]
    with Image.open(out / "validation" / "step-000003.png") as grid:
        assert grid.size == (2 * 64, 2 * 64)


def wandb_records(run_file, block=32768):
    """The records of an offline W&B run file (`run-*.wandb`): LevelDB's log format (a 7-byte file header, 32 KiB
    blocks, chunks with a crc/length/type header) holding wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, pos, record = run_file.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7 or data[pos + 4:pos + 7] == b"\0\0\0":  # block trailer or padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            parsed = wandb_internal_pb2.Record()
            parsed.ParseFromString(record)
            yield parsed


def test_wandb_offline_run_holds_the_config_metrics_and_images(run, tiny_model, photos, tmp_path):
    out = tmp_path / "out"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, "--report_to", "wandb", "--learning_rate", 3e-4,
                                           "--prior_loss_weight", 0.7, "--max_train_steps", 2, "--run_name", "sks-test",
                                           "--validation_prompt", "a dog", "--num_validation_images", 1,
                                           "--validation_inference_steps", 2),
        env={"WANDB_MODE": "offline"})
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    config, history, name = {}, {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    assert name == "sks-test"
    assert config["learning_rate"] == 3e-4 and config["prior_loss_weight"] == 0.7
    assert config["total_optimizer_steps"] == 2 and config["version/diffusers"]
    assert config["command"].endswith("--validation_inference_steps 2")
    assert sorted(history) == [0, 1, 2]
    assert all(isinstance(history[step]["loss"], float) and "grad_norm" in history[step] for step in (1, 2))
    for step in (0, 2):  # the base model's images, then the final model's
        assert history[step]["validation/_type"] == "images/separated"
        assert history[step]["validation/captions"] == ["0: a dog"]


def test_wandb_without_a_login_is_refused(case, monkeypatch, tmp_path):
    args, _, out = case
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert refuse(args, "--report_to", "wandb") == (
        "error: --report_to wandb needs a W&B login: run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline")
    assert not out.exists()


def test_yaml_values_are_defaults_that_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("pretrained_model_name_or_path: some/model\ninstance_data_dir: photos\n"
                      "instance_prompt: a photo of sks dog\nlearning_rate: 5e-6\ntrain_text_encoder: true\n"
                      "validation_prompt: [one, two]\nmax_train_steps: 400\n")
    args = train_dreambooth.parse_args(["--config", str(config), "--learning_rate", "1e-3"])
    assert args.learning_rate == 1e-3 and args.max_train_steps == 400 and args.train_text_encoder is True
    assert args.instance_dir == "photos" and args.validation_prompt == ["one", "two"]
    assert isinstance(train_dreambooth.parse_args(["--config", str(config)]).learning_rate, float)  # YAML's "5e-6"
    args = train_dreambooth.parse_args(["--config", str(config), "--validation_prompt", "three"])
    assert args.validation_prompt == ["three"]  # a repeatable flag on the command line replaces the file's list


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1e-4\nlerning_rate: 2\nfoo: 1\n", "has unknown key(s): lerning_rate, foo (keys are flag names"),
    ("mixed_precision: fp8\n", "bad value 'fp8' for mixed_precision: expected one of no, fp16, bf16"),
    ("train_text_encoder: yes please\n", "bad value 'yes please' for train_text_encoder: expected true or false"),
    ("- a list\n", "is not a mapping of flag names to values"),
])
def test_a_bad_yaml_file_is_refused(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as e:
        train_dreambooth.parse_args(["--config", str(config)])
    assert str(e.value).startswith("error: config file ") and message in str(e.value)
    assert "\n" not in str(e.value)
    os.remove(config)
