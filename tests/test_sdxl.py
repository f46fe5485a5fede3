"""SDXL through the same three scripts, on a tiny SDXL pipeline built from config dicts as diffusers' own SDXL tests
build theirs (a `text_time` UNet, a CLIPTextModel and a CLIPTextModelWithProjection, two tokenizers), saved and loaded
from disk: the full fine-tune and LoRA outputs load in diffusers and generate, the promises (exact resume, cached
latents, deterministic priors and images) hold, and the micro-conditioning reaches the UNet."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import families
import loading
import imagedata
import export
import infer
import train_dreambooth
from test_lora import image
from test_lora_files import assert_diffusers_names, assert_kohya_names
from test_resume import assert_same_run
from test_train import changed_fraction, train_args, weights

TWO = dict(launch=["--multi_gpu", "--num_processes", 2], env={"ACCELERATE_USE_CPU": "true"})
ENCODERS = ("text_encoder", "text_encoder_2")


def separate_vae(folder):
    """A VAE of its own (other weights, force_upcast false, as madebyollin/sdxl-vae-fp16-fix), for
    --pretrained_vae_model_name_or_path."""
    import make_tiny_model

    torch.manual_seed(1)
    make_tiny_model.tiny_vae(force_upcast=False, scaling_factor=0.13025).save_pretrained(folder)
    return str(folder)


def sdxl_generates(folder, **kw):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, **kw)
    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images[0]
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()
    return out


def test_family_and_native_resolution_come_from_the_model(tiny_model, tiny_sdxl):
    assert families.read_model(tiny_sdxl)[:2] == (families.SDXL, 16)  # sample size 8 x the tiny VAE's factor 2
    assert families.read_model(tiny_model)[:2] == (families.SD, 16)
    shutil.rmtree(Path(tiny_sdxl).with_name("broken"), ignore_errors=True)
    shutil.copytree(tiny_sdxl, Path(tiny_sdxl).with_name("broken"))
    shutil.rmtree(Path(tiny_sdxl).with_name("broken") / "text_encoder_2")
    try:
        loading.check_model_source(str(Path(tiny_sdxl).with_name("broken")))
        raise AssertionError("a folder without text_encoder_2 was accepted")
    except SystemExit as e:
        assert "has no text_encoder_2 subfolder" in str(e)


def test_time_ids_carry_each_images_real_size_and_crop_into_the_unet(tiny_sdxl, tmp_path):
    """SDXL's micro-conditioning: (original h, original w, crop top, crop left, target h, target w) of each image,
    the crop mirrored with the flip, reach the UNet's added embedding unchanged."""
    Image.new("RGB", (96, 72), (200, 30, 30)).save(tmp_path / "wide.png")  # resized to 85 x 64: a crop left in 0..21
    Image.new("RGB", (40, 80), (30, 30, 200)).save(tmp_path / "tall.png")  # resized to 64 x 128: a crop top in 0..64
    from transformers import AutoTokenizer

    tokenizers = [AutoTokenizer.from_pretrained(tiny_sdxl, subfolder=s) for s in families.SDXL.tokenizers]
    examples = [(tmp_path / "wide.png", "a photo of sks dog", None), (tmp_path / "tall.png", "a photo of sks dog", None)]
    data = imagedata.DreamBoothDataset([(examples, [], None)], tokenizers, 64, False, True, seed=3)
    crops = set()
    for epoch in range(6):
        data.set_epoch(epoch)
        for i, (h0, w0) in enumerate([(72, 96), (80, 40)]):
            (pixels, ids, mask), tokens = data[i][0]
            assert pixels.shape == (3, 64, 64) and [t.shape for t in tokens] == [(77,), (77,)] and mask is None
            h0_, w0_, top, left, th, tw = ids.tolist()
            assert (h0_, w0_, th, tw) == (h0, w0, 64, 64)
            assert (0 <= left <= 21 and top == 0) if i == 0 else (left == 0 and 0 <= top <= 64)
            crops.add((i, top, left))
    assert len(crops) > 4  # random crops and flips: the time ids change with them
    # the flip mirrors the crop: the same draw without --random_flip gives the unmirrored left edge
    g = torch.Generator().manual_seed(0)
    _, plain, _ = imagedata.preprocess(Image.open(tmp_path / "wide.png"), (64, 64), False, False, g)
    _, flipped, _ = imagedata.preprocess(Image.open(tmp_path / "wide.png"), (64, 64), False, False,
                                                torch.Generator().manual_seed(0), flip=True)
    assert flipped[3] == 85 - 64 - plain[3]

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    encoders = {"text_encoder": CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder"),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")}
    model = train_dreambooth.DreamBoothModel(families.SDXL, unet, encoders, [])
    seen = {}
    unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw["added_cond_kwargs"]), with_kwargs=True)
    batch = imagedata.collate([data[0], data[1]])
    latents = torch.randn(2, 4, 32, 32)
    out = model(latents, torch.tensor([10, 500]), batch["texts"], batch["time_ids"])
    assert out.shape == latents.shape
    assert torch.equal(seen["time_ids"], batch["time_ids"]) and seen["text_embeds"].shape == (2, 32)
    with torch.no_grad():  # the time ids change the prediction: the UNet uses them
        other = model(latents, torch.tensor([10, 500]), batch["texts"], batch["time_ids"] + 1)
    assert not torch.allclose(out, other)


def test_half_precision_keeps_the_sdxl_vae_in_fp32_unless_a_separate_vae_is_given(tiny_sdxl, photos, tmp_path, make_accelerator):
    args = train_dreambooth.parse_args([str(a) for a in train_args(tiny_sdxl, photos, tmp_path / "out",
                                                                    "--mixed_precision", "bf16", "--lora_rank", 2)])
    train_dreambooth.check_args(args)
    accelerator = make_accelerator(mixed_precision="bf16")
    _, _, encoders, vae = train_dreambooth.load_models(args, accelerator, families.SDXL)
    unet = train_dreambooth.load_denoiser(args, accelerator, families.SDXL, encoders)
    assert vae.dtype == torch.float32 and unet.dtype == torch.bfloat16
    assert {e.dtype for e in encoders.values()} == {torch.bfloat16}
    args.pretrained_vae_model_name_or_path = separate_vae(tmp_path / "vae")
    vae = train_dreambooth.load_models(args, accelerator, families.SDXL)[3]
    assert vae.dtype == torch.bfloat16  # an fp16-safe VAE (force_upcast false) runs in the weight dtype


def test_full_fine_tune_with_priors_both_text_encoders_and_a_separate_vae(run, tiny_sdxl, photos, tmp_path):
    priors, out = tmp_path / "priors", tmp_path / "out"
    vae = separate_vae(tmp_path / "vae")
    run("generate_priors.py", "--model", tiny_sdxl, "--class_prompt", "a photo of dog", "--class_dir", priors,
        "--num_class_images", 3, "--num_inference_steps", 2, "--resolution", 64, "--sample_batch_size", 2, launch=False)
    proc = run("train_dreambooth.py", *train_args(
        tiny_sdxl, photos, out, "--with_prior_preservation", "--class_dir", priors, "--class_prompt", "a photo of dog",
        "--num_class_images", 3, "--train_text_encoder", "--use_8bit_adam", "--gradient_accumulation_steps", 2,
        "--max_train_steps", 3, "--snr_gamma", 5, "--offset_noise", "--gradient_checkpointing",
        "--pretrained_vae_model_name_or_path", vae, "--export_steps", 3, "--validation_prompt", "a photo of sks dog",
        "--num_validation_images", 1, "--validation_inference_steps", 2))
    assert "DreamBooth: StableDiffusionXL, 4 instance images, 3 class images" in proc.stdout
    sdxl_generates(out)
    assert changed_fraction(weights(tiny_sdxl, "unet"), weights(out, "unet")) > 0.9
    assert changed_fraction(weights(tiny_sdxl, "text_encoder_2"), weights(out, "text_encoder_2")) > 0.9
    # SDXL reads the first encoder's penultimate layer: its last layer and final norm never reach the loss and stay
    # frozen, bit for bit; the rest trained
    base, tuned = weights(tiny_sdxl, "text_encoder"), weights(out, "text_encoder")
    unused = [k for k in base if k.startswith(("encoder.layers.1.", "final_layer_norm."))]
    assert unused and all(torch.equal(base[k], tuned[k]) for k in unused)
    assert changed_fraction({k: base[k] for k in base if k not in unused}, {k: tuned[k] for k in base if k not in unused}) > 0.9
    separate, tuned_vae = load_file(next(Path(vae).glob("*.safetensors"))), weights(out, "vae")
    assert separate.keys() == tuned_vae.keys()
    assert all(torch.equal(separate[k], tuned_vae[k]) for k in separate)  # the VAE it trained with, unchanged
    record = json.loads((out / "run_config.json").read_text())["config"]
    assert record["model_family"] == "sdxl" and record["resolution"] == 64
    assert (out / "validation" / "step-000003.png").is_file()
    exported = image(str(out / "export-3"), tmp_path / "export")  # fp16 export of the final weights, via infer.py
    assert exported.shape == (64, 64, 3) and not np.array_equal(exported, image(tiny_sdxl, tmp_path / "base"))
    # the fine-tuned SDXL as one file in SGM's layout, read back by diffusers' single-file loader
    from test_single_file import same_model

    export.main([str(out), "--single_file", "--precision", "fp32"])
    same_model(out, out / "out.safetensors")
    with Image.open(out / "validation" / "step-000003.png") as grid:
        assert grid.size == (64, 64)


def test_lora_on_the_unet_and_both_encoders_loads_in_diffusers_kohya_and_infer(run, tiny_sdxl, photos, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    run("train_dreambooth.py", *train_args(tiny_sdxl, photos, out, "--lora_rank", 4, "--lora_alpha", 8, "--learning_rate",
                                           1e-2, "--train_text_encoder", "--max_train_steps", 3, "--checkpointing_steps", 3,
                                           "--report_to", "none"))
    record = json.loads((out / "run_config.json").read_text())["config"]
    models = ["unet", "text_encoder", "text_encoder_2"]
    assert_kohya_names(out / "pytorch_lora_weights_kohya.safetensors", tiny_sdxl, "sdxl", models)
    assert_diffusers_names(out / "pytorch_lora_weights.safetensors", tiny_sdxl, "sdxl", models)

    def generated(*lora, **kw):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        if lora:
            pipe.load_lora_weights(*lora, **kw)
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    base, tuned = generated(), generated(str(out))
    assert not np.allclose(base, tuned)
    assert np.allclose(generated(str(out), weight_name="pytorch_lora_weights_kohya.safetensors"), tuned, atol=1e-5)
    # infer.py: the run folder (base model from its record), the final checkpoint and the kohya file on the base
    run_image = image(str(out), tmp_path / "run-images")
    assert np.array_equal(image(str(out / "checkpoint-3"), tmp_path / "checkpoint"), run_image)
    assert np.array_equal(image(tiny_sdxl, tmp_path / "kohya", "--lora", out / "pytorch_lora_weights_kohya.safetensors"),
                          run_image)
    assert not np.array_equal(image(tiny_sdxl, tmp_path / "base"), run_image)
    assert record["resolution"] == 64


@pytest.mark.slow  # CI time: SD's resume and two-process tests cover the same code in the default run
def test_resume_mid_epoch_and_two_processes_are_exact(run, tiny_sdxl, photos, tmp_path):
    """Prior preservation, both encoders trained, accumulation, random flips: 4 instance + 3 class images at batch 1
    with accumulation 2 make 2 optimizer steps an epoch, so checkpoint 3 is mid-epoch."""
    priors = tmp_path / "priors"  # the user's own class images (no manifest): nothing to generate
    priors.mkdir()
    for i, photo in enumerate(sorted(Path(photos).glob("*.png"))[:3]):
        Image.open(photo).rotate(90).save(priors / f"{i}.png")

    def command(out, *extra):
        return train_args(tiny_sdxl, photos, out, "--with_prior_preservation", "--class_dir", priors, "--class_prompt",
                          "a photo of dog", "--num_class_images", 3, "--train_text_encoder", "--train_batch_size", 1,
                          "--gradient_accumulation_steps", 2, "--random_flip", "--max_train_steps", 5,
                          "--checkpointing_steps", 3, *extra)

    reference, out = tmp_path / "reference", tmp_path / "run"
    run("train_dreambooth.py", *command(reference), launch=False)
    shutil.copytree(reference / "checkpoint-3", out / "checkpoint-3")
    run("train_dreambooth.py", *command(out, "--resume_from_checkpoint", "latest"), launch=False)
    assert_same_run(reference, out, from_step=3, trained=("unet", *ENCODERS))

    two = tmp_path / "two"  # DDP with both encoders trained: no parameter waits for a gradient that never comes
    proc = run("train_dreambooth.py", *command(two, "--max_train_steps", 2), **TWO)
    assert "2 process(es), global batch 4 (1 per device x 2 accumulation x 2)" in proc.stdout
    assert changed_fraction(weights(tiny_sdxl, "text_encoder_2"), weights(two, "text_encoder_2")) > 0.5


@pytest.mark.slow  # CI time: the same caches on SD are in the default run (test_performance.py), and Z-Image's
# pre-computed = encoded with two subjects and caption dropout
def test_cached_latents_and_embeddings_train_the_same_weights(run, tiny_sdxl, photos, tmp_path):
    common = ["--train_batch_size", 1, "--center_crop", "--random_flip", "--max_train_steps", 3, "--report_to", "none",
              "--validation_prompt", "a dog", "--num_validation_images", 1, "--validation_inference_steps", 2,
              "--validation_epochs", 1,  # diffusers' SDXL spelling: 4 photos at batch 1 make 4 steps an epoch
              "--use_ema", "--ema_decay", 0.9, "--optimizer", "prodigy"]  # the training options on SDXL too
    run("train_dreambooth.py", *train_args(tiny_sdxl, photos, tmp_path / "live", *common))
    run("train_dreambooth.py", *train_args(tiny_sdxl, photos, tmp_path / "cached", *common, "--cache_latents",
                                           "--pre_compute_text_embeddings"))
    live, cached = weights(tmp_path / "live", "unet"), weights(tmp_path / "cached", "unet")
    assert all(torch.equal(live[k], cached[k]) for k in live)
    assert json.loads((tmp_path / "live" / "run_config.json").read_text())["config"]["validation_steps"] == 4
    assert sorted(p.name for p in (tmp_path / "live" / "validation").iterdir()) == ["step-000000.png", "step-000003.png"]
    # validation from pre-computed embeddings (zeros for the empty negative prompt, as the pipeline does) draws the
    # same images as the pipeline encoding the prompts itself
    assert (tmp_path / "live" / "validation" / "step-000000.png").read_bytes() == \
        (tmp_path / "cached" / "validation" / "step-000000.png").read_bytes()


def test_priors_and_infer_keep_their_determinism(run, tiny_sdxl, tmp_path):
    from test_priors import ONE, TWO as TWO_PROCESSES, CPU, pngs, priors_argv

    one, two = tmp_path / "one", tmp_path / "two"
    run("generate_priors.py", *priors_argv(tiny_sdxl, one, 3, "--sample_batch_size", 2), launch=ONE)
    run("generate_priors.py", *priors_argv(tiny_sdxl, two, 3, "--sample_batch_size", 2), launch=TWO_PROCESSES, env=CPU)
    assert len(pngs(one)) == 3 and pngs(one) == pngs(two)
    argv = ["--model", tiny_sdxl, "--prompt", "a photo of sks dog", "--num_images_per_prompt", "3", "--batch_size", "2",
            "--num_inference_steps", "2", "--height", "64", "--width", "64", "--seed", "7"]
    infer.main(argv + ["--output_dir", str(tmp_path / "all")])
    infer.main(argv + ["--output_dir", str(tmp_path / "again")])
    infer.main(argv + ["--output_dir", str(tmp_path / "third"), "--image_index", "2"])
    assert pngs(tmp_path / "all") == pngs(tmp_path / "again") and len(pngs(tmp_path / "all")) == 3
    (name, data), = pngs(tmp_path / "third").items()
    assert pngs(tmp_path / "all")[name] == data
    with Image.open(tmp_path / "third" / name) as img:
        assert "Sampler: Euler, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: tiny-sdxl, Image index: 2" in \
            img.text["parameters"]
