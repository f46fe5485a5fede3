"""The README stays true: its demo command runs, and every flag it shows exists."""

import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, script_env

import generate_priors
import infer
import train_dreambooth

ACCELERATE_FLAGS = {"--config_file", "--num_processes"}  # accelerate launch's own


def help_flags(module, capsys):
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return set(re.findall(r"--[a-z][a-z0-9_]+", capsys.readouterr().out))


def test_every_flag_in_the_readme_exists(capsys):
    known = ACCELERATE_FLAGS.union(*(help_flags(m, capsys) for m in (train_dreambooth, generate_priors, infer)))
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]+", readme))
    assert shown - known == set()
    # and the flag table lists every training flag
    table = set(re.findall(r"`(--[a-z][a-z0-9_]+)`", readme))
    assert help_flags(train_dreambooth, capsys) - {"--help"} - table == set()


def test_demo_runs_end_to_end(tmp_path, hf_home):
    env = {**script_env(hf_home), "PYTHON": sys.executable, "DEMO_DIR": str(tmp_path / "demo")}
    proc = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    samples = sorted((tmp_path / "demo" / "samples").glob("*.png"))
    assert len(samples) == 4
    for path in samples:
        with Image.open(path) as img:
            assert img.size == (64, 64) and "sks dog on the moon" in img.text["parameters"]
    assert proc.stdout.strip().splitlines()[-1] == f"demo done: images in {tmp_path / 'demo' / 'samples'}, trained pipeline in {tmp_path / 'demo' / 'sks-dog'}"
    assert os.path.isfile(tmp_path / "demo" / "sks-dog" / "run_config.json")
