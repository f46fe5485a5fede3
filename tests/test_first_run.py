"""What a new user meets first, checked as they would meet it: a mistyped model folder or flag, a hub id that cannot
be reached, the help of each script, and output free of warnings about things the suite never uses."""

import re
import subprocess
import sys
import time

import pytest

import export
import generate_priors
import infer
import train_dreambooth
from conftest import ROOT, script_env

SCRIPTS = {"train_dreambooth.py": train_dreambooth, "generate_priors.py": generate_priors, "infer.py": infer,
           "export.py": export}
ARGS = {"train_dreambooth.py": ["--instance_dir", "photos", "--instance_prompt", "a photo of sks dog"],
        "generate_priors.py": ["--class_prompt", "a dog", "--class_dir", "priors"],
        "infer.py": ["--prompt", "a photo of sks dog"]}
TYPOS = {"train_dreambooth.py": ("--seeed", "--seed"), "generate_priors.py": ("--seeed", "--seed"),
         "infer.py": ("--seeed", "--seed"), "export.py": ("--push_to_hb", "--push_to_hub")}


def shell(hf_home, script, *args, env=None, cwd=ROOT):
    """The script as a user runs it: plain python, stdout and stderr as text, and the seconds it took."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**script_env(hf_home), **(env or {})}, timeout=300)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("script", ARGS)
def test_a_mistyped_local_folder_is_named_at_once(hf_home, tmp_path, script):
    """"runs/sks-dgo" has a slash, so it could be a hub id; its first part is a folder here, so it is a typo."""
    (tmp_path / "runs").mkdir()
    proc, seconds = shell(hf_home, script, "--pretrained_model_name_or_path", "runs/sks-dgo", *ARGS[script],
                          env={"HF_HUB_OFFLINE": ""}, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == ["error: model folder not found: runs/sks-dgo"]
    assert seconds < 30  # no network retries (the imports alone take a few seconds)


def test_a_hub_id_when_the_hub_cannot_be_reached(hf_home):
    # a closed local port stands in for a machine without network
    proc, _ = shell(hf_home, "infer.py", "--model", "someone/sks-dog", "--prompt", "x",
                    env={"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: cannot reach the Hugging Face Hub to download someone/sks-dog: check the network, or give a local folder"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_mistyped_flag_gets_a_suggestion_not_the_usage(hf_home, script):
    typo, right = TYPOS[script]
    argv = ["--model", "x/y", *ARGS[script]] if script in ARGS else ["some-run"]
    proc, _ = shell(hf_home, script, *argv, typo, 3)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: unrecognized arguments: {typo} 3 (did you mean {right}?); see {script} --help"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_its_default_once(script, capsys):
    parser_owner = SCRIPTS[script]
    with pytest.raises(SystemExit):
        parser_owner.parse_args(["--help"])
    text = capsys.readouterr().out
    actions = parser_owner.build_parser()._actions
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    assert "(default: None)" not in text and "(default: False)" not in text
    if any(a.default == 0 and a.default is not False for a in actions):
        assert "(default: 0)" in text  # a default of 0 is a value, not "unset"
    for entry in re.split(r"\n  (?=-)", text):  # one option's help
        assert len(re.findall(r"\(default", entry)) <= 1, entry
    assert text.count(".") and "\n\n" in text
    description = text.split("\n\n")[1]
    assert description.rstrip().endswith((".", ")")), description  # a whole sentence, not a cut one


def test_no_warnings_about_what_the_suite_does_not_use(hf_home, tiny_model, tmp_path):
    proc, _ = shell(hf_home, "infer.py", "--model", tiny_model, "--prompt", "a photo of sks dog", "--num_images_per_prompt",
                    1, "--num_inference_steps", 2, "--height", 64, "--width", 64, "--output_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for text in ("requires torchvision", "gemm_4bit_forward", "local_dir_use_symlinks"):
        assert text not in proc.stderr
    # a bar of denoising steps that ends at its total: PNDM takes 3 steps when asked for 2, and the bar counts them
    assert re.search(r"sampling: 100%\|\S+\| 3/3 ", proc.stderr), proc.stderr[-500:]


def test_the_world_reader_on_bad_paths_and_grids(hf_home, tmp_path):
    for bad in (tmp_path, tmp_path / "nope.png"):
        proc, _ = shell(hf_home, "toyworld/world.py", "read", bad)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            f"error: cannot read image {bad}: {'Is a directory' if bad == tmp_path else 'No such file or directory'}"]
