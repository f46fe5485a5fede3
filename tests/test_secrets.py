"""Secrets never leave the process: a Hub token given to train_dreambooth.py is used for the Hub calls and appears in
no file of the run (records, checkpoints, exports, TensorBoard events, the W&B offline run), no printed line and no
file the Hub upload would carry; records written in plain text by older versions are redacted on resume."""

import json
import shutil
from pathlib import Path

import pytest

import cli
import export
from test_train import train_args

TOKEN = "hf_FakeTokenForTheTest0123456789abcdef"


def files_holding(folder, secret=TOKEN):
    """Every file under `folder`, binary ones included, whose bytes contain `secret`."""
    return [p for p in Path(folder).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize("argv, expected", [
    (["x.py", "--hub_token", TOKEN, "--seed", "1"], ["x.py", "--hub_token", "***", "--seed", "1"]),
    (["x.py", f"--hub_token={TOKEN}"], ["x.py", "--hub_token=***"]),
    (["x.py", "--hub_tok", TOKEN, "--hub_model_id", "me/dog"], ["x.py", "--hub_tok", "***", "--hub_model_id", "me/dog"]),
    (["x.py", "--hub_model_id", "--hub_token"], ["x.py", "--hub_model_id", "--hub_token"]),  # a value, not the flag
])
def test_secret_values_are_redacted_in_every_spelling_argparse_accepts(argv, expected):
    assert cli.redact_argv(argv) == expected


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, tiny_model, photos, hf_home):
    """A run given the token on the command line, with both trackers, checkpoints, an export and validation images."""
    from conftest import ROOT, script_env
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("secret") / "run"
    args = train_args(tiny_model, photos, out, "--hub_token", TOKEN, "--report_to", "all", "--max_train_steps", 2,
                      "--checkpointing_steps", 1, "--export_steps", 2, "--validation_prompt", "a photo of sks dog",
                      "--num_validation_images", 1, "--validation_inference_steps", 2, "--lora_rank", 2)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", ROOT / "train_dreambooth.py",
                           *map(str, args)], cwd=ROOT, env=script_env(hf_home), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_the_token_is_in_no_file_of_the_run_and_no_printed_line(token_run):
    out, proc = token_run
    written = {p.relative_to(out).parts[0] for p in out.rglob("*") if p.is_file()}
    # the places a token used to reach are all there, so the search below covers them
    assert {"run_config.json", "checkpoint-1", "checkpoint-2", "export-2", "logs", "wandb", "validation"} <= written
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")) and list(out.rglob("events.out.tfevents.*"))
    assert files_holding(out) == []
    assert TOKEN not in proc.stdout + proc.stderr
    assert "--hub_token on the command line stays in your shell history" in proc.stderr
    record = json.loads((out / "run_config.json").read_text())
    assert record["config"]["hub_token"] == "***" and "--hub_token '***'" in record["command"]
    assert json.loads((out / "checkpoint-1" / "run_config.json").read_text())["config"]["hub_token"] == "***"


def test_the_hub_upload_carries_the_result_and_no_file_with_the_token(token_run, monkeypatch):
    """The push without the network: what upload_folder is asked to send, read with huggingface_hub's own filter."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    out, _ = token_run
    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.update(repo=(repo_id, kw)) or
                        huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.update(upload=kw))
    export.push_to_hub(out, "me/sks-dog", TOKEN)
    upload = calls["upload"]
    assert calls["repo"][1]["token"] == TOKEN and upload["token"] == TOKEN  # the token is still used for the Hub calls
    assert upload["folder_path"] == out and upload["repo_id"] == "me/sks-dog"
    every_file = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    uploaded = list(filter_repo_objects(every_file, ignore_patterns=upload["ignore_patterns"]))
    assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "run_config.json",
            "README.md", "validation/step-000002.png", "code/train_dreambooth.py"} <= set(uploaded)
    assert not [f for f in uploaded if f.split("/")[0] in ("logs", "wandb") or f.startswith(("checkpoint-", "export-"))]
    assert len(uploaded) < len(every_file)
    assert not [f for f in uploaded if TOKEN.encode() in (out / f).read_bytes()]

    leaky = out / "notes.txt"  # a file of the user's that holds the token is refused before any Hub call
    leaky.write_text(f"my token: {TOKEN}\n")
    calls.clear()
    with pytest.raises(SystemExit) as e:
        export.push_to_hub(out, "me/sks-dog", TOKEN)
    assert str(e.value) == f"error: not pushing {out}: notes.txt holds the Hub token in plain text (delete the file, revoke the token)"
    assert calls == {}
    leaky.unlink()


def test_export_publishes_a_finished_run_from_the_shell(token_run, monkeypatch, tmp_path, capsys):
    import huggingface_hub

    out, _ = token_run
    calls = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: huggingface_hub.RepoUrl(
        f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.update(upload=kw))
    export.main([str(out), "--push_to_hub", "--hub_model_id", "me/sks-dog", "--hub_token", TOKEN])
    assert calls["upload"]["repo_id"] == "me/sks-dog" and calls["upload"]["token"] == TOKEN
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"] and "logs/*" in calls["upload"]["ignore_patterns"]
    assert "pushed" in capsys.readouterr().out
    unfinished = tmp_path / "unfinished"  # a run that died before its first save
    unfinished.mkdir()
    shutil.copy(out / "run_config.json", unfinished)
    for folder, message in ((tmp_path, f"{tmp_path} is not a training output folder or an export of one"),
                            (unfinished, f"{unfinished} holds no finished result yet")):
        with pytest.raises(SystemExit) as e:
            export.main([str(folder), "--push_to_hub"])
        assert str(e.value).startswith(f"error: {message}")
    with pytest.raises(SystemExit) as e:
        export.main([str(out)])
    assert str(e.value) == "error: nothing to do: give --single_file, --kohya or --push_to_hub"


def test_resuming_a_run_recorded_by_an_older_version_redacts_its_records(token_run, run, tiny_model, photos, tmp_path):
    """Before the fix, run_config.json held the token in its config and command line: the resumed run must neither
    copy it out nor leave it there."""
    old, _ = token_run
    out = tmp_path / "run"
    shutil.copytree(old / "checkpoint-1", out / "checkpoint-1")
    for path in (out / "checkpoint-1" / "run_config.json", out / "run_config.json"):
        record = json.loads((old / "checkpoint-1" / "run_config.json").read_text())
        record["config"]["hub_token"] = TOKEN
        record["command"] = record["command"].replace("'***'", TOKEN)
        path.write_text(json.dumps(record))
    assert len(files_holding(out)) == 2
    proc = run("train_dreambooth.py", *train_args(tiny_model, photos, out, "--max_train_steps", 2, "--lora_rank", 2,
                                                  "--report_to", "all", "--resume_from_checkpoint", "latest"))
    assert "at step 1" in proc.stdout and "redacted a Hub token that an older version wrote into 2 run record(s)" in proc.stderr
    assert files_holding(out) == [] and TOKEN not in proc.stdout + proc.stderr
    assert json.loads((out / "checkpoint-1" / "run_config.json").read_text())["config"]["hub_token"] == "***"


def test_the_model_card_parses_and_says_how_to_load_the_result(token_run, tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    out, _ = token_run
    card = ModelCard.load(out / "README.md")  # written by the run, parsed by huggingface_hub
    assert card.data.library_name == "diffusers" and card.data.instance_prompt == "a photo of sks dog"
    assert {"dreambooth", "lora", "stable-diffusion", "text-to-image"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no hub id; the text names it
    assert f"LoRA (rank 2, alpha 2) of the UNet2DConditionModel of `{tiny_model}`, without prior preservation" in card.text
    assert "pipe.load_lora_weights(" in card.text and "![validation images at step 2](validation/step-000002.png)" in card.text
    # a hub base model: its id in the metadata; an SDXL full fine-tune
    config = json.loads((out / "run_config.json").read_text())["config"]
    config.update(pretrained_model_name_or_path="stabilityai/stable-diffusion-xl-base-1.0", model_family="sdxl",
                  lora_rank=0, train_text_encoder=True)
    card = ModelCard(str(export.model_card(out, config)))
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "stable-diffusion-xl" in card.data.tags and "lora" not in card.data.tags
    assert "StableDiffusionXLPipeline.from_pretrained(\"THIS_REPO_OR_FOLDER\"" in card.text
    assert "full fine-tune of the UNet2DConditionModel and text_encoder, text_encoder_2" in card.text
    (tmp_path / "README.md").write_text("---\nlicense: openrail++\n---\n# a base model\n")
    assert export.base_license(str(tmp_path)) == "openrail++"  # the base model's license, from its own card
