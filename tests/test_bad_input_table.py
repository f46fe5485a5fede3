"""Bad input, table-driven: each row is an input to one script, the one line it must print, its exit code, and that
nothing was written. Every row that can be checked before a model loads is checked then, so these run in-process in
milliseconds. Numeric flags declare their range with the flag (cli.number): the command line and
--config go through the same check, and a new numeric flag without a range fails the test below."""

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import families
import imagedata
import export
import generate_priors
import infer
import train_dreambooth

SCRIPTS = {"train": train_dreambooth, "priors": generate_priors, "infer": infer, "export": export}


def outcome(script, argv, capsys):
    """(exit code, the one line printed) of main(argv)."""
    with pytest.raises(SystemExit) as e:
        SCRIPTS[script].main([str(a) for a in argv])
    code, err = e.value.code, capsys.readouterr().err
    if isinstance(code, str):  # du.fail: the message is the exit value, and the process exits 1
        return 1, code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


@pytest.fixture
def base(tiny_model, photos, tmp_path):
    """Valid arguments of each script; a row adds or replaces flags."""
    out, lora_run = tmp_path / "out", tmp_path / "lora-run"  # a finished LoRA run, as far as export.py looks
    lora_run.mkdir()
    (lora_run / "run_config.json").write_text('{"config": {}}')
    (lora_run / families.LORA_WEIGHTS).write_bytes(b"adapters")
    return out, {
        "train": ["--model", tiny_model, "--instance_dir", photos, "--instance_prompt", "a photo of sks dog",
                  "--output_dir", out, "--resolution", 64],
        "priors": ["--model", tiny_model, "--class_prompt", "a photo of dog", "--class_dir", out],
        "infer": ["--model", tiny_model, "--prompt", "a photo of sks dog", "--output_dir", out],
        "export": [lora_run],
    }


ROWS = [  # script, extra flags, exit code, the line
    ("train", ["--max_train_steps", 0], 2, "error: argument --max_train_steps: must be at least 1, got 0"),
    ("train", ["--max_train_steps", -1], 2, "error: argument --max_train_steps: must be at least 1, got -1"),
    ("train", ["--num_train_epochs", 0], 2, "error: argument --num_train_epochs: must be at least 1, got 0"),
    ("train", ["--learning_rate", -1], 2, "error: argument --learning_rate: must be more than 0, got -1"),
    ("train", ["--learning_rate", "nan"], 2, "error: argument --learning_rate: must be a finite number, got nan"),
    ("train", ["--dataloader_num_workers", -1], 2, "error: argument --dataloader_num_workers: must be at least 0, got -1"),
    ("train", ["--resolution", 63], 2, "error: argument --resolution: must be a multiple of 8, got 63"),
    ("train", ["--caption_dropout", 1.5], 2, "error: argument --caption_dropout: must be at most 1, got 1.5"),
    ("train", ["--adam_beta1", 1], 2, "error: argument --adam_beta1: must be less than 1, got 1"),
    ("train", ["--seed", -1], 2, "error: argument --seed: must be at least 0, got -1"),
    ("train", ["--train_batch_size", "two"], 2, "error: argument --train_batch_size: expected an integer, got 'two'"),
    ("train", ["--rank", -4], 2, "error: argument --lora_rank/--rank: must be at least 0, got -4"),
    ("train", ["--save_single_file", "--rank", 4], 1,
     "error: --save_single_file writes a whole model: a LoRA run's file for the web UIs is its kohya file (FLUX.1 and "
     "SD 3.5: pytorch_lora_weights.safetensors itself)"),
    ("train", ["--use_dora"], 1, "error: --use_dora needs --lora_rank: DoRA is a kind of LoRA adapter"),
    ("train", ["--aspect_ratio_buckets", "100000,100000"], 1, "error: --aspect_ratio_buckets 100000,100000 is "
     "2,441,406 times --resolution 64's area: buckets are shapes of about that area (at most 4 times)"),
    ("train", ["--use_8bit_adam", "--optimizer", "prodigy"], 1,
     "error: --use_8bit_adam is AdamW in 8 bits: not with --optimizer prodigy (give one of them)"),
    ("train", ["--train_text_encoder_frac", 0.5], 1,
     "error: --train_text_encoder_frac needs --train_text_encoder or --train_text_encoder_ti"),
    ("train", ["--train_text_encoder_frac", 0], 2,
     "error: argument --train_text_encoder_frac/--train_text_encoder_ti_frac: must be more than 0, got 0"),
    ("train", ["--train_text_encoder_ti", "--train_text_encoder"], 1, "error: give one of --train_text_encoder (the "
     "text encoders' weights) and --train_text_encoder_ti (new tokens)"),
    ("train", ["--train_text_encoder_ti", "--token_abstraction", "zwx"], 1, "error: --token_abstraction 'zwx' is not "
     "a word of --instance_prompt 'a photo of sks dog': give the identifier, e.g. --token_abstraction sks"),
    ("train", ["--optimizer", "prodigy", "--text_encoder_lr", 0.5], 1,
     "error: --optimizer prodigy takes one learning rate for all parameters: leave out --text_encoder_lr"),
    ("export", ["--single_file"], 1, "error: --single_file writes a whole model, and {lora} holds LoRA adapters: their "
                                     "file for the web UIs is pytorch_lora_weights_kohya.safetensors"),
    ("export", ["--kohya"], 1, "error: the run config of {lora} names no model family this version knows (None)"),
    ("priors", ["--resolution", 63], 2, "error: argument --resolution: must be a multiple of 8, got 63"),
    ("priors", ["--resolution", 0], 2, "error: argument --resolution: must be at least 8, got 0"),
    ("priors", ["--class_prompt", " "], 1, "error: --class_prompt is empty (e.g. 'a photo of dog')"),
    ("infer", ["--height", 50], 2, "error: argument --height: must be a multiple of 8, got 50"),
    ("infer", ["--width", 0], 2, "error: argument --width: must be at least 8, got 0"),
    ("infer", ["--device", "foo"], 1, "error: --device foo is not a device: auto, cpu, cuda, cuda:N or mps"),
    ("infer", ["--image_index", -1], 2, "error: argument --image_index: must be at least 0, got -1"),
    ("infer", ["--seedd", 3], 2, "error: unrecognized arguments: --seedd 3 (did you mean --seed?)"),
]


@pytest.mark.parametrize("script, extra, code, line", ROWS, ids=[f"{r[0]} {' '.join(map(str, r[1]))}" for r in ROWS])
def test_a_bad_flag_value_is_one_line_before_anything_loads(base, capsys, script, extra, code, line):
    out, argv = base
    line = line.format(lora=argv["export"][0])
    assert outcome(script, argv[script] + extra, capsys) == (code, line + (f"; see {SCRIPTS[script].__name__}.py --help"
                                                                           if code == 2 else ""))
    assert not out.exists()


def test_lora_scale_without_lora_is_noted(base, capsys):
    out, argv = base
    with pytest.raises(SystemExit):  # the device check after the note stops it before a model loads
        infer.main([str(a) for a in argv["infer"] + ["--lora_scale", 0.5, "--device", "foo"]])
    assert "note: --lora_scale has no effect without LoRA adapters" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_cuda_device_without_cuda(base, capsys):
    out, argv = base
    assert outcome("infer", argv["infer"] + ["--device", "cuda"], capsys) == (
        1, "error: --device cuda: 0 CUDA GPU(s) are visible here")


CONFIG_ROWS = [  # YAML text, the message after "config file PATH: "
    ("train_batch_size: 2.7", "bad value 2.7 for train_batch_size: expected an integer, got '2.7'"),
    ("resolution: 64.9", "bad value 64.9 for resolution: expected an integer, got '64.9'"),
    ("resolution: true", "bad value True for resolution: expected an integer, got 'True'"),
    ("learning_rate: [1, 2]", "bad value [1, 2] for learning_rate: expected one value"),
    ("learning_rate: -1", "bad value -1 for learning_rate: must be more than 0, got -1"),
    ("validation_prompt: 5", "bad value 5 for validation_prompt: expected text"),
    ("instance_prompt: {a: 1}", "bad value {'a': 1} for instance_prompt: expected text"),
]


@pytest.mark.parametrize("text, message", CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS])
def test_a_config_value_passes_the_checks_of_the_command_line(base, capsys, tmp_path, text, message):
    out, argv = base
    config = tmp_path / "run.yaml"
    config.write_text(text + "\n")
    assert outcome("train", argv["train"] + ["--config", config], capsys) == (1, f"error: config file {config}: {message}")
    assert not out.exists()


def test_every_numeric_flag_declares_its_range(capsys):
    for name, module in SCRIPTS.items():
        for action in module.build_parser()._actions:
            if action.type in (int, float):
                raise AssertionError(f"{name}: --{action.dest} is a bare {action.type.__name__}: give it a range")


def test_output_locations_that_cannot_be_written(base, capsys, tmp_path):
    out, argv = base
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for script, flag in (("train", "--output_dir"), ("infer", "--output_dir"), ("priors", "--class_dir")):
        what = "class folder" if script == "priors" else flag
        assert outcome(script, argv[script] + [flag, a_file, "--overwrite_output_dir"] * (script == "train") +
                       ([flag, a_file] if script != "train" else []), capsys) == (
            1, f"error: {what} is a file, not a folder: {a_file}")
        assert outcome(script, argv[script] + [flag, "/sys/dreambooth-out"], capsys) == (
            1, f"error: cannot write {what} /sys/dreambooth-out: Operation not permitted (/sys)")
    assert a_file.read_text() == "mine"
    assert outcome("train", argv["train"] + ["--output_dir", tmp_path / "runs" / "$NOPE_VAR"], capsys) == (
        1, "error: --output_dir uses $NOPE_VAR, which is not set")
    assert not (tmp_path / "runs").exists()


def test_a_caption_that_is_not_utf8_is_named(base, capsys, tmp_path, photos):
    out, argv = base
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    (folder / "photo_1.txt").write_bytes("a photo of sks dog, caf\u00e9".encode("latin-1"))
    code, line = outcome("train", argv["train"] + ["--instance_dir", folder], capsys)
    assert (code, line) == (1, f"error: cannot read caption {folder / 'photo_1.txt'}: unexpected end of data "
                               "(captions are UTF-8 text)")


def fake_checkpoint(folder, **files):
    """The files of a one-process checkpoint, each valid enough to pass the check but for the ones given."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"unet.w": torch.zeros(2)}, folder / "model.safetensors")
    torch.save({}, folder / "random_states_0.pkl")
    for name in ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl"):
        (folder / name).write_bytes(b"x")
    (folder / "run_config.json").write_text(json.dumps({"config": {"num_processes": 1}}))
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_bytes(data)
    return folder


def test_a_damaged_checkpoint_file_is_named(base, capsys, tmp_path):
    out, argv = base
    empty_rng = fake_checkpoint(tmp_path / "a" / "checkpoint-2", random_states_0__pkl=b"")
    assert outcome("train", argv["train"] + ["--resume_from_checkpoint", empty_rng], capsys) == (
        1, f"error: {empty_rng / 'random_states_0.pkl'} is damaged (empty): resume from another checkpoint")
    truncated = fake_checkpoint(tmp_path / "b" / "checkpoint-2")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    for script in ("train", "infer"):
        flags = ["--resume_from_checkpoint", truncated] if script == "train" else ["--model", truncated]
        code, line = outcome(script, argv[script] + flags, capsys)
        assert code == 1 and line.startswith(f"error: {truncated / 'model.safetensors'} is damaged (")
    assert not out.exists()


def test_a_single_file_that_is_no_model(base, capsys, tmp_path):
    out, argv = base
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"not a checkpoint")
    code, line = outcome("train", argv["train"] + ["--model", junk], capsys)
    assert code == 1 and line.startswith(f"error: cannot read the single-file model {junk}: ")
    assert not out.exists()


def test_a_bare_checkpoint_name_is_found_in_the_output_dir(base, tmp_path):
    """diffusers' script takes `--resume_from_checkpoint checkpoint-N` relative to --output_dir"""
    out, argv = base
    fake_checkpoint(out / "checkpoint-2")
    args = train_dreambooth.parse_args([str(a) for a in argv["train"] + ["--resume_from_checkpoint", "checkpoint-2"]])
    train_dreambooth.check_args(args)
    assert args.resume_from_checkpoint == str(out / "checkpoint-2")


def test_a_full_disk_is_one_line(capsys):
    def main():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/.save.tmp/unet")

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == ("error: no space left on the device while writing /data/run/.save.tmp/unet: free some "
                            "space and run again")


def test_a_full_disk_reported_by_safetensors_is_one_line():
    """safetensors raises its own error type when the disk fills (its text carries the OS error), not an OSError."""
    from safetensors import SafetensorError

    def main():
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    with pytest.raises(SystemExit) as e:
        cli.run(main)
    assert e.value.code == "error: no space left on the device while writing a .safetensors file: free some space and run again"

    def other():
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")

    with pytest.raises(SafetensorError):  # any other safetensors error is not a full disk
        cli.run(other)


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", np.array([[0, 32768, 65535]], dtype=np.uint16), [0, 128, 255]),  # a 16-bit PNG, scaled (not white)
    ("F", np.array([[0.0, 0.5, 1.0]], dtype=np.float32), [0, 128, 255]),  # a float TIFF in [0, 1] (not black)
])
def test_deep_images_are_scaled_not_clipped(tmp_path, mode, values, expected):
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == mode
    assert np.asarray(imagedata.load_image(path))[0, :, 0].tolist() == expected


def test_a_float_image_out_of_any_range_is_refused(tmp_path):
    path = tmp_path / "hdr.tif"
    Image.fromarray(np.array([[0.0, 1e6]], dtype=np.float32)).save(path)
    with pytest.raises(SystemExit, match=f"cannot read image {path}: its F values run from 0 to 1e\\+06"):
        imagedata.list_images(tmp_path, "instance image")


def test_transparent_pixels_are_white_and_noted(tmp_path, capsys):
    cut_out = np.zeros((4, 4, 4), dtype=np.uint8)
    cut_out[:2] = (200, 30, 30, 255)  # the subject, opaque; the rest transparent
    Image.fromarray(cut_out, "RGBA").save(tmp_path / "cut-out.png")
    imagedata.list_images(tmp_path, "instance image")
    assert "1 image(s) in" in capsys.readouterr().err
    rgb = np.asarray(imagedata.load_image(tmp_path / "cut-out.png"))
    assert rgb[0, 0].tolist() == [200, 30, 30] and rgb[3, 3].tolist() == [255, 255, 255]


def test_resuming_with_another_model_names_both(run, tiny_model, tiny_sdxl, photos, tmp_path):
    from test_train import train_args

    out = tmp_path / "run"
    run("train_dreambooth.py", *train_args(tiny_model, photos, out, "--max_train_steps", 1, "--checkpointing_steps", 1,
                                           "--report_to", "none"), launch=False)
    proc = run("train_dreambooth.py", *train_args(tiny_sdxl, photos, out, "--max_train_steps", 2, "--report_to", "none",
                                                  "--resume_from_checkpoint", "latest"), launch=False, check=False)
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: checkpoint {out / 'checkpoint-1'} was made from the model {tiny_model}, not "
                           f"{tiny_sdxl}: resume with that model (")


def test_data_options_that_make_no_sense_are_one_line(base, capsys, tmp_path, photos):
    """A concepts list that is not a list or names a missing folder, a mask of the wrong shape, buckets that are no
    sizes, a concepts list beside the flags it replaces: one line each, before anything loads, nothing written."""
    out, argv = base
    train = [a for a in argv["train"] if a not in ("--instance_dir", photos, "--instance_prompt", "a photo of sks dog")]
    concepts = tmp_path / "concepts.json"
    concepts.write_text('{"instance_prompt": "a photo of sks dog"}')
    assert outcome("train", train + ["--concepts_list", concepts], capsys) == (1, (
        f"error: --concepts_list {concepts} must be a non-empty list of subjects ({{instance_prompt, instance_data_dir, "
        "class_prompt, class_data_dir}), not dict"))
    concepts.write_text(json.dumps([{"instance_prompt": "a photo of sks dog", "instance_data_dir": str(photos)},
                                    {"instance_prompt": "a photo of zwx cat", "instance_data_dir": str(tmp_path / "nope")}]))
    assert outcome("train", train + ["--concepts_list", concepts], capsys) == (
        1, f"error: instance image folder not found: {tmp_path / 'nope'}")
    assert outcome("train", argv["train"] + ["--concepts_list", concepts], capsys) == (
        1, "error: --concepts_list names each subject's folders and prompts: leave out --instance_dir, --instance_prompt")
    assert outcome("priors", ["--model", argv["train"][1], "--concepts_list", concepts], capsys) == (
        1, f"error: --concepts_list {concepts}: subject 0 needs class_prompt, class_data_dir (prior preservation is on)")
    folder = tmp_path / "masked"
    shutil.copytree(photos, folder)
    Image.new("L", (10, 30), 255).save(folder / "photo_1.mask.png")
    assert outcome("train", argv["train"] + ["--instance_dir", folder], capsys) == (
        1, f"error: mask {folder / 'photo_1.mask.png'} is 10x30 and its photo 72x72: a mask has its photo's shape (at any size)")
    code, line = outcome("train", argv["train"] + ["--aspect_ratio_buckets", "64x64"], capsys)
    assert (code, line) == (2, "error: argument --aspect_ratio_buckets: expected 'height,width;height,width;...' in "
                               "multiples of 8, got '64x64'; see train_dreambooth.py --help")
    assert not out.exists()


def test_a_named_pipe_among_the_photos_is_skipped_not_opened(tmp_path, photos, capsys):
    """Opening a FIFO to read it as an image blocks until a writer comes: never, at start-up."""
    import os

    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    os.mkfifo(folder / "stream.png")
    assert [p.name for p in imagedata.list_images(folder, "instance image")] == sorted(
        p.name for p in folder.iterdir() if p.name != "stream.png")
    err = capsys.readouterr().err
    assert "skipping 1 non-image file(s)" in err and "stream.png" in err


def test_a_prompts_file_with_a_byte_order_mark_reads_the_prompt_as_typed(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark: it must not become part of the first prompt."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa photo of sks dog\nsks dog on the moon\n".encode("utf-8"))
    args = infer.parse_args(["--model", "x", "--prompts_file", str(path)])
    assert infer.read_prompts(args) == ["a photo of sks dog", "sks dog on the moon"]


def test_a_model_file_with_an_upper_case_extension_is_a_single_file(tmp_path, capsys):
    path = tmp_path / "MODEL.SAFETENSORS"
    path.write_bytes(b"not safetensors at all")
    code, line = outcome("train", ["--model", path, "--instance_dir", tmp_path, "--instance_prompt", "a sks dog",
                                   "--output_dir", tmp_path / "out"], capsys)
    assert code == 1 and line.startswith(f"error: cannot read the single-file model {path}")


@pytest.mark.parametrize("change, line", [
    ({"lora_rank": 4}, "--lora_rank 4: the checkpoint was made with 0"),
    ({"use_ema": True}, "--use_ema True: the checkpoint was made with False"),
    ({"optimizer": "prodigy"}, "--optimizer 'prodigy': the checkpoint was made with 'adamw'"),
    ({"train_text_encoder": True}, "--train_text_encoder True: the checkpoint was made with False"),
])
def test_a_resume_that_changes_the_saved_states_shape_is_refused_before_loading(change, line):
    """Adding EMA, LoRA <-> full, another optimizer, a text encoder: the checkpoint's state cannot load into that run.
    Refused in one line naming both values, before anything loads (not a library error mid-load)."""
    import argparse

    saved = {"model_family": "sd", "pretrained_model_name_or_path": "sd-base", "lora_rank": 0, "use_dora": False, "lora_target_modules": ["to_k"],
             "train_text_encoder": False, "train_text_encoder_ti": False, "num_new_tokens_per_abstraction": 2,
             "optimizer": "adamw", "use_ema": False}
    args = argparse.Namespace(**{**saved, **change}, resume_from_checkpoint="out/checkpoint-4", max_train_steps=8)
    with pytest.raises(SystemExit) as e:
        train_dreambooth.check_resume_structure(args, saved)
    assert e.value.code == (f"error: cannot resume out/checkpoint-4 with {line}, and its saved state has that shape "
                            "(resume with the same value, or start a new run)")
    args = argparse.Namespace(**saved, resume_from_checkpoint="out/checkpoint-4", max_train_steps=3)
    with pytest.raises(SystemExit) as e:  # not "saved" with step 4's weights under a record of 3 steps
        train_dreambooth.check_resume_structure(args, saved)
    assert e.value.code == ("error: cannot resume out/checkpoint-4 with --max_train_steps 3: the checkpoint is at step 4, "
                            "past it (give at least 4 steps, or start a new run)")
    for steps in (4, 6):  # the same settings: a finished run restarted by the same command, or more steps
        train_dreambooth.check_resume_structure(argparse.Namespace(**saved, resume_from_checkpoint="out/checkpoint-4",
                                                                   max_train_steps=steps), saved)


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_stale_lock_is_not(base, capsys):
    """One run per output folder: while one holds it (here this test, through the same lock), another stops in one
    line naming the holder, whatever the folder holds; once the holder is gone (a crashed run's file left behind) a
    run starts there, and on its way out it takes the file and the folder it made with it."""
    import fcntl

    import runs

    out, argv = base
    out.mkdir()
    with open(out / runs.LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("process 4242 on elsewhere\n")
        held.flush()
        for extra in ([], ["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]):
            (out / "run_config.json").write_text("{}")  # whatever the running run has written so far
            assert outcome("train", argv["train"] + extra, capsys) == (
                1, f"error: {out} is in use by another training run (process 4242 on elsewhere): wait for it to end, "
                   "or give another --output_dir")
    (out / "run_config.json").unlink()
    assert [p.name for p in out.iterdir()] == [runs.LOCK]  # stale: nobody holds it
    runs.check_output_dir_free(out)  # no error
    (out / runs.LOCK).unlink()
    out.rmdir()


def test_the_run_holds_its_folder_and_lets_it_go(tmp_path):
    """hold_output_dir in this process: the holder's line in the file, a second taker refused, and at exit (here
    called by hand) the file removed and the folder it made too, when nothing else was written."""
    import os
    from types import SimpleNamespace

    import runs

    folder = tmp_path / "run"
    runs.hold_output_dir(SimpleNamespace(is_main_process=True, num_processes=1), folder)
    assert (folder / runs.LOCK).read_text().startswith(f"process {os.getpid()} on ")
    assert runs.take_lock(folder)[0] is None  # another open of the file: another run
    runs.check_output_dir_free(folder)  # this process's own run may start again (tests run main() in turn)
    runs.release_output_dir(folder)
    assert not folder.exists()


@pytest.mark.parametrize("extra, line", [
    (["--ema_decay", 0.9, "--ema_warmup"], "--ema_decay, --ema_warmup have no effect without --use_ema: ignored"),
    (["--lora_alpha", 8, "--lora_dropout", 0.1], "--lora_alpha, --lora_dropout have no effect without --lora_rank: "
                                                 "ignored"),
    (["--text_encoder_lr", 1e-5], "--text_encoder_lr has no effect without --train_text_encoder or "
                                  "--train_text_encoder_ti: ignored"),
    (["--initializer_concept", "dog", "--num_new_tokens_per_abstraction", 3],
     "--num_new_tokens_per_abstraction, --initializer_concept have no effect without --train_text_encoder_ti: ignored"),
    (["--prodigy_decouple", "false"], "--prodigy_decouple has no effect without --optimizer prodigy: ignored"),
    (["--class_prompt", "a photo of dog", "--prior_loss_weight", 0.5],
     "--class_prompt, --prior_loss_weight have no effect without --with_prior_preservation: ignored"),
    (["--validation_steps", 10], "--validation_steps has no effect without --validation_prompt: ignored"),
    (["--optimizer", "prodigy", "--learning_rate", 5e-6], "--optimizer prodigy with --learning_rate 5e-06: Prodigy "
     "estimates the step size itself and the learning rate scales it (1.0 is its default; 0.1-1 the usual range), so "
     "this run will barely move"),
])
def test_a_flag_without_the_flag_it_needs_is_noted(base, capsys, extra, line):
    """The dependencies declared beside the parser (train_dreambooth.NEEDS): a note at start-up, before anything
    loads, naming the flags and what they need."""
    out, argv = base
    train_dreambooth.check_args(train_dreambooth.parse_args([str(a) for a in argv["train"] + extra]))
    assert "note: " + line in capsys.readouterr().err.splitlines()


def test_every_needed_flag_exists_and_the_defaults_draw_no_note(base, capsys):
    out, argv = base
    flags = {a.dest for a in train_dreambooth.build_parser()._actions}
    assert set(train_dreambooth.NEEDS) <= flags
    train_dreambooth.check_args(train_dreambooth.parse_args([str(a) for a in argv["train"]]))
    assert "no effect" not in capsys.readouterr().err


def test_a_negative_prompt_no_guidance_reads_is_noted_and_not_recorded(tiny_model, tmp_path, capsys):
    infer.main([str(a) for a in ("--model", tiny_model, "--prompt", "a photo of dog", "--negative_prompt", "blurry",
                                 "--guidance_scale", 1, "--num_inference_steps", 1, "--num_images_per_prompt", 1,
                                 "--output_dir", tmp_path, "--device", "cpu")])
    assert ("note: --negative_prompt has no effect on a StableDiffusionPipeline at --guidance_scale 1 (no "
            "classifier-free guidance pass reads it): not used, nor recorded") in capsys.readouterr().err.splitlines()
    (image,) = tmp_path.glob("*.png")
    with Image.open(image) as im:
        assert json.loads(im.text["dreambooth"])["negative_prompt"] is None
        assert "Negative prompt" not in im.text["parameters"]


def test_class_folders_are_outputs_never_photo_folders(base, capsys, tmp_path, photos):
    """A class folder that is a subject's photo folder (directly, through a concepts list, through generate_priors.py's
    list, spelled another way) is refused before anything is generated into it; one class folder spelled two ways is
    still one folder, for one class prompt."""
    out, argv = base
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 2]
    line = (1, f"error: class folder {{}} is the photo folder {photos}: class images are generated into it; give them "
               "a folder of their own")
    for spelling in (photos, f"{photos}/", f"{photos}/../{Path(photos).name}"):
        assert outcome("train", argv["train"] + prior + ["--class_dir", spelling], capsys) == (
            line[0], line[1].format(spelling))
    other = tmp_path / "other-photos"
    shutil.copytree(photos, other)
    concepts = [{"instance_prompt": "a photo of sks dog", "instance_data_dir": str(photos),
                 "class_prompt": "a photo of dog", "class_data_dir": str(tmp_path / "priors")},
                {"instance_prompt": "a photo of zwx dog", "instance_data_dir": str(other),
                 "class_prompt": "a photo of dog", "class_data_dir": str(photos)}]
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(concepts))
    train = [a for a in argv["train"] if a not in ("--instance_dir", photos, "--instance_prompt", "a photo of sks dog")]
    expected = (1, f"error: --concepts_list {path}: " + line[1].format(photos)[len("error: "):])
    assert outcome("train", train + ["--concepts_list", path, "--with_prior_preservation"], capsys) == expected
    assert outcome("priors", ["--model", argv["priors"][1], "--concepts_list", path], capsys) == expected
    assert sorted(p.name for p in Path(photos).iterdir()) == sorted(p.name for p in other.iterdir())  # nothing added
    concepts[1]["class_data_dir"] = str(tmp_path / "priors" / ".." / "priors")  # the first's, for another class
    concepts[1]["class_prompt"] = "a photo of cat"
    path.write_text(json.dumps(concepts))
    assert outcome("priors", ["--model", argv["priors"][1], "--concepts_list", path], capsys) == (
        1, f"error: --concepts_list {path}: class folder {concepts[1]['class_data_dir']} is given two class prompts "
           "('a photo of dog' and 'a photo of cat'): one folder per class")


def test_masks_are_found_in_any_case_and_unused_ones_named(base, capsys, tmp_path):
    """photo.MASK.PNG is photo.png's mask; a mask without its photo, masks in a class folder and a mask whose subject
    the centre crop cuts away are named at start-up; a mask made from an EXIF-turned photo's stored pixels is refused
    with the reason."""
    out, argv = base
    photos, priors = tmp_path / "photos", tmp_path / "priors"
    photos.mkdir()
    priors.mkdir()
    Image.new("RGB", (32, 32), "red").save(photos / "a.png")
    Image.new("L", (32, 32), 255).save(photos / "a.MASK.PNG")
    Image.new("RGB", (64, 32), "red").save(photos / "wide.png")
    edge = Image.new("L", (64, 32), 0)
    edge.paste(255, (0, 0, 8, 32))  # the subject at the left edge: a centre crop of 32x32 cuts it away
    edge.save(photos / "wide.mask.png")
    Image.new("L", (32, 32), 255).save(photos / "typo.mask.png")
    Image.new("RGB", (32, 32), "blue").save(priors / "0.png")
    Image.new("L", (32, 32), 255).save(priors / "0.mask.png")
    assert imagedata.find_mask(photos / "a.png") == photos / "a.MASK.PNG"
    args = train_dreambooth.parse_args([str(a) for a in (
        "--model", argv["train"][1], "--instance_dir", photos, "--instance_prompt", "a photo of sks dog",
        "--output_dir", out, "--resolution", 32, "--center_crop", "--with_prior_preservation", "--class_dir", priors,
        "--class_prompt", "a photo of dog", "--num_class_images", 1)])
    train_dreambooth.check_args(args)
    capsys.readouterr()
    (subject,) = train_dreambooth.load_subjects(args)
    assert [mask.name if mask else None for _, _, mask in subject] == ["a.MASK.PNG", "wide.mask.png"]
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        f"note: 1 mask(s) in {photos} have no photo of their name (photo.mask.png goes beside photo.jpg), not used: "
        "typo.mask.png",
        "note: the centre crop leaves none of the subject (the mask's white) in view in 1 photo(s): wide.png; their "
        "loss is only the background's (--mask_background_weight)",
        f"note: 1 mask(s) in {priors} are in a class folder (masks weigh the subject photos only), not used: 0.mask.png"]

    turned = tmp_path / "turned"
    turned.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x32, shown 32x48
    Image.new("RGB", (48, 32), "red").save(turned / "p.jpg", exif=exif)
    Image.new("L", (48, 32), 255).save(turned / "p.mask.png")
    with pytest.raises(SystemExit) as e:
        imagedata.find_mask(turned / "p.jpg")
    assert str(e.value) == (f"error: mask {turned / 'p.mask.png'} is 48x32 and its photo 32x48: a mask has its photo's "
                            f"shape (at any size); {turned / 'p.jpg'} is shown turned by its EXIF orientation: make the "
                            "mask from the photo as shown, upright")


def test_the_pivotal_identifier_is_a_whole_word_in_any_case_and_its_tokens_fit(base, capsys, tiny_model):
    """The identifier is replaced as a whole word, whatever its characters and case (CLIP lower-cases); an empty one
    is refused (it would match between every two words); new tokens that push the prompt past the text encoder's
    length are refused before anything loads."""
    from transformers import AutoTokenizer

    assert families.pivot_prompt("a photo of <sks> dog", "<sks>", ["<s0>", "<s1>"]) == "a photo of <s0><s1> dog"
    assert families.pivot_prompt("SKS, a photo of Sks dog; sksy", "sks", ["<s0>"]) == "<s0>, a photo of <s0> dog; sksy"
    out, argv = base
    ti = argv["train"] + ["--train_text_encoder_ti"]
    assert outcome("train", ti + ["--token_abstraction", ""], capsys) == (
        1, "error: --token_abstraction '': give the identifier word of the instance prompt, without spaces (e.g. sks)")
    tokens = len(AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")("a photo of  dog").input_ids) + 80
    assert outcome("train", ti + ["--num_new_tokens_per_abstraction", 80], capsys) == (
        1, f"error: with 80 new tokens (--num_new_tokens_per_abstraction) the prompt 'a photo of sks dog' is {tokens} "
           "tokens, past text_encoder's 77: the words after them would be cut off; use fewer tokens or a shorter prompt")
    assert not out.exists()


def test_a_photo_gone_during_training_is_one_line_and_the_rerun_starts_over(run, tiny_model, photos, tmp_path, capsys):
    """A photo deleted after the start-up checks: the step that reads it stops in one line naming it (through a
    DataLoader worker too), after the progress bar is closed; the folder then holds only the run's record, so the same
    command, once the photo is back, starts over there (with a note) instead of being refused."""
    folder, out = tmp_path / "photos", tmp_path / "out"
    shutil.copytree(photos, folder)
    args = ["--model", tiny_model, "--instance_dir", folder, "--instance_prompt", "a photo of sks dog", "--output_dir",
            out, "--resolution", 64, "--max_train_steps", 4, "--train_batch_size", 1, "--dataloader_num_workers", 1,
            "--report_to", "none"]
    gone = sorted(folder.iterdir())[0]
    kept = gone.read_bytes()
    # the photo goes after the checks: the first example read (in the DataLoader's worker) removes it
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nsys.path.insert(0, os.getcwd())\nimport imagedata\nread = imagedata.DreamBoothDataset.__getitem__\n"
        f"def first_read_removes(self, i):\n    os.path.exists({str(gone)!r}) and os.remove({str(gone)!r})\n"
        "    return read(self, i)\nimagedata.DreamBoothDataset.__getitem__ = first_read_removes\n")
    proc = run("train_dreambooth.py", *args, launch=False, check=False, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot read instance image {gone} during training (No such file or directory): it changed or went "
        "away since the start; put it back and run again (--resume_from_checkpoint latest continues from the last "
        "checkpoint)")
    assert sorted(p.name for p in out.iterdir()) == ["code", "run_config.json"]
    gone.write_bytes(kept)
    train_dreambooth.check_args(train_dreambooth.parse_args([str(a) for a in args]))  # the same command again
    assert f"note: {out} holds only the record of a run that saved nothing (no checkpoint, no weights): starting over " \
           "there" in capsys.readouterr().err.splitlines()
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("keys, what", [
    (["unet.down_blocks.0.attentions.0.proj_in.lora.down.weight"], "a LoRA file, not a model"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA file, not a model"),
    (["clip_l", "clip_g"], "a token-embeddings file (textual inversion), not a model"),
    (["emb_params"], "a token-embeddings file (textual inversion), not a model"),
    (["something.else"], "no model checkpoint (none of its keys is a model's)"),
])
def test_a_lora_or_embeddings_file_given_as_the_model_is_named(base, capsys, tmp_path, keys, what):
    from safetensors.torch import save_file

    out, argv = base
    path = tmp_path / "file.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, path)
    hint = "; infer.py takes the adapters with --lora" if "LoRA" in what else ""
    for script in ("train", "infer"):
        assert outcome(script, argv[script] + ["--model", path], capsys) == (
            1, f"error: {path} is {what}: give the base model (a diffusers folder, hub id or checkpoint file) as the "
               f"model{hint}")
    assert not out.exists()


def test_a_single_file_with_another_familys_config_and_a_checkpoint_to_export_are_named(base, capsys, tmp_path,
                                                                                        tiny_model, tiny_sdxl):
    import singlefile

    out, argv = base
    single = singlefile.save_single_file(tiny_model, tmp_path / "sd.safetensors", torch.float32)
    assert outcome("infer", argv["infer"] + ["--model", single, "--single_file_config", tiny_sdxl], capsys) == (
        1, f"error: sd.safetensors is a StableDiffusionPipeline checkpoint and --single_file_config {tiny_sdxl} a "
           "StableDiffusionXLPipeline: give the config of a model of the same family")
    checkpoint = tmp_path / "run" / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    (checkpoint / "run_config.json").write_text('{"config": {}}')
    (checkpoint / "random_states_0.pkl").write_bytes(b"state")
    assert outcome("export", [checkpoint], capsys) == (
        1, f"error: {checkpoint} is a training checkpoint (the state to resume from, not a pipeline): export the "
           "run's folder once it has finished, or an export-N folder (--export_steps saves pipelines of intermediate "
           "steps)")


@pytest.mark.parametrize("text, value", [("aspect_ratio_buckets: true", "auto"), ("aspect_ratio_buckets: false", None),
                                         ("aspect_ratio_buckets: '64,64;48,80'", "64,64;48,80")])
def test_a_flag_with_an_optional_value_is_true_in_a_config_file_as_the_bare_flag(base, tmp_path, text, value):
    out, argv = base
    config = tmp_path / "run.yaml"
    config.write_text(text + "\n")
    assert train_dreambooth.parse_args([str(a) for a in argv["train"] + ["--config", config]]).aspect_ratio_buckets == value


def test_the_data_plan_is_checked_as_a_whole(base, capsys, tmp_path, photos):
    """Notes at start-up: photos blown up past twice their size, one photo folder under two identifiers, subjects
    the run's steps never reach."""
    out, argv = base
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (24, 20), "red").save(small / "tiny.png")
    concepts = [{"instance_prompt": f"a photo of {t} dog", "instance_data_dir": str(photos)} for t in ("sks", "zwx")]
    concepts.append({"instance_prompt": "a photo of qrt dog", "instance_data_dir": str(small)})
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(concepts))
    train = [a for a in argv["train"] if a not in ("--instance_dir", photos, "--instance_prompt", "a photo of sks dog")]
    args = train_dreambooth.parse_args([str(a) for a in train + ["--concepts_list", path, "--max_train_steps", 1,
                                                                "--train_batch_size", 1]])
    train_dreambooth.check_args(args)
    subjects = train_dreambooth.load_subjects(args)
    vars(args).update(train_dreambooth.plan(args, 9, 1))
    capsys.readouterr()
    imagedata.note_data_plan(args.subjects, subjects, args.resolution, args.total_optimizer_steps,
                             args.global_batch_size)
    assert capsys.readouterr().err.splitlines() == [
        "note: 1 photo(s) are upscaled more than twice to the training size 64 (the smallest: tiny.png, 20 px on its "
        "short side): they train blurry; larger photos or a lower --resolution keep them sharp",
        f"note: the photos of {photos} are taught under 2 prompts (a photo of sks dog; a photo of zwx dog): one subject "
        "under two identifiers",
        "note: 1 step(s) of 1 photo(s) reach at most 1 of the 3 subjects: the others are never trained; give more "
        "--max_train_steps"]


def test_export_names_a_truncated_weight_file(capsys, tmp_path, tiny_model):
    run = tmp_path / "run"
    shutil.copytree(tiny_model, run)
    (run / "run_config.json").write_text('{"config": {"model_family": "sd"}}')
    weights = run / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, line = outcome("export", [run, "--single_file"], capsys)
    assert code == 1 and line.startswith(f"error: cannot read {weights}: ") and line.endswith(
        "(truncated or damaged: copy it again, or export another step)")
    assert not list(run.glob("*.safetensors"))
