"""The families whose text encoder is a language model (Z-Image and FLUX.2 klein: Qwen3; Qwen-Image: Qwen2.5-VL), in
the same scripts: their rows checked against diffusers' pipelines (chat template, hidden layers, masks, latents, the
transformer's call), and real runs of the scripts on tiny pipelines built offline."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import families
import loading
from test_flow import infer_image
from test_train import weights

PROMPT = "a photo of sks dog"


def tokenized(model, family, length, prompt=PROMPT):
    """The prompt as the training data tokenizes it, batched: (ids, attention mask)."""
    import imagedata
    from transformers import AutoTokenizer

    tokenizers = [AutoTokenizer.from_pretrained(model, subfolder=sub) for sub in family.tokenizers]
    tokenizers[family.tokenizers.index(family.sequence_tokenizer)].model_max_length = length
    dataset = imagedata.DreamBoothDataset([([], [], None)], tokenizers, 64, True, False, 0, tokenize=family.tokenize)
    return [t[None] for t in dataset.tokenize(prompt)]


@torch.no_grad()
def test_z_image_prompt_encoding_is_the_pipelines_own_and_the_prompt_reaches_the_transformer(tiny_z_image):
    pipe = loading.load_pipeline(tiny_z_image)
    ids, mask = tokenized(tiny_z_image, families.Z_IMAGE, 40)
    embeds, second = families.Z_IMAGE.encode_prompt([pipe.text_encoder], (ids, mask))
    (reference,), _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=40)
    assert embeds.shape == (1, 40, 16) and torch.equal(second, mask)
    assert torch.equal(embeds[0][mask[0].bool()], reference)  # the unpadded tokens the transformer reads
    # the chat template wraps the prompt; the prompt's own tokens are inside what is read, and change it
    template = tokenized(tiny_z_image, families.Z_IMAGE, 40, prompt="")[1].sum()
    prompt_tokens = len(pipe.tokenizer(PROMPT).input_ids)
    assert mask.sum() == template + prompt_tokens
    other, _ = families.Z_IMAGE.encode_prompt([pipe.text_encoder], tokenized(tiny_z_image, families.Z_IMAGE, 40,
                                                                             prompt="a photo of sks cat"))
    assert not torch.equal(other[0][mask[0].bool()], reference)
    # a prompt past --max_sequence_length is cut, as the pipeline cuts it
    ids, mask = tokenized(tiny_z_image, families.Z_IMAGE, 12)
    assert mask.sum() == 12


@torch.no_grad()
def test_the_z_image_call_is_the_pipelines_step(tiny_z_image):
    """One Euler step of ZImagePipeline (its frame axis, 1 - sigma timestep and negated output) against the step our
    call gives: the loss's velocity is the one the sampler follows."""
    pipe = loading.load_pipeline(tiny_z_image)
    ids, mask = tokenized(tiny_z_image, families.Z_IMAGE, 40)
    embeds, mask = families.Z_IMAGE.encode_prompt([pipe.text_encoder], (ids, mask))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    stepped = pipe(prompt_embeds=[embeds[0][mask[0].bool()]], latents=latents, height=16, width=16,
                   num_inference_steps=1, guidance_scale=0.0, output_type="latent").images
    sigma = pipe.scheduler.sigmas[0]
    velocity = families.Z_IMAGE.denoise(pipe.transformer, latents, sigma[None] * 1000, embeds, mask, None)
    assert torch.allclose(stepped, latents - sigma * velocity, atol=1e-6)
    assert not torch.allclose(stepped, latents + sigma * velocity, atol=1e-3)


@torch.no_grad()
def test_flux2_klein_prompts_latents_and_call_are_the_pipelines_own(tiny_klein):
    """FLUX.2 klein: the prompt (chat template without thinking, hidden states 9, 18, 27 side by side), the latents
    (2x2 patches normalised by the VAE's batch-norm statistics) and one Euler step of Flux2KleinPipeline against
    ours."""
    pipe = loading.load_pipeline(tiny_klein)
    family = families.FLUX2_KLEIN
    ids, mask = tokenized(tiny_klein, family, 40)

    def encode(layers):
        return families.prompt_encoder(family, {"text_encoder_out_layers": layers})([pipe.text_encoder], (ids, mask))[0]

    embeds = encode([9, 18, 27])
    reference, _ = pipe.encode_prompt(PROMPT, max_sequence_length=40)
    assert embeds.shape == (1, 40, 48) and torch.equal(embeds, reference)
    assert "<think>" in pipe.tokenizer.decode(ids[0])  # Qwen3's empty thinking block: enable_thinking=False
    assert torch.equal(encode([1, 2, 3]),
                       pipe.encode_prompt(PROMPT, max_sequence_length=40, text_encoder_out_layers=(1, 2, 3))[0])

    image = torch.rand(1, 3, 32, 32) * 2 - 1
    ours = family.prepare_latents(pipe.vae.encode(image).latent_dist.mode(), pipe.vae)
    assert ours.shape == (1, 128, 8, 8) and torch.equal(ours, pipe._encode_vae_image(image, None))

    latents = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(0))
    stepped = pipe(prompt_embeds=embeds, latents=latents, height=16, width=16, num_inference_steps=1,
                   guidance_scale=1.0, output_type="latent").images  # the VAE's latents; ours again: the transformer's
    sigma = pipe.scheduler.sigmas[0]
    velocity = family.denoise(pipe.transformer, latents, sigma[None] * 1000, embeds, mask, None)
    assert torch.allclose(family.prepare_latents(stepped, pipe.vae), latents - sigma * velocity, atol=1e-5)


@torch.no_grad()
def test_qwen_image_prompts_latents_and_call_are_the_pipelines_own(tiny_qwen_image):
    """Qwen-Image: the prompt (the pipeline's template, its 34 tokens dropped: what remains is the prompt and the
    template's end), the latents (one-frame clips of the video VAE, normalised per channel) and one Euler step of
    QwenImagePipeline against ours."""
    import model_calls

    pipe = loading.load_pipeline(tiny_qwen_image)
    family = families.QWEN_IMAGE
    prompts = [PROMPT, "a dog"]
    template = model_calls.QWEN_IMAGE_TEMPLATE
    assert len(pipe.tokenizer(template.split("{}")[0]).input_ids) == model_calls.QWEN_IMAGE_TEMPLATE_TOKENS == 34
    reference, reference_mask = pipe.encode_prompt(prompts, max_sequence_length=64)
    read = len(pipe.tokenizer(template.format(PROMPT)).input_ids) - 34  # the prompt's tokens and the template's end
    assert reference_mask.sum(1).tolist()[0] == read

    def encode(length):
        texts = [tokenized(tiny_qwen_image, family, length, prompt=p) for p in prompts]
        return family.encode_prompt([pipe.text_encoder], [torch.cat(t) for t in zip(*texts)])

    embeds, mask = encode(read)  # padded as far as the pipeline pads (the longest prompt): the same numbers
    assert torch.equal(embeds, reference) and torch.equal(mask, reference_mask)
    padded, padded_mask = encode(24)  # padded further: zeros, masked out
    assert torch.allclose(padded[:, :read], reference, atol=1e-6) and padded[:, read:].abs().max() == 0
    assert torch.equal(padded_mask[:, :read], reference_mask) and padded_mask[:, read:].sum() == 0

    image = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    ours = family.prepare_latents(family.encode_images(pipe.vae, image).sample(), pipe.vae)
    torch.manual_seed(0)
    theirs = pipe.vae.encode(image[:, :, None]).latent_dist.sample()  # diffusers' Qwen-Image script's normalisation
    config = pipe.vae.config
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (config.latents_mean, config.latents_std))
    assert ours.shape == (1, 4, 8, 8) and torch.equal(ours, ((theirs - mean) * (1.0 / std))[:, :, 0])

    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    packed = pipe._pack_latents(latents, 2, 4, 4, 4)
    stepped = pipe(prompt_embeds=padded, prompt_embeds_mask=padded_mask, latents=packed, height=16, width=16,
                   num_inference_steps=1, output_type="latent").images
    sigma = pipe.scheduler.sigmas[0]
    velocity = family.denoise(pipe.transformer, latents, sigma[None] * 1000, padded, padded_mask, None)
    assert torch.allclose(stepped, pipe._pack_latents(latents - sigma * velocity, 2, 4, 4, 4), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The scripts


def assert_the_lora_changes_the_images(pipe, base_model, run, tmp_path):
    """The run's LoRA file loads with the pipeline's own load_lora_weights and changes its images; infer.py on the run
    folder gives the base model's image at --lora_scale 0 and another one at 1."""
    def sample():
        return pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    before = sample()
    pipe.load_lora_weights(run)
    assert not (before == sample()).all()
    size = ("--height", 32, "--width", 32)  # (Qwen-Image's configs name no size: its pipeline's 1024 otherwise)
    base, tuned = infer_image(base_model, tmp_path / "base", *size), infer_image(run, tmp_path / "tuned", *size)
    zero = infer_image(run, tmp_path / "zero", "--lora_scale", 0, *size)
    assert Image.open(base).tobytes() == Image.open(zero).tobytes() != Image.open(tuned).tobytes()


def test_z_image_readme_lora_command_with_priors_loads_in_diffusers_and_infer(run, tiny_z_image, photos, tmp_path):
    """diffusers' Z-Image README command (its flags as written there, at a tiny size, plus --rank 4 and prior
    preservation): trains, samples its validation and class images with Z-Image's own defaults, and writes a LoRA
    file ZImagePipeline.load_lora_weights reads."""
    from diffusers import ZImagePipeline

    out, priors = tmp_path / "out", tmp_path / "priors"
    proc = run("train_dreambooth.py", "--pretrained_model_name_or_path", tiny_z_image, "--instance_data_dir", photos,
               "--output_dir", out, "--mixed_precision", "no", "--gradient_checkpointing", "--cache_latents",
               "--instance_prompt", PROMPT, "--resolution", 32, "--train_batch_size", 1, "--guidance_scale", "5.0",
               "--use_8bit_adam", "--gradient_accumulation_steps", 1, "--optimizer", "adamW", "--learning_rate",
               "1e-3", "--report_to", "tensorboard", "--lr_scheduler", "constant", "--lr_warmup_steps", 0,
               "--max_train_steps", 2, "--validation_prompt", "A photo of sks dog in a bucket", "--validation_epochs",
               25, "--seed", 0, "--rank", 4, "--max_sequence_length", 48, "--with_prior_preservation",
               "--class_data_dir", priors, "--class_prompt", "a photo of dog", "--num_class_images", 2,
               "--num_validation_images", 1, "--validation_inference_steps", 2, launch=False, check=False)
    if "bitsandbytes" in proc.stdout + proc.stderr and proc.returncode:
        pytest.skip("bitsandbytes is not installed here")  # the README's --use_8bit_adam
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--guidance_scale is not read when training a ZImagePipeline" in proc.stdout + proc.stderr
    config = json.loads((out / "run_config.json").read_text())["config"]
    assert (config["model_family"], config["weighting_scheme"], config["pre_compute_text_embeddings"],
            config["guidance_scale"]) == ("z-image", "none", True, None)
    made = json.loads(Image.open(priors / "000000.png").text["dreambooth_prior"])["settings"]
    assert (made["num_inference_steps"], made["guidance_scale"]) == (50, 5.0)  # ZImagePipeline's defaults
    assert (out / "validation" / "step-000002.png").exists()

    state = load_file(out / families.LORA_WEIGHTS)
    pipe = ZImagePipeline.from_pretrained(tiny_z_image)
    attention = {f"transformer.{name}" for name, m in pipe.transformer.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
                 and ".attention." in name}
    assert {k.rsplit(".lora", 1)[0] for k in state} == attention  # layers, refiners included
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if "lora_B" in k)

    assert_the_lora_changes_the_images(pipe, tiny_z_image, out, tmp_path)


def test_z_image_full_fine_tune_with_the_data_options_resumes_exactly_and_pre_computed_prompts_train_as_encoded(
        run, tiny_z_image, photos, tmp_path, capsys):
    """A full fine-tune of two subjects (one with a mask) in aspect-ratio buckets, prior preservation (class images
    made on the fly), caption dropout, EMA and Prodigy: resumed after step 2 it ends with the same transformer, bit for
    bit; encoding the prompts every step (--pre_compute_text_embeddings false) trains the same one; the text encoder
    and the VAE are saved unchanged."""
    import numpy as np

    cats = tmp_path / "cats"
    cats.mkdir()
    for i, size in enumerate([(48, 32), (32, 48)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(cats / f"c{i}.png")
    Image.fromarray(np.full((32, 48), 255, np.uint8)).save(cats / "c0.mask.png")  # h x w
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps([
        {"instance_prompt": PROMPT, "instance_data_dir": photos, "class_prompt": "a photo of dog",
         "class_data_dir": str(tmp_path / "dogs")},
        {"instance_prompt": "a photo of zwx cat", "instance_data_dir": str(cats), "class_prompt": "a photo of cat",
         "class_data_dir": str(tmp_path / "cats-priors")}]))
    reference, resumed, encoded = tmp_path / "reference", tmp_path / "resumed", tmp_path / "encoded"
    args = ["--model", tiny_z_image, "--concepts_list", concepts, "--resolution", 32, "--aspect_ratio_buckets",
            "32,32;32,48;48,32", "--with_prior_preservation", "--num_class_images", 2, "--caption_dropout", 0.5,
            "--use_ema", "--optimizer", "prodigy", "--max_train_steps", 4, "--checkpointing_steps", 2,
            "--train_batch_size", 1, "--max_sequence_length", 32, "--weighting_scheme", "logit_normal",
            "--random_flip", "--seed", 3, "--report_to", "none"]
    run("train_dreambooth.py", *args, "--output_dir", reference, launch=False)
    shutil.copytree(reference / "checkpoint-2", resumed / "checkpoint-2")  # as if the run had died after step 2
    shutil.copy(reference / "run_config.json", resumed)
    run("train_dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest", launch=False)
    run("train_dreambooth.py", *args, "--output_dir", encoded, "--pre_compute_text_embeddings", "false",
        "--checkpointing_steps", 100, launch=False)
    config = json.loads((reference / "run_config.json").read_text())["config"]
    assert config["masks"] == [str(cats / "c0.mask.png")] and len(config["buckets"]) > 1

    ref = weights(reference, "transformer")
    base = weights(Path(tiny_z_image), "transformer")
    assert any(not torch.equal(ref[k], base[k]) for k in ref)
    for other in (resumed, encoded):
        new = weights(other, "transformer")
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref), other.name
    for part in ("text_encoder", "vae"):
        saved, original = weights(reference, part), weights(Path(tiny_z_image), part)
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved), part
    assert type(loading.load_pipeline(str(reference))).__name__ == "ZImagePipeline"
    from test_bad_input_table import outcome  # no single-file layout for this family yet: one line, nothing written

    assert outcome("export", [reference, "--single_file"], capsys) == (
        1, f"error: --single_file: this version writes no single file for ZImagePipeline; {reference} is its "
           "diffusers folder")


def test_a_lora_trained_on_the_base_is_previewed_on_the_distilled_checkpoint(run, tiny_z_image, photos, tmp_path):
    """--validation_model_path: the validation images are the distilled checkpoint's (its own few steps and no
    guidance, known by its name) with the adapters being trained, exactly what ZImagePipeline gives with that
    checkpoint and the saved LoRA; the training is the same with and without the preview. Training on the distilled
    checkpoint itself draws a note naming the base."""
    import imagedata
    from diffusers import ZImagePipeline
    from make_tiny_model import make_tiny_z_image_pipeline

    turbo = tmp_path / "Z-Image-Turbo"  # the base's encoders and VAE, another transformer: as a distilled model
    shutil.copytree(tiny_z_image, turbo)
    shutil.rmtree(turbo / "transformer")
    make_tiny_z_image_pipeline(str(tmp_path / "other"), seed=1)
    shutil.copytree(tmp_path / "other" / "transformer", turbo / "transformer")
    args = ["--model", tiny_z_image, "--instance_dir", photos, "--instance_prompt", PROMPT, "--resolution", 32,
            "--rank", 4, "--learning_rate", "1e-2", "--max_train_steps", 2, "--max_sequence_length", 32,
            "--validation_prompt", PROMPT, "--num_validation_images", 1, "--validation_steps", 2, "--seed", 0,
            "--report_to", "none"]
    run("train_dreambooth.py", *args, "--output_dir", tmp_path / "plain", launch=False)
    proc = run("train_dreambooth.py", *args, "--output_dir", tmp_path / "preview", "--validation_model_path", turbo,
               launch=False)
    assert "distilled" not in proc.stdout + proc.stderr  # the base is trained: no note
    config = json.loads((tmp_path / "preview" / "run_config.json").read_text())["config"]
    assert (config["validation_inference_steps"], config["validation_guidance_scale"]) == (9, 0.0)
    lora = load_file(tmp_path / "preview" / families.LORA_WEIGHTS)
    plain = load_file(tmp_path / "plain" / families.LORA_WEIGHTS)
    assert lora.keys() == plain.keys() and all(torch.equal(lora[k], plain[k]) for k in lora)

    pipe = ZImagePipeline.from_pretrained(turbo)
    pipe.load_lora_weights(tmp_path / "preview")
    expected = pipe(PROMPT, height=32, width=32, num_inference_steps=9, guidance_scale=0.0, max_sequence_length=32,
                    generator=torch.Generator().manual_seed(imagedata.image_seed(0, 0))).images[0]
    shown = Image.open(tmp_path / "preview" / "validation" / "step-000002.png")
    assert shown.tobytes() == expected.tobytes()
    assert shown.tobytes() != Image.open(tmp_path / "plain" / "validation" / "step-000002.png").tobytes()

    proc = run("train_dreambooth.py", *args[:-6], "--model", turbo, "--max_train_steps", 1, "--output_dir",
               tmp_path / "on-turbo", "--report_to", "none", launch=False)
    assert (f"{turbo} is a distilled checkpoint: what is trained on it tends to come out blurry or without effect; "
            f"train on its base (Tongyi-MAI/Z-Image) and preview on this one with --validation_model_path {turbo}"
            ) in proc.stdout + proc.stderr


def test_a_preview_checkpoint_of_another_family_or_without_lora_is_refused(tiny_z_image, tiny_flux, photos, tmp_path,
                                                                           capsys):
    from test_bad_input_table import outcome

    base = ["--model", tiny_z_image, "--instance_dir", photos, "--instance_prompt", PROMPT, "--output_dir",
            tmp_path / "out", "--resolution", 32, "--validation_prompt", PROMPT]
    assert outcome("train", base + ["--rank", 4, "--validation_model_path", tiny_flux], capsys) == (
        1, f"error: --validation_model_path {tiny_flux} is a FluxPipeline, and {tiny_z_image} a ZImagePipeline: the "
           "LoRA fits a checkpoint of its own family only")
    assert outcome("train", base + ["--validation_model_path", tiny_z_image], capsys) == (
        1, "error: --validation_model_path samples another checkpoint with the LoRA being trained: give --lora_rank "
           "(a full fine-tune's validation images come from the model it trains)")
    assert not (tmp_path / "out").exists()


def test_flux2_klein_readme_lora_command_with_priors_loads_in_diffusers_and_infer(run, tiny_klein, photos, tmp_path):
    """diffusers' FLUX.2 klein README command (its flags as written there but --do_fp8_training, at a tiny size, plus
    --rank 4, prior preservation and caption dropout): its --guidance_scale accepted with a note (klein has no guidance
    embedding), class images at the base model's own settings (50 steps, guidance 4), the LoRA file that
    Flux2KleinPipeline.load_lora_weights reads (the attention, the single blocks' fused projections and outputs),
    images that change with it in diffusers and in infer.py."""
    from diffusers import Flux2KleinPipeline

    out, priors = tmp_path / "out", tmp_path / "priors"
    proc = run("train_dreambooth.py", "--pretrained_model_name_or_path", tiny_klein, "--instance_data_dir", photos,
               "--output_dir", out, "--gradient_checkpointing", "--cache_latents", "--instance_prompt", PROMPT,
               "--resolution", 32, "--train_batch_size", 1, "--guidance_scale", 1, "--use_8bit_adam",
               "--gradient_accumulation_steps", 4, "--optimizer", "adamW", "--learning_rate", "1e-3", "--report_to",
               "tensorboard", "--lr_scheduler", "constant", "--lr_warmup_steps", 1, "--max_train_steps", 2,
               "--validation_prompt", "A photo of sks dog in a bucket", "--validation_epochs", 25, "--seed", 0,
               "--rank", 4, "--with_prior_preservation", "--class_data_dir", priors, "--class_prompt",
               "a photo of dog", "--num_class_images", 2, "--max_sequence_length", 32, "--caption_dropout", 0.2,
               "--num_validation_images", 1, "--validation_inference_steps", 2, launch=False, check=False)
    if "bitsandbytes" in proc.stdout + proc.stderr and proc.returncode:
        pytest.skip("bitsandbytes is not installed here")  # the README's --use_8bit_adam
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--guidance_scale is not read when training a Flux2KleinPipeline" in proc.stdout + proc.stderr
    config = json.loads((out / "run_config.json").read_text())["config"]
    assert (config["model_family"], config["text_encoder_out_layers"]) == ("flux2-klein", [9, 18, 27])
    made = json.loads(Image.open(priors / "000000.png").text["dreambooth_prior"])["settings"]
    assert (made["num_inference_steps"], made["guidance_scale"]) == (50, 4.0)
    state = load_file(out / families.LORA_WEIGHTS)
    stems = {k.rsplit(".lora", 1)[0] for k in state}
    assert {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_out.0",
            "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj",
            "transformer.single_transformer_blocks.0.attn.to_out"} <= stems

    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)

    assert_the_lora_changes_the_images(pipe, tiny_klein, out, tmp_path)


def test_flux2_klein_full_fine_tune_resumes_exactly(run, tiny_klein, photos, tmp_path):
    """A full fine-tune on other hidden states (--text_encoder_out_layers 3 6 9) resumed after step 2 ends with the same
    transformer, bit for bit; the text encoder and the VAE are saved unchanged; infer.py samples the result with the
    layers it trained on."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    args = ["--model", tiny_klein, "--instance_dir", photos, "--instance_prompt", PROMPT, "--resolution", 32,
            "--learning_rate", "1e-4", "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 1,
            "--max_sequence_length", 32, "--text_encoder_out_layers", 3, 6, 9, "--cache_latents", "--seed", 3,
            "--report_to", "none"]
    run("train_dreambooth.py", *args, "--output_dir", reference, launch=False)
    shutil.copytree(reference / "checkpoint-2", resumed / "checkpoint-2")  # as if the run had died after step 2
    shutil.copy(reference / "run_config.json", resumed)
    run("train_dreambooth.py", *args, "--output_dir", resumed, "--resume_from_checkpoint", "latest", launch=False)

    ref, new, base = (weights(f, "transformer") for f in (reference, resumed, Path(tiny_klein)))
    assert any(not torch.equal(ref[k], base[k]) for k in ref)
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    for part in ("text_encoder", "vae"):
        saved, original = weights(reference, part), weights(Path(tiny_klein), part)
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved), part
    image = infer_image(reference, tmp_path / "infer")  # sampled with the layers it trained on, recorded in the PNG
    assert json.loads(Image.open(image).text["dreambooth"])["text_encoder_out_layers"] == [3, 6, 9]


def test_qwen_image_readme_lora_command_with_priors_loads_in_diffusers_and_infer(run, tiny_qwen_image, photos,
                                                                                  tmp_path):
    """diffusers' Qwen-Image README command (its flags as written there, at a tiny size, plus --rank 4, prior
    preservation and cached latents): class and validation images at QwenImagePipeline's defaults (50 steps,
    true_cfg_scale 4 against the empty prompt); encoding the prompts every step (padded to --max_sequence_length, in
    batches of instance and class prompts) trains the same LoRA, bit for bit, as the pre-computed prompts; the file
    QwenImagePipeline.load_lora_weights reads, the image stream's attention adapted."""
    from diffusers import QwenImagePipeline

    out, encoded, priors = (tmp_path / name for name in ("out", "encoded", "priors"))
    args = ["--pretrained_model_name_or_path", tiny_qwen_image, "--instance_data_dir", photos, "--mixed_precision",
            "no", "--instance_prompt", PROMPT, "--resolution", 32, "--train_batch_size", 1,
            "--gradient_accumulation_steps", 4, "--use_8bit_adam", "--learning_rate", "2e-3", "--report_to",
            "tensorboard", "--lr_scheduler", "constant", "--lr_warmup_steps", 0, "--max_train_steps", 2, "--seed",
            0, "--rank", 4, "--max_sequence_length", 32, "--with_prior_preservation", "--class_data_dir", priors,
            "--class_prompt", "a photo of dog", "--num_class_images", 2, "--cache_latents"]
    validation = ["--validation_prompt", "A photo of sks dog in a bucket", "--validation_epochs", 25,
                  "--num_validation_images", 1, "--validation_inference_steps", 2]
    proc = run("train_dreambooth.py", *args, *validation, "--output_dir", out, launch=False, check=False)
    if "bitsandbytes" in proc.stdout + proc.stderr and proc.returncode:
        pytest.skip("bitsandbytes is not installed here")  # the README's --use_8bit_adam
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "run_config.json").read_text())["config"]
    assert (config["model_family"], config["weighting_scheme"], config["pre_compute_text_embeddings"],
            config["validation_guidance_scale"]) == ("qwen-image", "none", True, 4.0)
    made = json.loads(Image.open(priors / "000000.png").text["dreambooth_prior"])["settings"]
    assert (made["num_inference_steps"], made["guidance_scale"]) == (50, 4.0)
    assert families.guidance_arguments(families.QWEN_IMAGE, config, 4.0, None, 1) == {  # guided against the empty
        "true_cfg_scale": 4.0, "negative_prompt": [""]}  # prompt, as classifier-free guidance means
    assert (out / "validation" / "step-000002.png").exists()

    run("train_dreambooth.py", *args, "--output_dir", encoded, "--pre_compute_text_embeddings", "false", launch=False)
    state, new = load_file(out / families.LORA_WEIGHTS), load_file(encoded / families.LORA_WEIGHTS)
    assert state.keys() == new.keys() and all(torch.equal(state[k], new[k]) for k in state)

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image)
    image_attention = {f"transformer.{name}" for name, m in pipe.transformer.named_modules()
                       if isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    assert {k.rsplit(".lora", 1)[0] for k in state} == image_attention
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if "lora_B" in k)

    assert_the_lora_changes_the_images(pipe, tiny_qwen_image, out, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["z-image", "flux2-klein", "qwen-image"])
def test_two_processes_train_every_adapter_of_a_language_model_family(run, family, tiny_z_image, tiny_klein,
                                                                      tiny_qwen_image, photos, tmp_path):
    """DDP over two CPU processes (gloo) with prior preservation: the run sees both processes and every adapter gets
    its gradient (none is left at its zero start)."""
    model = {"z-image": tiny_z_image, "flux2-klein": tiny_klein, "qwen-image": tiny_qwen_image}[family]
    out = tmp_path / "out"
    proc = run("train_dreambooth.py", "--model", model, "--instance_dir", photos, "--instance_prompt", PROMPT,
               "--output_dir", out, "--resolution", 32, "--rank", 4, "--learning_rate", "1e-3", "--max_train_steps", 2,
               "--max_sequence_length", 32, "--with_prior_preservation", "--class_data_dir", tmp_path / "priors",
               "--class_prompt", "a photo of dog", "--num_class_images", 2, "--report_to", "none",
               launch=["--multi_gpu", "--num_processes", 2], env={"ACCELERATE_USE_CPU": "true"})
    assert "2 process(es), global batch 8 (4 per device x 1 accumulation x 2)" in proc.stdout
    state = load_file(out / families.LORA_WEIGHTS)
    assert all(not torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if "lora_B" in k)
