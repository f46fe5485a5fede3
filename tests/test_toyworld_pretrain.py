"""toyworld/pretrain.py end to end for a few seconds: it writes a real pipeline folder with a word-level CLIP
tokenizer, and the suite's scripts load it."""

import json
import subprocess
import sys

from transformers import CLIPTokenizer

from conftest import ROOT, script_env


def test_pretrain_writes_a_pipeline_the_scripts_load(run, hf_home, tmp_path):
    out = tmp_path / "toy-sd"
    subprocess.run([sys.executable, str(ROOT / "toyworld" / "pretrain.py"), "--output_dir", str(out),
                    "--vae_steps", "2", "--unet_steps", "2", "--batch_size", "8"],
                   check=True, capture_output=True, env=script_env(hf_home), cwd=ROOT, timeout=600)
    record = json.loads((out / "pretrain.json").read_text())
    assert record["seed"] == 0 and record["unet_steps"] == 2 and "pretrain.py" in record["command"]
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.tokenize("a photo of a red circle on a blue background") == [
        f"{w}</w>" for w in "a photo of a red circle on a blue background".split()]
    run("infer.py", "--model", out, "--prompt", "a photo of a red circle on a blue background",
        "--num_images_per_prompt", 1, "--num_inference_steps", 2, "--output_dir", tmp_path / "samples", launch=False)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
