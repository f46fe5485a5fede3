"""FLUX.1 and SD 3.5 in the same scripts: the flow-matching objective against hand-computed values, each family's
prompt encoding and transformer call against its diffusers pipeline's own, and real runs of train_dreambooth.py,
generate_priors.py and infer.py on tiny FLUX.1-dev- and SD 3.5-shaped pipelines built offline."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import families
import loading
import objectives
import train_dreambooth
from test_bad_input_table import outcome
from test_train import weights

# ----------------------------------------------------------------------------------------------------------------
# The objective, by hand


def unshifted(u, n=1000):
    """The scheduler's training grid without a shift: sigma = (n - index) / n, index = floor(u n)."""
    return (n - (u * n).long()).float() / n


def test_sigmas_follow_the_schedulers_fixed_and_resolution_dependent_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    u = torch.tensor([0.0, 0.25, 0.5, 0.9995])
    s = unshifted(u)
    fixed = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD 3.5's: the shift is in its timesteps already
    assert torch.allclose(objectives.flow_sigmas(fixed, u, 4096), 3 * s / (1 + 2 * s), atol=1e-6)
    dynamic = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                              base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's
    for tokens, mu in ((256, 0.5), (4096, 1.15), (1024, 0.5 + 0.65 * 768 / 3840)):  # mu: linear in the token count
        hand = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        assert torch.allclose(objectives.flow_sigmas(dynamic, u, tokens), hand, atol=1e-6), tokens


def test_a_draw_is_the_straight_path_with_the_velocity_as_target():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler, latents = FlowMatchEulerDiscreteScheduler(shift=3.0), torch.randn(3, 4, 8, 8)
    torch.manual_seed(0)
    draw = objectives.Flow(scheduler).draw(latents)
    torch.manual_seed(0)  # the same draws by hand: the noise first, then u
    noise, u = torch.randn_like(latents), torch.rand(3)
    s = objectives.flow_sigmas(scheduler, u, 16).view(3, 1, 1, 1)
    assert torch.equal(draw.noisy_latents, (1 - s) * latents + s * noise)
    assert torch.equal(draw.target, noise - latents) and draw.weights is None
    assert torch.equal(draw.timesteps, s.flatten() * 1000) and torch.equal(draw.prediction(noise), noise)
    # SD3's preconditioning: the loss compares clean latents; the true velocity gives them back
    torch.manual_seed(0)
    pre = objectives.Flow(scheduler, precondition_outputs=True).draw(latents)
    assert torch.equal(pre.target, latents)
    assert torch.allclose(pre.prediction(noise - latents), latents, atol=1e-5)


def test_each_weighting_scheme_draws_and_weighs_as_diffusers_defines_it():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler, latents = FlowMatchEulerDiscreteScheduler(), torch.zeros(20000, 1, 2, 2)  # no shift: sigma = 1 - u
    sigmas = {}
    for scheme, kw in (("none", {}), ("logit_normal", {}), ("logit_normal", {"logit_mean": 1.0}),
                       ("mode", {"mode_scale": 1.29}), ("sigma_sqrt", {}), ("cosmap", {})):
        torch.manual_seed(0)
        draw = objectives.Flow(scheduler, scheme, **kw).draw(latents)
        sigmas[scheme, tuple(kw.items())] = s = draw.timesteps / 1000
        if scheme == "sigma_sqrt":
            assert torch.allclose(draw.weights, s ** -2)
        elif scheme == "cosmap":
            assert torch.allclose(draw.weights, 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
        else:
            assert draw.weights is None  # all 1
    assert abs(sigmas["none", ()].median() - 0.5) < 0.02 and abs(sigmas["none", ()].std() - 12 ** -0.5) < 0.01
    assert abs(sigmas["logit_normal", ()].median() - 0.5) < 0.02  # sigmoid of a standard normal
    assert abs(sigmas["logit_normal", (("logit_mean", 1.0),)].median() - (1 - 1 / (1 + math.e ** -1))) < 0.02
    torch.manual_seed(0)  # mode: u = 1 - v - scale (cos^2(pi v / 2) - 1 + v), v uniform
    torch.randn(20000, 1, 2, 2)
    v = torch.rand(20000)
    hand = unshifted(1 - v - 1.29 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v))
    assert torch.allclose(sigmas["mode", (("mode_scale", 1.29),)], hand, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The family rows against the pipelines


def tokenized(model, family, length):
    """A prompt's token ids per tokenizer, as the training data makes them (T5 at `length`)."""
    import imagedata
    from transformers import AutoTokenizer

    tokenizers = [AutoTokenizer.from_pretrained(model, subfolder=sub) for sub in family.tokenizers]
    tokenizers[family.tokenizers.index(family.sequence_tokenizer)].model_max_length = length
    return [ids[None] for ids in imagedata.DreamBoothDataset([([], [], None)], tokenizers, 64, True, False, 0)
            .tokenize("a photo of sks dog")]


@torch.no_grad()
def test_prompt_encoding_is_the_pipelines_own(tiny_flux, tiny_sd3):
    flux = loading.load_pipeline(tiny_flux)
    ids = tokenized(tiny_flux, families.FLUX, 16)
    embeds, pooled = families.FLUX.encode_prompt([flux.text_encoder, flux.text_encoder_2], ids)
    ref_embeds, ref_pooled, _ = flux.encode_prompt("a photo of sks dog", None, max_sequence_length=16)
    assert embeds.shape == (1, 16, 32) and torch.equal(embeds, ref_embeds) and torch.equal(pooled, ref_pooled)

    sd3 = loading.load_pipeline(tiny_sd3)
    ids = tokenized(tiny_sd3, families.SD3, 20)
    embeds, pooled = families.SD3.encode_prompt([sd3.text_encoder, sd3.text_encoder_2, sd3.text_encoder_3], ids)
    ref_embeds, _, ref_pooled, _ = sd3.encode_prompt("a photo of sks dog", None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=20)
    assert embeds.shape == (1, 77 + 20, 96) and pooled.shape == (1, 32 + 32)
    assert torch.equal(embeds, ref_embeds) and torch.equal(pooled, ref_pooled)


@torch.no_grad()
def test_the_flux_call_packs_and_unpacks_as_the_pipeline(tiny_flux):
    """The loss sees ordinary latents: our call equals the pipeline's packing, ids, sigma timestep and guidance."""
    from diffusers import FluxPipeline

    pipe = loading.load_pipeline(tiny_flux)
    latents, embeds, pooled = torch.randn(2, 4, 8, 12), torch.randn(2, 5, 32), torch.randn(2, 32)
    timesteps = torch.tensor([900.0, 100.0])
    ours = families.FLUX.denoise(pipe.transformer, latents, timesteps, embeds, pooled, None, 1.0)
    packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 12)
    theirs = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.tensor([1.0, 1.0]),
                              pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=torch.zeros(5, 3),
                              img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)).sample
    assert torch.equal(ours, FluxPipeline._unpack_latents(theirs, 8, 12, 1))
    assert not torch.equal(ours, families.FLUX.denoise(pipe.transformer, latents, timesteps, embeds, pooled, None, 3.5))


def test_lora_layers_and_blocks_choose_the_adapted_modules(tiny_sd3, photos, tmp_path, make_accelerator):
    """diffusers' SD3 flags: --lora_layers (comma-separated) and --lora_blocks (joint blocks by index)."""
    args = train_dreambooth.parse_args(["--model", tiny_sd3, "--instance_dir", photos, "--instance_prompt", "a photo of sks dog",
                                        "--output_dir", str(tmp_path / "out"), "--rank", "4",
                                        "--lora_layers", "attn.to_k,attn.to_q", "--lora_blocks", "1"])
    train_dreambooth.check_args(args)
    assert args.lora_target_modules == ["transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_q"]
    accelerator = make_accelerator()
    *_, encoders, _ = train_dreambooth.load_models(args, accelerator, families.SD3)
    denoiser = train_dreambooth.load_denoiser(args, accelerator, families.SD3, encoders)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in denoiser.named_modules() if name.endswith("lora_A")}
    assert adapted == {"transformer_blocks.1.attn.to_k", "transformer_blocks.1.attn.to_q"}


# ----------------------------------------------------------------------------------------------------------------
# The scripts


def infer_image(model, out, *extra):
    """infer.py's main in this process (the scripts' own subprocess runs cover its command line)."""
    import infer

    infer.main([str(a) for a in ("--model", model, "--prompt", "a photo of sks dog", "--num_images_per_prompt", 1,
                                 "--output_dir", out, "--num_inference_steps", 2, "--device", "cpu",
                                 "--cpu_threads", torch.get_num_threads(), *extra)])
    (path,) = Path(out).glob("*.png")
    return path


def test_flux_lora_with_priors_and_text_encoder_loads_in_diffusers_comfyui_and_infer(run, tiny_flux, photos, tmp_path):
    """A diffusers README command for FLUX.1 LoRA DreamBooth (its flag spellings), plus prior preservation."""
    out, priors = tmp_path / "out", tmp_path / "priors"
    run("train_dreambooth.py", "--pretrained_model_name_or_path", tiny_flux, "--instance_data_dir", photos,
        "--instance_prompt", "a photo of sks dog", "--resolution", 64, "--train_batch_size", 1, "--rank", 4,
        "--gradient_accumulation_steps", 1, "--max_train_steps", 2, "--learning_rate", "5.0e-04", "--scale_lr",
        "--lr_scheduler", "constant", "--lr_warmup_steps", 0, "--output_dir", out, "--train_text_encoder",
        "--with_prior_preservation", "--class_data_dir", priors, "--class_prompt", "a photo of dog",
        "--num_class_images", 2, "--max_sequence_length", 16, "--validation_prompt", "a photo of sks dog",
        "--num_validation_images", 1, "--validation_inference_steps", 2, "--report_to", "none", launch=False)
    config = json.loads((out / "run_config.json").read_text())["config"]
    assert (config["model_family"], config["weighting_scheme"], config["guidance_scale"], config["prediction_type"]) == (
        "flux", "none", 1.0, "flow")
    assert not config["pre_compute_text_embeddings"]  # a text encoder trains: prompts are encoded every step
    # the class images were made with FLUX.1-dev's sampler settings
    made = json.loads(Image.open(priors / "000000.png").text["dreambooth_prior"])["settings"]
    assert (made["num_inference_steps"], made["guidance_scale"]) == (28, 3.5)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000000.png", "step-000002.png"]

    # diffusers' file: the transformer's and CLIP's adapters (T5 never trains), with their LoRA config as metadata
    state = load_file(out / families.LORA_WEIGHTS)
    assert not (out / families.KOHYA_WEIGHTS).exists()
    modules = {f"transformer.{name}" for name, m in loading.load_pipeline(tiny_flux).transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
    # ComfyUI maps "transformer.<diffusers module>" for FLUX, and CLIP-L's layers as "text_encoder.text_model..."
    clip = {f"text_encoder.text_model.encoder.layers.{b}.self_attn.{p}" for b in range(2) for p in
            ("q_proj", "k_proj", "v_proj", "out_proj")}
    targeted = {m for m in modules if any(m.endswith("." + t) for t in families.FLUX_LORA_TARGETS)}
    stems = {k.rsplit(".lora", 1)[0] for k in state}
    assert stems - clip == targeted and stems & clip == clip and any("single_transformer_blocks" in m for m in targeted)
    # peft's names for the transformer, as diffusers' FLUX script writes them; diffusers' for CLIP
    assert {k.rsplit(".", 2)[-2] for k in state if k.startswith("transformer.")} == {"lora_A", "lora_B"}
    assert {k.rsplit(".", 3)[-3] for k in state if k.startswith("text_encoder.")} == {"lora_linear_layer"}

    # infer.py: the run folder as the model (its base plus its adapters) changes the base model's image
    base = infer_image(tiny_flux, tmp_path / "base")
    tuned = infer_image(out, tmp_path / "tuned")
    zero = infer_image(out, tmp_path / "zero", "--lora_scale", 0)
    assert Image.open(base).tobytes() == Image.open(zero).tobytes() != Image.open(tuned).tobytes()
    assert json.loads(Image.open(tuned).text["dreambooth"])["guidance_scale"] == 3.5  # FLUX.1-dev's sampling default


def test_sd3_full_fine_tune_with_priors_saves_a_pipeline_that_loads(run, tiny_sd3, photos, tmp_path):
    out, priors = tmp_path / "out", tmp_path / "priors"
    run("generate_priors.py", "--model", tiny_sd3, "--class_prompt", "a photo of dog", "--class_dir", priors,
        "--num_class_images", 2, "--sample_batch_size", 2, "--num_inference_steps", 4, launch=False)
    made = json.loads(Image.open(priors / "000000.png").text["dreambooth_prior"])["settings"]
    assert (made["num_inference_steps"], made["guidance_scale"], made["scheduler"]) == (4, 7.0, None)  # SD 3.5's CFG
    run("train_dreambooth.py", "--model", tiny_sd3, "--instance_dir", photos, "--instance_prompt", "a photo of sks dog",
        "--output_dir", out, "--resolution", 64, "--max_train_steps", 2, "--learning_rate", "1e-3",
        "--train_batch_size", 2, "--with_prior_preservation", "--class_dir", priors, "--class_prompt", "a photo of dog",
        "--num_class_images", 2, "--report_to", "none", "--save_single_file", "--validation_prompt", "a photo of sks dog",
        "--validation_negative_prompt", "blurry", "--num_validation_images", 1, "--validation_inference_steps", 2,
        launch=False)
    assert (out / "validation" / "step-000002.png").is_file()  # sampled from the pre-computed embeddings
    config = json.loads((out / "run_config.json").read_text())["config"]
    assert (config["weighting_scheme"], config["precondition_outputs"], config["max_sequence_length"]) == (
        "logit_normal", 1, 77)
    assert config["pre_compute_text_embeddings"]  # frozen T5 and CLIPs: encoded once, off the device
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline.from_pretrained(out)  # loads whole
    # the transformer alone in Stability's layout: diffusers' own single-file loader reads back the same weights
    from diffusers import SD3Transformer2DModel

    single = SD3Transformer2DModel.from_single_file(str(out / "out.safetensors"), config=tiny_sd3, subfolder="transformer",
                                                    torch_dtype=torch.float16).state_dict()
    saved = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer", torch_dtype=torch.float16).state_dict()
    assert single.keys() == saved.keys() and all(torch.equal(single[k], saved[k]) for k in single)
    assert all(k.startswith("model.diffusion_model.") for k in load_file(out / "out.safetensors"))
    base, tuned = weights(tiny_sd3, "transformer"), weights(out, "transformer")
    assert sum(not torch.equal(base[k], tuned[k]) for k in base) > 0.8 * len(base)
    for frozen in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        a, b = weights(tiny_sd3, frozen), weights(out, frozen)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), frozen
    # the same seed gives the same bytes
    first, again = infer_image(out, tmp_path / "a"), infer_image(out, tmp_path / "b")
    assert Image.open(first).tobytes() == Image.open(again).tobytes()


def test_flux_pivotal_lora_resume_mid_run_is_bit_identical(run, tiny_flux, photos, tmp_path):
    """LoRA with pivotal tuning (new tokens in CLIP and T5, as diffusers' advanced FLUX script can), cached latents,
    logit-normal timesteps: a run resumed after step 2 ends with the same adapters and token embeddings."""
    reference, out = tmp_path / "reference", tmp_path / "run"
    args = ["--model", tiny_flux, "--instance_dir", photos, "--instance_prompt", "a photo of sks dog", "--resolution", 64,
            "--rank", 4, "--learning_rate", "1e-3", "--max_train_steps", 4, "--checkpointing_steps", 2,
            "--train_batch_size", 1, "--max_sequence_length", 8, "--weighting_scheme", "logit_normal",
            "--train_text_encoder_ti", "--cache_latents", "--random_flip", "--report_to", "none"]  # crops drawn once
    run("train_dreambooth.py", *args, "--output_dir", reference, launch=False)
    shutil.copytree(reference / "checkpoint-2", out / "checkpoint-2")  # as if the run had died after step 2
    shutil.copy(reference / "run_config.json", out)
    run("train_dreambooth.py", *args, "--output_dir", out, "--resume_from_checkpoint", "latest", launch=False)
    for name in (families.LORA_WEIGHTS, "reference_emb.safetensors"):
        ref, new = load_file(reference / name), load_file(out / name.replace("reference", "run"))
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref), name
    assert set(load_file(reference / "reference_emb.safetensors")) == {"clip_l", "t5"}
    base, ref = load_file(reference / "checkpoint-2" / families.LORA_WEIGHTS), load_file(reference / families.LORA_WEIGHTS)
    assert any(not torch.equal(base[k], ref[k]) for k in ref)  # steps 3 and 4 changed the adapters
    # infer.py reads "sks" as the new tokens in both encoders, beside the adapters
    tuned, plain = infer_image(out, tmp_path / "tuned"), infer_image(tiny_flux, tmp_path / "plain")
    assert Image.open(tuned).tobytes() != Image.open(plain).tobytes()


def test_flux_full_fine_tune_of_two_subjects_with_buckets_masks_ema_and_prodigy(run, tiny_flux, photos, tmp_path):
    """The data and training options on a flow family: several subjects, aspect-ratio buckets, a mask, EMA, Prodigy,
    a full fine-tune (the transformer trains, T5, CLIP and the VAE stay as they were)."""
    import numpy as np

    cats, out = tmp_path / "cats", tmp_path / "out"
    cats.mkdir()
    for i, size in enumerate([(96, 64), (64, 96)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(cats / f"c{i}.png")
    Image.fromarray(np.full((64, 96), 255, np.uint8)).save(cats / "c0.mask.png")  # h x w
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([{"instance_prompt": "a photo of sks dog", "instance_data_dir": photos},
                                    {"instance_prompt": "a photo of zwx cat", "instance_data_dir": str(cats)}]))
    run("train_dreambooth.py", "--model", tiny_flux, "--concepts_list", concepts, "--output_dir", out, "--resolution", 64,
        "--aspect_ratio_buckets", "64,64;64,96;96,64", "--use_ema", "--optimizer", "prodigy", "--max_train_steps", 2,
        "--train_batch_size", 1, "--max_sequence_length", 8, "--report_to", "none", launch=False)
    config = json.loads((out / "run_config.json").read_text())["config"]
    assert config["masks"] == [str(cats / "c0.mask.png")] and set(config["buckets"]) <= {"64x64", "64x96", "96x64"}
    from diffusers import FluxPipeline

    FluxPipeline.from_pretrained(out)  # loads whole
    run("export.py", out, "--single_file", launch=False)  # the transformer alone, in Black Forest Labs' layout
    single = load_file(out / "out.safetensors")
    assert {"img_in.weight", "txt_in.weight", "guidance_in.in_layer.weight", "double_blocks.0.img_attn.qkv.weight",
            "double_blocks.0.txt_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight",
            "final_layer.adaLN_modulation.1.weight"} <= set(single)
    assert single["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 32, 32)  # q, k, v fused
    assert single["single_blocks.0.linear1.weight"].shape == (3 * 32 + 4 * 32, 32)  # and the MLP input
    base, tuned = weights(tiny_flux, "transformer"), weights(out, "transformer")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    for frozen in ("vae", "text_encoder", "text_encoder_2"):
        a, b = weights(tiny_flux, frozen), weights(out, frozen)
        assert all(torch.equal(a[k], b[k]) for k in a), frozen


# ----------------------------------------------------------------------------------------------------------------
# What a family does not read is refused in one line, before anything loads


@pytest.fixture
def flow_base(tiny_model, tiny_flux, tiny_sd3, tiny_z_image, tiny_klein, tiny_qwen_image, photos, tmp_path):
    def args(model, *extra):
        return ["--model", {"sd": tiny_model, "flux": tiny_flux, "sd3": tiny_sd3, "z-image": tiny_z_image,
                            "flux2-klein": tiny_klein, "qwen-image": tiny_qwen_image}[model], "--instance_dir", photos,
                "--instance_prompt", "a photo of sks dog", "--output_dir", tmp_path / "out", "--resolution", 64, *extra]
    return args


@pytest.mark.parametrize("model, extra, line", [
    ("sd", ["--weighting_scheme", "logit_normal"], "--weighting_scheme is for flow-matching models (FLUX.1, SD 3.5, Z-Image, FLUX.2 klein, "
                                                   "Qwen-Image), "
                                                   "and {model} is a StableDiffusionPipeline"),
    ("sd3", ["--guidance_scale", 3.5], "--guidance_scale is for guidance-distilled FLUX.1 (dev: a transformer with a "
                                       "guidance embedding), and {model} is a StableDiffusion3Pipeline without one"),
    ("flux", ["--lora_blocks", "0"], "--lora_blocks is for SD3 and SD 3.5 (their joint blocks), and {model} is a FluxPipeline"),
    ("flux", ["--snr_gamma", 5], "--snr_gamma (min-SNR weighting) is defined for noise prediction; FluxPipeline is "
                                 "trained with flow matching: weigh its loss with --weighting_scheme"),
    ("sd3", ["--validation_scheduler", "dpm++_2m"], "--validation_scheduler dpm++_2m does not sample a "
                                                     "StableDiffusion3Pipeline: use one of flow_euler"),
    ("sd", ["--validation_scheduler", "flow_euler"], "--validation_scheduler flow_euler does not sample a "
                                                      "StableDiffusionPipeline: use one of ddim, dpm++_2m, "
                                                      "dpm++_2m_karras, euler, euler_a, pndm, unipc"),
    ("flux", ["--resolution", 72], "--resolution 72: FluxPipeline takes sides in multiples of 16"),
    ("flux", ["--aspect_ratio_buckets", "64,64;48,72"], "--aspect_ratio_buckets 48,72: FluxPipeline takes sides in "
                                                       "multiples of 16"),
    ("sd3", ["--train_text_encoder_ti"], "--train_text_encoder_ti: diffusers' StableDiffusion3Pipeline has no "
                                         "textual-inversion loader, so the new tokens could not be loaded beside the "
                                         "weights (pivotal tuning is for SD, SDXL and FLUX.1)"),
    ("z-image", ["--train_text_encoder"], "--train_text_encoder: ZImagePipeline's text encoder is a language model "
                                          "this suite does not train (nor do diffusers' scripts): leave the flag out"),
    ("z-image", ["--save_single_file"], "--save_single_file: this version writes no single file for ZImagePipeline; "
                                        "the pipeline folder is saved (diffusers reads it)"),
    ("flux2-klein", ["--text_encoder_out_layers", 9, 40], "--text_encoder_out_layers 9 40: the text_encoder of "
                                                           "{model} has hidden states 0 to 28"),
    ("flux", ["--text_encoder_out_layers", 1], "--text_encoder_out_layers is for FLUX.2 klein (the Qwen3 layers its "
                                               "prompt is read from), and {model} is a FluxPipeline"),
    ("z-image", ["--precondition_outputs", 1], "--precondition_outputs is for SD3 and SD 3.5, and {model} is a "
                                               "ZImagePipeline"),
    ("qwen-image", ["--train_text_encoder_ti"], "--train_text_encoder_ti: diffusers' QwenImagePipeline has no "
                                                "textual-inversion loader, so the new tokens could not be loaded "
                                                "beside the weights (pivotal tuning is for SD, SDXL and FLUX.1)"),
    ("qwen-image", ["--guidance_scale", 3.5], "--guidance_scale is for guidance-distilled FLUX.1 (dev: a transformer "
                                              "with a guidance embedding), and {model} is a QwenImagePipeline without "
                                              "one"),
])
def test_flags_a_family_does_not_read_are_refused(flow_base, capsys, model, extra, line):
    argv = flow_base(model, *extra)
    code, printed = outcome("train", argv, capsys)
    assert (code, printed) == (1, "error: " + line.format(model=argv[1]))
    assert not Path(argv[argv.index("--output_dir") + 1]).exists()


def test_the_benchmark_architectures_build_the_published_sizes():
    """bench/architectures: FLUX.1-dev's transformer is 11,901,408,320 parameters, SD 3.5 Large's 8.06 B, Medium's
    2.24 B, Z-Image's 6.15 B, FLUX.2 klein's 3.88 B and 9.08 B, Qwen-Image's 20.4 B (built on the meta device: no
    memory)."""
    from diffusers import (Flux2Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel,
                           SD3Transformer2DModel, ZImageTransformer2DModel)

    from conftest import ROOT

    for folder, cls, count in (("flux1-dev", FluxTransformer2DModel, 11_901_408_320),
                               ("sd35-large", SD3Transformer2DModel, 8_056_627_520),
                               ("sd35-medium", SD3Transformer2DModel, 2_243_171_520),
                               ("z-image", ZImageTransformer2DModel, 6_154_908_736),
                               ("flux2-klein-4b", Flux2Transformer2DModel, 3_875_544_576),
                               ("flux2-klein-9b", Flux2Transformer2DModel, 9_078_581_248),
                               ("qwen-image", QwenImageTransformer2DModel, 20_430_401_088)):
        config = json.loads((ROOT / "bench" / "architectures" / folder / "transformer_config.json").read_text())
        with torch.device("meta"):
            model = cls.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == count, folder


@pytest.mark.slow
def test_two_processes_train_a_flux_lora_with_its_text_encoder(run, tiny_flux, photos, tmp_path):
    """DDP over two CPU processes (gloo): every trained adapter gets its gradient (FLUX reads CLIP's pooled output,
    which every CLIP layer reaches), and the run sees both processes."""
    out = tmp_path / "out"
    proc = run("train_dreambooth.py", "--model", tiny_flux, "--instance_dir", photos, "--instance_prompt",
               "a photo of sks dog", "--output_dir", out, "--resolution", 64, "--rank", 4, "--train_text_encoder",
               "--gradient_accumulation_steps", 2, "--train_batch_size", 1, "--max_train_steps", 2,
               "--max_sequence_length", 8, "--report_to", "none",
               launch=["--multi_gpu", "--num_processes", 2], env={"ACCELERATE_USE_CPU": "true"})
    assert "2 process(es), global batch 4 (1 per device x 2 accumulation x 2)" in proc.stdout
    state = load_file(out / families.LORA_WEIGHTS)
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("transformer.") for k in state)


def test_a_flux_single_file_as_the_base_model_is_refused(flow_base, capsys, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "flux1-dev.safetensors"  # the original layout's keys, as ComfyUI's FLUX files have them
    save_file({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, path)
    argv = flow_base("flux")
    argv[1] = path
    assert outcome("train", argv, capsys) == (1, f"error: {path} is a FLUX.1 or SD3 single file: give the model as a "
                                                 "diffusers folder or hub id (single files of these families are not "
                                                 "read by this version)")


@pytest.mark.slow
def test_the_flux_single_file_reads_back_through_diffusers_at_flux_width(tmp_path):
    """diffusers' FLUX single-file loader assumes FLUX.1's width (3072) and MLP ratio: a FLUX.1-wide transformer with
    one block of each kind (531 M parameters, bf16) goes through our writer and diffusers' reader to the same tensors."""
    import singlefile
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                   num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=64,
                                   guidance_embeds=True).to(torch.bfloat16)
    model.save_config(tmp_path / "transformer")
    state, left = singlefile.flux_state(model.state_dict())
    assert not left
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "flux.safetensors")
    back = FluxTransformer2DModel.from_single_file(str(tmp_path / "flux.safetensors"), config=str(tmp_path),
                                                   subfolder="transformer", torch_dtype=torch.bfloat16).state_dict()
    ours = model.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_infer_refuses_a_run_of_another_family(tiny_model, tmp_path, capsys):
    """A FLUX.1 LoRA run (its record) put on an SD model: one line naming both families, not a size mismatch."""
    run = tmp_path / "flux-lora"
    run.mkdir()
    (run / families.LORA_WEIGHTS).write_bytes(b"adapters")
    (run / "run_config.json").write_text(json.dumps({"config": {"model_family": "flux", "lora_rank": 4,
                                                                "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-dev"}}))
    code, line = outcome("infer", ["--model", tiny_model, "--lora", run, "--prompt", "a dog", "--output_dir",
                                   tmp_path / "out"], capsys)
    assert (code, line) == (1, f"error: {run} was trained on a FluxPipeline (black-forest-labs/FLUX.1-dev); the model "
                               "here is a StableDiffusionPipeline: give a model of that family")
    assert not (tmp_path / "out").exists()


def test_a_flux_without_guidance_embedding_samples_with_real_guidance_at_its_own_prompt_length(tmp_path):
    """FLUX.1 without a guidance embedding (schnell, de-distilled and base checkpoints, the toy FLUX.1): --guidance_scale
    above 1 is classifier-free guidance with the empty negative prompt (FluxPipeline's true_cfg_scale), in infer.py and
    generate_priors.py alike; T5's prompt length is the tokenizer's own where it is below the pipeline's 512, in
    sampling and as training's --max_sequence_length default; class images at the model's size (FluxPipeline's own
    default is 1024's)."""
    import generate_priors
    from diffusers import FluxPipeline
    from transformers import AutoTokenizer

    import imagedata
    import make_tiny_model

    model = make_tiny_model.make_tiny_pipeline(str(tmp_path / "schnell"), family="flux-schnell")
    t5 = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_2")
    t5.model_max_length = 16
    t5.save_pretrained(Path(model, "tokenizer_2"))
    read = families.read_model(model)
    assert (read.sequence_length, read.resolution) == (16, 64)
    assert families.guidance_arguments(read.family, read.config, 4.0, None, 2) == {"true_cfg_scale": 4.0,
                                                                                    "negative_prompt": ["", ""]}
    assert families.guidance_arguments(read.family, read.config, 1.0, None, 2) == {"true_cfg_scale": 1.0}
    args = train_dreambooth.parse_args(["--model", model, "--instance_dir", str(tmp_path), "--instance_prompt", "sks",
                                        "--output_dir", str(tmp_path / "out")])
    train_dreambooth.check_family_flags(args, read)
    assert args.max_sequence_length == 16

    guided = Image.open(infer_image(model, tmp_path / "guided", "--guidance_scale", 4))
    plain = Image.open(infer_image(model, tmp_path / "plain", "--guidance_scale", 1))
    pipe = FluxPipeline.from_pretrained(model)
    direct = pipe("a photo of sks dog", negative_prompt="", true_cfg_scale=4.0, num_inference_steps=2, height=64,
                  width=64, max_sequence_length=16, generator=torch.Generator().manual_seed(imagedata.image_seed(0, 0))
                  ).images[0]
    assert guided.tobytes() == direct.tobytes() != plain.tobytes()

    generate_priors.main([str(a) for a in (
        "--model", model, "--class_prompt", "a photo of sks dog", "--class_dir", tmp_path / "priors",
        "--num_class_images", 1, "--sample_batch_size", 1, "--num_inference_steps", 2, "--guidance_scale", 4)])
    prior = Image.open(tmp_path / "priors" / "000000.png")
    assert prior.size == (64, 64) and prior.tobytes() == direct.tobytes()
