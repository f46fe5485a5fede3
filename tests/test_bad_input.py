"""Bad input: one line that names the problem and the path, a non-zero exit, no traceback, nothing written."""

import shutil

import pytest

import train_dreambooth


def argv(args, *flags):
    return [x for kv in args.items() for x in kv] + list(flags)


def refuse(args, *flags):
    """Run main() and return its one-line error; the output folder must not have been created."""
    with pytest.raises(SystemExit) as e:
        train_dreambooth.main(argv(args, *flags))
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_missing_instance_folder(case):
    args, inst, out = case
    args["--instance_dir"] = str(inst / "nope")
    assert refuse(args) == f"error: instance image folder not found: {inst / 'nope'}"
    assert not out.exists()


def test_empty_instance_folder(case):
    args, inst, out = case
    shutil.rmtree(inst)
    inst.mkdir()
    assert refuse(args) == f"error: no images in instance folder {inst}"
    assert not out.exists()


def test_folder_of_non_images_is_skipped_then_empty(case, capsys):
    args, inst, out = case
    shutil.rmtree(inst)
    inst.mkdir()
    (inst / "readme.md").write_text("hello")
    assert refuse(args) == f"error: no images in instance folder {inst}"
    assert "readme.md" in capsys.readouterr().err
    assert not out.exists()


def test_corrupt_instance_image_is_named(case):
    args, inst, out = case
    (inst / "photo_2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert refuse(args).startswith(f"error: cannot read image {inst / 'photo_2.png'}")
    assert not out.exists()


def test_corrupt_class_image_is_named(case, tmp_path):
    args, inst, out = case
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "dog.jpg").write_bytes(b"\xff\xd8\xff garbage")
    message = refuse(args, "--with_prior_preservation", "--class_dir", str(tmp_path / "cls"), "--class_prompt", "a dog")
    assert message.startswith(f"error: cannot read image {tmp_path / 'cls' / 'dog.jpg'}")
    assert not out.exists()


def test_prior_preservation_needs_a_class_prompt(case, tmp_path):
    args, inst, out = case
    message = refuse(args, "--with_prior_preservation", "--class_dir", str(tmp_path / "cls"))
    assert "--with_prior_preservation needs --class_prompt" in message
    assert not out.exists() and not (tmp_path / "cls").exists()


def test_model_path_that_does_not_exist(case, tmp_path):
    args, inst, out = case
    args["--pretrained_model_name_or_path"] = str(tmp_path / "no-such-model")
    assert refuse(args) == f"error: model folder not found: {tmp_path / 'no-such-model'}"
    args["--pretrained_model_name_or_path"] = "no-such-model"
    assert refuse(args) == "error: model not found: no-such-model (neither a local folder nor a hub id like 'org/name')"
    assert not out.exists()


def test_model_folder_without_a_unet(case, tmp_path, tiny_model):
    args, inst, out = case
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    args["--pretrained_model_name_or_path"] = str(broken)
    assert refuse(args) == f"error: model folder {broken} has no unet or transformer subfolder: is it a diffusers pipeline folder?"
    assert not out.exists()


def test_hub_id_that_cannot_be_loaded_offline(case):
    args, inst, out = case
    args["--pretrained_model_name_or_path"] = "nobody-here/no-such-model"
    assert refuse(args) == ("error: nobody-here/no-such-model is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                            "is set: download it once with the network on, or give a local folder")
    assert not out.exists()


def test_xformers_that_cannot_run_is_refused(case):
    """No CUDA (here), or CUDA without xformers installed (the GPU check): one line, never a silent fallback."""
    import importlib.util

    import torch

    args, inst, out = case
    if torch.cuda.is_available() and importlib.util.find_spec("xformers"):
        pytest.skip("xformers is installed on this GPU machine: nothing to refuse")
    expected = "xformers does not import here" if torch.cuda.is_available() else "needs a CUDA GPU"
    assert expected in refuse(args, "--enable_xformers_memory_efficient_attention")
    assert not out.exists()


def test_instance_dir_and_dataset_name_conflict(case):
    args, inst, out = case
    assert "exactly one of --instance_dir, --dataset_name and --concepts_list" in refuse(args, "--dataset_name", "some/dataset")


def test_push_to_hub_without_a_login(case, monkeypatch, tmp_path):
    args, inst, out = case
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "--push_to_hub needs a Hugging Face login" in refuse(args, "--push_to_hub")
    assert not out.exists()


def test_non_empty_output_folder_is_not_overwritten(case):
    args, inst, out = case
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert refuse(args).startswith(f"error: output folder is not empty: {out}")
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"


def test_unknown_mixed_precision_is_an_argparse_error(case, capsys):
    args, inst, out = case
    with pytest.raises(SystemExit) as e:
        train_dreambooth.main(argv(args, "--mixed_precision", "fp8"))
    assert e.value.code == 2
    assert "argument --mixed_precision: invalid choice: 'fp8'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("launch", [False, True], ids=["python", "accelerate-launch-quiet"])
def test_the_error_reaches_the_shell_as_one_line(run, case, launch):
    args, inst, out = case
    args["--instance_dir"] = str(inst / "nope")
    # accelerate's launcher adds its own traceback for a failed child unless --quiet (-q) is given
    proc = run("train_dreambooth.py", *argv(args), launch=launch, quiet=True, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: instance image folder not found: {inst / 'nope'}"
    assert not out.exists()


def test_resume_from_a_missing_or_partial_checkpoint(case):
    args, inst, out = case
    assert refuse(args, "--resume_from_checkpoint", str(out / "nope")) == f"error: checkpoint not found: {out / 'nope'}"
    partial = out / "checkpoint-3"
    partial.mkdir(parents=True)
    (partial / "run_config.json").write_text("{}")
    message = refuse(args, "--resume_from_checkpoint", str(partial))
    assert message == (f"error: {partial} is not a complete training checkpoint (missing random_states_0.pkl, "
                       "custom_checkpoint_0.pkl, the trained weights)")
    assert [p.name for p in out.iterdir()] == ["checkpoint-3"]


def test_a_folder_with_checkpoints_points_to_resume(case):
    args, inst, out = case
    (out / "checkpoint-3").mkdir(parents=True)
    assert "pass --resume_from_checkpoint latest to continue it" in refuse(args)
