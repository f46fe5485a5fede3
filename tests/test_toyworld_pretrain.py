"""toyworld/pretrain.py end to end for a few steps: it writes a real pipeline folder with a word-level CLIP tokenizer,
the suite's scripts load it, and stage 3 (--continue_from) changes the VAE decoder and nothing else."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from conftest import ROOT, script_env


def pretrain(hf_home, *args):
    subprocess.run([sys.executable, str(ROOT / "toyworld" / "pretrain.py"), "--batch_size", "8", *map(str, args)],
                   check=True, capture_output=True, env=script_env(hf_home), cwd=ROOT, timeout=600)


@pytest.mark.slow  # CI time: the toy model it made is in the repository, and every test that trains on it loads it
def test_pretrain_writes_a_pipeline_the_scripts_load(run, hf_home, tmp_path):
    out = tmp_path / "toy-sd"
    pretrain(hf_home, "--output_dir", out, "--vae_steps", 2, "--unet_steps", 2, "--decoder_steps", 0,
             "--save_precision", "fp32")
    record = json.loads((out / "pretrain.json").read_text())
    assert record["seed"] == 0 and record["unet_steps"] == 2 and "pretrain.py" in record["command"]
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.tokenize("a photo of a red circle on a blue background") == [
        f"{w}</w>" for w in "a photo of a red circle on a blue background".split()]
    run("infer.py", "--model", out, "--prompt", "a photo of a red circle on a blue background",
        "--num_images_per_prompt", 1, "--num_inference_steps", 2, "--output_dir", tmp_path / "samples", launch=False)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1

    # stage 3 on that folder: the decoder learns, the encoder (the latent space) and the UNet stay bit for bit
    pretrain(hf_home, "--output_dir", tmp_path / "stage3", "--continue_from", out, "--decoder_steps", 2,
             "--save_precision", "fp32")
    record3 = json.loads((tmp_path / "stage3" / "pretrain.json").read_text())
    assert record3["stages_1_2_command"] == record["command"] and record3["decoder_steps"] == 2
    before, after = (AutoencoderKL.from_pretrained(p, subfolder="vae").state_dict() for p in (out, tmp_path / "stage3"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    unets = [UNet2DConditionModel.from_pretrained(p, subfolder="unet").state_dict() for p in (out, tmp_path / "stage3")]
    assert all(torch.equal(unets[0][k], unets[1][k]) for k in unets[0])


def test_flux_pretrain_writes_a_flux_pipeline_the_scripts_load(run, hf_home, tmp_path):
    """toyworld/pretrain_flux.py for a few steps: a FluxPipeline folder (16-channel VAE with FLUX's shift and scale,
    word-level CLIP and T5 tokenizers, a transformer without guidance embedding), its VAE ceiling recorded, and
    the suite's scripts sample it with real classifier-free guidance at its own T5 length."""
    from diffusers import FluxPipeline
    from transformers import T5TokenizerFast

    out, again = tmp_path / "toy-flux", tmp_path / "again"
    args = [sys.executable, str(ROOT / "toyworld" / "pretrain_flux.py"), "--vae_steps", "2", "--transformer_steps", "2",
            "--batch_size", "4", "--heads", "2", "--double_blocks", "1", "--single_blocks", "1", "--ceiling_renders", "2"]
    proc = subprocess.run(args + ["--output_dir", str(out), "--save_every", "1"], check=True, capture_output=True,
                          text=True, env=script_env(hf_home), cwd=ROOT, timeout=600)
    assert f"saved the toy model to {out} at step 1 of 2" in proc.stdout  # a run cut off after it leaves a model
    record = json.loads((out / "pretrain.json").read_text())
    assert record["transformer_steps"] == 2 and set(record["vae_ceiling"]) == {"green", "blue", "purple", "white"}
    # stage 2 again on the saved VAE (a long run cut off in stage 2 starts there)
    subprocess.run(args + ["--output_dir", str(again), "--vae_from", str(out)], check=True, capture_output=True,
                   env=script_env(hf_home), cwd=ROOT, timeout=600)
    vaes = [load_file(folder / "vae" / "diffusion_pytorch_model.safetensors") for folder in (out, again)]
    assert vaes[0].keys() == vaes[1].keys() and all(torch.equal(vaes[0][k], vaes[1][k]) for k in vaes[0])
    assert json.loads((again / "pretrain.json").read_text())["vae_from"] == str(out)
    pipe = FluxPipeline.from_pretrained(out)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor is not None
    assert not pipe.transformer.config.guidance_embeds and pipe.tokenizer_2.model_max_length == 32
    caption = "a photo of a red circle on a blue background"
    assert T5TokenizerFast.from_pretrained(out / "tokenizer_2").tokenize(caption) == [
        "\u2581" + w for w in caption.split()]
    run("infer.py", "--model", out, "--prompt", caption, "--num_images_per_prompt", 1, "--num_inference_steps", 2,
        "--guidance_scale", 4, "--output_dir", tmp_path / "samples", launch=False)
    (image,) = (tmp_path / "samples").glob("*.png")
    from PIL import Image

    with Image.open(image) as im:
        assert im.size == (32, 32)


@pytest.mark.slow
def test_flux_pretrain_resumes_stage_2_exactly(hf_home, tmp_path, monkeypatch):
    """A run cut off after step 2 of 4 (its training state as --save_every wrote it then) and continued with --resume
    ends with the same weights and losses as the run that was never cut off."""
    import shutil

    sys.path.insert(0, str(ROOT))
    import toyworld.pretrain_flux as pretrain_flux

    saved, states = torch.save, {}

    def keep_each(obj, path, *args, **kwargs):  # the state file as it was at each save
        saved(obj, path, *args, **kwargs)
        if isinstance(obj, dict) and "step" in obj:
            states[obj["step"]] = shutil.copy(path, tmp_path / f"state-{obj['step']}.pt")

    args = ["--vae_steps", "2", "--transformer_steps", "4", "--save_every", "2", "--heads", "1", "--double_blocks",
            "1", "--single_blocks", "1", "--batch_size", "4", "--ceiling_renders", "2", "--vae_factor", "2",
            "--latent_channels", "4", "--t5_length", "16"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch, "save", keep_each)
    monkeypatch.setattr(sys, "argv", ["pretrain_flux.py", "--output_dir", str(tmp_path / "whole"), *args])
    pretrain_flux.main()
    monkeypatch.setattr(torch, "save", saved)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole" / "vae", cut / "vae")
    shutil.copy(states[2], cut / "training_state.pt")
    monkeypatch.setattr(sys, "argv", ["pretrain_flux.py", "--output_dir", str(cut), *args, "--resume"])
    pretrain_flux.main()
    whole, resumed = (torch.load(folder / "training_state.pt", weights_only=False) for folder in (tmp_path / "whole", cut))
    assert whole["step"] == resumed["step"] == 4 and whole["losses"] == resumed["losses"]
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        assert all(torch.equal(whole[name][k], resumed[name][k]) for k in whole[name]), name


def test_flux_distillation_starts_at_the_teacher_and_writes_a_guidance_distilled_pipeline(hf_home, tmp_path):
    """toyworld/distill_flux.py: the student (the teacher's transformer with a guidance embedding) gives exactly the
    teacher's prediction before training, whatever guidance it is fed; a short run writes a FluxPipeline folder whose
    transformer embeds guidance and changed, with the teacher's VAE and text encoders byte for byte; a teacher that
    is already distilled, or the teacher's own folder as the output, is refused in one line."""
    import make_tiny_model
    from diffusers import FluxPipeline, FluxTransformer2DModel

    import model_calls
    from toyworld.distill_flux import student_of

    teacher_dir = make_tiny_model.make_tiny_pipeline(str(tmp_path / "teacher"), family="flux-schnell")
    teacher = FluxTransformer2DModel.from_pretrained(teacher_dir, subfolder="transformer")
    student = student_of(teacher)
    assert student.config.guidance_embeds and not teacher.config.guidance_embeds
    torch.manual_seed(0)
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 800.0])
    sequence, pooled = torch.randn(2, 5, 32), torch.randn(2, 32)
    with torch.no_grad():
        expected = model_calls.call_flux(teacher, latents, timesteps, sequence, pooled, None)
        for guidance in (1.0, torch.tensor([3.5, 7.0])):
            assert torch.equal(model_calls.call_flux(student, latents, timesteps, sequence, pooled, None, guidance),
                               expected)

    out = tmp_path / "distilled"
    command = [sys.executable, str(ROOT / "toyworld" / "distill_flux.py"), "--steps", "2", "--batch_size", "4"]
    proc = subprocess.run(command + ["--teacher", teacher_dir, "--output_dir", str(out)], capture_output=True,
                          text=True, env=script_env(hf_home), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "distill.json").read_text())
    assert record["steps"] == 2 and record["teacher"] == teacher_dir
    pipe = FluxPipeline.from_pretrained(out)
    assert pipe.transformer.config.guidance_embeds
    trained = pipe.transformer.state_dict()
    assert any(not torch.equal(trained[k], v.to(trained[k].dtype)) for k, v in teacher.state_dict().items())
    for part in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        for f in (tmp_path / "teacher" / part).iterdir():
            assert (out / part / f.name).read_bytes() == f.read_bytes(), f
    assert not list(tmp_path.glob("*.partial"))

    for teacher_arg, output, message in ((out, tmp_path / "again", "already embeds guidance"),
                                         (teacher_dir, teacher_dir, "is the teacher's folder")):
        proc = subprocess.run(command + ["--teacher", str(teacher_arg), "--output_dir", str(output)],
                              capture_output=True, text=True, env=script_env(hf_home), cwd=ROOT, timeout=600)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "again").exists()
