"""Model families, shared by the scripts: one row per family (what differs between Stable Diffusion 1.x/2.x, SDXL,
FLUX.1, SD 3.5, Z-Image, FLUX.2 klein and Qwen-Image: pipeline, text encoders and how a prompt becomes embeddings, how
the denoiser is called, the objective, flag defaults, key names of the files other tools read), the family read from the
model itself, distilled checkpoints by name, and the LoRA and pivotal-tuning helpers. The functions the rows name are
model_calls.py; loading models and pipelines is loading.py."""

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import cli
import loading
import model_calls as calls


# ----------------------------------------------------------------------------------------------------------------
# The families: one row each. A new family is a row (and, if its objective differs, an objective in objectives.py)


@dataclass(frozen=True)
class Family:
    """What differs between the model families, declared once and chosen once from the model itself (read_model):
    the scripts, the training step and export.py ask the row, never the family's name."""
    name: str
    pipeline: str  # the diffusers pipeline class, as model_index.json names it
    denoiser: str  # the denoiser's pipeline attribute and subfolder ("unet"; "transformer" for the flow families)
    denoiser_class: str  # its diffusers class
    detect: Callable  # the denoiser's config -> whether the model is of this family (SD and SDXL share a UNet class)
    objective: str  # what it is trained on (objectives.py): "ddpm" (noise prediction) or "flow" (flow matching)
    text_encoders: tuple  # (subfolder, transformers class) of each text encoder, in the order prompts go through them
    tokenizers: tuple  # the subfolders of their tokenizers
    tokenize: Callable  # (tokenizers, prompt) -> a tuple of 1-D tensors of fixed lengths: what encode_prompt reads
    sequence_tokenizer: str  # the tokenizer whose length --max_sequence_length sets ("": none)
    trained_text_encoders: tuple  # those --train_text_encoder trains (T5 never: as diffusers' scripts)
    encode_prompt: Callable  # (text encoders, tokenize's tensors batched) -> (prompt embeddings, pooled or mask)
    encoding_flags: tuple  # the flags encode_prompt and the pipeline's call take as keywords (same name in both)
    vae_class: str  # the VAE's diffusers class
    encode_images: Callable  # (the VAE, images) -> its latent distribution (a video VAE's: without the frame axis)
    prepare_latents: Callable  # (the VAE's latents, the VAE) -> the latents the denoiser is trained on
    patch_size: int  # latent pixels per image token along a side (flow matching's resolution-dependent shift)
    denoise: Callable  # (denoiser, noisy latents, timesteps, prompt embeddings, pooled, time ids, guidance) -> prediction
    freeze_unread: Callable  # {name: text encoder} -> None: freeze what never reaches the loss (None: nothing)
    lora_targets: tuple  # the denoiser's modules that get LoRA adapters by default (--lora_target_modules)
    size_multiple: int  # image sides in pixels: a multiple of this (the VAE's downsampling, and any patching)
    pipeline_kwargs: tuple  # (name, value) pairs from_pretrained needs so that nothing else loads
    embedding_arguments: Callable  # (embeddings, pooled, prefix) -> the pipeline's arguments for pre-computed ones
    upcast_vae: bool  # the pipeline decodes in fp32 when the VAE's config says force_upcast (SDXL's overflows in fp16)
    training_defaults: Callable  # the denoiser's config -> {flag: default} of the training flags this family reads
    sampling_defaults: Callable  # the denoiser's config -> sampler settings that differ from the scripts' defaults
    guidance_argument: Callable  # the denoiser's config -> the pipeline argument the sampling guidance scale goes to
    unguided_scale: float  # the scale at or under which the pipeline runs no guidance pass (1; Z-Image's: 0)
    embedding_keys: tuple  # a token-embeddings file's key per text encoder, as AUTOMATIC1111 and ComfyUI read it
    kohya_prefixes: tuple  # (model, prefix) of a kohya-format LoRA file's keys (): the diffusers file is the UIs' one
    peft_lora_keys: bool  # the denoiser's LoRA keys as peft names them (lora_A/lora_B), as diffusers' script for the
    # family writes them (its FLUX and SD3 scripts), or converted to diffusers' older UNet names (lora.down/lora.up)
    single_file_layout: str  # the original layout its single file is written in (singlefile.py: ldm, sgm; bfl and
    # mmdit for the transformer alone)
    hub_tag: str  # the model card's tag for the family

    @property
    def components(self):
        return (self.denoiser, "vae", "scheduler", *(name for name, _ in self.text_encoders), *self.tokenizers)

    @property
    def text_encoder_names(self):
        return [name for name, _ in self.text_encoders]

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


# Training flags whose default depends on the model. A family reads those its training_defaults name (with None:
# read, no default; IGNORED: accepted and not read, with a note, as the family's diffusers script accepts and ignores
# it: a command from its README runs unchanged) and refuses the others in one line.
IGNORED = "not read"
UNET_DEFAULTS = {"validation_scheduler": "dpm++_2m", "validation_guidance_scale": 7.5, "validation_inference_steps": 25,
                 "pre_compute_text_embeddings": False}
# Flow matching, as diffusers' FLUX and SD3 scripts: timesteps drawn by --weighting_scheme's density
FLOW_DEFAULTS = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "validation_scheduler": "flow_euler",
                 "validation_inference_steps": 28, "pre_compute_text_embeddings": True}


def flux_defaults(config):
    """FLUX.1: no loss weighting (diffusers' default for FLUX). A guidance-distilled checkpoint (dev: the transformer
    embeds a guidance value) is fed --guidance_scale 1.0 while training: the value the trainers settled on; diffusers'
    3.5 teaches the LoRA to expect guidance that sampling adds again, a known cause of weak FLUX LoRAs. schnell has no
    guidance input: the flag is refused, and it samples in 4 steps without guidance."""
    distilled = config.get("guidance_embeds", False)
    return {**FLOW_DEFAULTS, "weighting_scheme": "none", "max_sequence_length": 512,
            **({"guidance_scale": 1.0} if distilled else {}), **flux_sampling(config)}


def flux_guidance(config):
    """A guidance-distilled FLUX.1 (dev) takes the guidance value as an input of its transformer; one without the
    embedding (schnell, de-distilled and base checkpoints) is guided the classic way, a second pass with the negative
    prompt: FluxPipeline's true_cfg_scale."""
    return "guidance_scale" if config.get("guidance_embeds") else "true_cfg_scale"


def z_image_sampling(config):
    """ZImagePipeline's own defaults (the base model's; Z-Image-Turbo samples in 8-9 steps at 0)."""
    return {"validation_guidance_scale": 5.0, "validation_inference_steps": 50}


def flux_sampling(config):
    if config.get("guidance_embeds"):
        return {"validation_guidance_scale": 3.5, "validation_inference_steps": 28}
    return {"validation_guidance_scale": 0.0, "validation_inference_steps": 4}


UNET_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts
# The joint blocks' image and text attention; FLUX's feed-forwards too (diffusers' FLUX and SD3 LoRA scripts' lists)
MMDIT_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                      "attn.add_v_proj", "attn.to_add_out")
FLUX_LORA_TARGETS = MMDIT_LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

SD = Family(
    name="sd", pipeline="StableDiffusionPipeline", denoiser="unet", denoiser_class="UNet2DConditionModel",
    detect=lambda config: config.get("addition_embed_type") != "text_time", objective="ddpm",
    text_encoders=(("text_encoder", "CLIPTextModel"),), tokenizers=("tokenizer",), tokenize=calls.tokenize_padded,
    sequence_tokenizer="", trained_text_encoders=("text_encoder",), encode_prompt=calls.encode_sd,
    encoding_flags=(), vae_class="AutoencoderKL", encode_images=calls.image_latents,
    prepare_latents=calls.vae_latents, patch_size=2, denoise=calls.call_unet, freeze_unread=None,
    lora_targets=UNET_LORA_TARGETS, size_multiple=8,
    pipeline_kwargs=(("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)),
    embedding_arguments=calls.pipeline_embeddings(""), upcast_vae=False, training_defaults=lambda config: UNET_DEFAULTS,
    sampling_defaults=lambda config: {}, guidance_argument=lambda config: "guidance_scale", unguided_scale=1.0,
    embedding_keys=("emb_params",), kohya_prefixes=(("unet", "lora_unet"), ("text_encoder", "lora_te")),
    peft_lora_keys=False, single_file_layout="ldm", hub_tag="stable-diffusion")
# SDXL: two text encoders (the second with a projection: its pooled output conditions the UNet too). No invisible
# watermark: the same seed gives the same bytes whether or not the invisible-watermark package is installed.
SDXL = Family(
    name="sdxl", pipeline="StableDiffusionXLPipeline", denoiser="unet", denoiser_class="UNet2DConditionModel",
    detect=lambda config: config.get("addition_embed_type") == "text_time", objective="ddpm",
    text_encoders=(("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")),
    tokenizers=("tokenizer", "tokenizer_2"), tokenize=calls.tokenize_padded, sequence_tokenizer="",
    trained_text_encoders=("text_encoder", "text_encoder_2"), encode_prompt=calls.encode_sdxl,
    encoding_flags=(), vae_class="AutoencoderKL", encode_images=calls.image_latents,
    prepare_latents=calls.vae_latents, patch_size=2, denoise=calls.call_unet,
    freeze_unread=calls.freeze_unread_sdxl_layers, lora_targets=UNET_LORA_TARGETS,
    size_multiple=8, pipeline_kwargs=(("add_watermarker", False),),
    embedding_arguments=calls.pipeline_embeddings("pooled_prompt_embeds"), upcast_vae=True,
    training_defaults=lambda config: UNET_DEFAULTS, sampling_defaults=lambda config: {},
    guidance_argument=lambda config: "guidance_scale", unguided_scale=1.0, embedding_keys=("clip_l", "clip_g"),
    kohya_prefixes=(("unet", "lora_unet"), ("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")),
    peft_lora_keys=False, single_file_layout="sgm", hub_tag="stable-diffusion-xl")
# FLUX.1 (dev, schnell and FLUX.1-shaped checkpoints): CLIP-L's pooled vector and T5-XXL's sequence; a 2x2-patched
# latent, so sides in multiples of 16. ComfyUI reads diffusers' LoRA file for FLUX ("transformer.<module>" keys).
FLUX = Family(
    name="flux", pipeline="FluxPipeline", denoiser="transformer", denoiser_class="FluxTransformer2DModel",
    detect=lambda config: True, objective="flow",
    text_encoders=(("text_encoder", "CLIPTextModel"), ("text_encoder_2", "T5EncoderModel")),
    tokenizers=("tokenizer", "tokenizer_2"), tokenize=calls.tokenize_padded, sequence_tokenizer="tokenizer_2",
    trained_text_encoders=("text_encoder",), encode_prompt=calls.encode_flux,
    encoding_flags=(), vae_class="AutoencoderKL", encode_images=calls.image_latents,
    prepare_latents=calls.vae_latents, patch_size=2, denoise=calls.call_flux, freeze_unread=None,
    lora_targets=FLUX_LORA_TARGETS, size_multiple=16, pipeline_kwargs=(),
    embedding_arguments=calls.pipeline_embeddings("pooled_prompt_embeds"), upcast_vae=False,
    training_defaults=flux_defaults, sampling_defaults=flux_sampling, guidance_argument=flux_guidance,
    unguided_scale=1.0, embedding_keys=("clip_l", "t5"), kohya_prefixes=(), peft_lora_keys=True,
    single_file_layout="bfl", hub_tag="flux")
# SD3 and SD 3.5: CLIP-L and CLIG-G (pooled and sequence) and T5-XXL; logit-normal timesteps and preconditioned
# outputs by default, as diffusers' SD3 scripts; --lora_blocks picks joint blocks.
SD3 = Family(
    name="sd3", pipeline="StableDiffusion3Pipeline", denoiser="transformer", denoiser_class="SD3Transformer2DModel",
    detect=lambda config: True, objective="flow",
    text_encoders=(("text_encoder", "CLIPTextModelWithProjection"), ("text_encoder_2", "CLIPTextModelWithProjection"),
                   ("text_encoder_3", "T5EncoderModel")),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"), tokenize=calls.tokenize_padded,
    sequence_tokenizer="tokenizer_3", trained_text_encoders=("text_encoder", "text_encoder_2"),
    encode_prompt=calls.encode_sd3, encoding_flags=(), vae_class="AutoencoderKL", encode_images=calls.image_latents,
    prepare_latents=calls.vae_latents, patch_size=2, denoise=calls.call_sd3, freeze_unread=None,
    lora_targets=MMDIT_LORA_TARGETS, size_multiple=16, pipeline_kwargs=(),
    embedding_arguments=calls.pipeline_embeddings("pooled_prompt_embeds"), upcast_vae=False,
    training_defaults=lambda config: {**FLOW_DEFAULTS, "weighting_scheme": "logit_normal", "precondition_outputs": 1,
                                      "max_sequence_length": 77, "lora_blocks": None, "validation_guidance_scale": 7.0},
    sampling_defaults=lambda config: {"validation_guidance_scale": 7.0, "validation_inference_steps": 28},
    guidance_argument=lambda config: "guidance_scale", unguided_scale=1.0,
    embedding_keys=("clip_l", "clip_g", "t5"), kohya_prefixes=(), peft_lora_keys=True, single_file_layout="mmdit",
    hub_tag="sd3")
# Z-Image (Turbo and base): one Qwen3 language model as text encoder (its chat template, second-to-last layer, each
# prompt's unpadded tokens), a single-stream transformer over FLUX.1's kind of latents; the attention projections get
# LoRA, as diffusers' Z-Image script. Its pipeline guides above a scale of 0 (g is classic guidance's g + 1).
Z_IMAGE = Family(
    name="z-image", pipeline="ZImagePipeline", denoiser="transformer", denoiser_class="ZImageTransformer2DModel",
    detect=lambda config: True, objective="flow", text_encoders=(("text_encoder", "Qwen3Model"),),
    tokenizers=("tokenizer",), tokenize=calls.tokenize_chat, sequence_tokenizer="tokenizer", trained_text_encoders=(),
    encode_prompt=calls.encode_z_image, encoding_flags=(), vae_class="AutoencoderKL", encode_images=calls.image_latents,
    prepare_latents=calls.vae_latents, patch_size=2, denoise=calls.call_z_image, freeze_unread=None,
    lora_targets=UNET_LORA_TARGETS, size_multiple=16, pipeline_kwargs=(),
    embedding_arguments=calls.unpadded_embeddings, upcast_vae=False,
    training_defaults=lambda config: {**FLOW_DEFAULTS, "weighting_scheme": "none", "max_sequence_length": 512,
                                      "guidance_scale": IGNORED, **z_image_sampling(config)},
    sampling_defaults=z_image_sampling, guidance_argument=lambda config: "guidance_scale", unguided_scale=0.0,
    embedding_keys=(), kohya_prefixes=(), peft_lora_keys=True, single_file_layout="", hub_tag="z-image")
# FLUX.2 klein (4 B and 9 B, base and distilled): a Qwen3 causal LM whose hidden states of several layers side by side
# are the prompt (--text_encoder_out_layers: the pipeline's 9, 18, 27; diffusers' script defaults to 10, 20, 30, which
# its pipeline never reads), FLUX.2's VAE (32 channels; the transformer sees its latents in 2x2 patches, normalised by
# its batch-norm statistics), double- and single-stream blocks; LoRA on the attention, the single blocks' fused
# projections and their outputs, as diffusers' klein script. No guidance embedding in klein: --guidance_scale (in
# diffusers' klein README command) is accepted with a note, as its script reads it only where there is one.
FLUX2_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                      *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(48)))
FLUX2_KLEIN = Family(
    name="flux2-klein", pipeline="Flux2KleinPipeline", denoiser="transformer", denoiser_class="Flux2Transformer2DModel",
    detect=lambda config: True, objective="flow", text_encoders=(("text_encoder", "Qwen3ForCausalLM"),),
    tokenizers=("tokenizer",), tokenize=functools.partial(calls.tokenize_chat, thinking=False),
    sequence_tokenizer="tokenizer", trained_text_encoders=(), encode_prompt=calls.encode_flux2,
    encoding_flags=("text_encoder_out_layers",), vae_class="AutoencoderKLFlux2", encode_images=calls.image_latents,
    prepare_latents=calls.flux2_latents, patch_size=1, denoise=calls.call_flux2, freeze_unread=None,
    lora_targets=FLUX2_LORA_TARGETS, size_multiple=16, pipeline_kwargs=(),
    embedding_arguments=calls.pipeline_embeddings(""), upcast_vae=False,
    training_defaults=lambda config: {**FLOW_DEFAULTS, "weighting_scheme": "none", "max_sequence_length": 512,
                                      "text_encoder_out_layers": (9, 18, 27), "validation_guidance_scale": 4.0,
                                      "validation_inference_steps": 50,
                                      "guidance_scale": 1.0 if config.get("guidance_embeds") else IGNORED},
    sampling_defaults=lambda config: {"validation_guidance_scale": 4.0, "validation_inference_steps": 50},
    guidance_argument=lambda config: "guidance_scale", unguided_scale=1.0, embedding_keys=(), kohya_prefixes=(),
    peft_lora_keys=True, single_file_layout="", hub_tag="flux2-klein")
# Qwen-Image: the Qwen2.5-VL model's last hidden states of the prompt in the pipeline's template (its first 34 tokens
# dropped), a dual-stream transformer over 2x2-patched latents of a video VAE (a frame axis; per-channel mean and std);
# classic guidance with a second pass (true_cfg_scale), as FLUX.1 without a guidance embedding. LoRA on the image
# stream's attention projections, as diffusers' Qwen-Image script.
QWEN_IMAGE = Family(
    name="qwen-image", pipeline="QwenImagePipeline", denoiser="transformer",
    denoiser_class="QwenImageTransformer2DModel", detect=lambda config: True, objective="flow",
    text_encoders=(("text_encoder", "Qwen2_5_VLForConditionalGeneration"),), tokenizers=("tokenizer",),
    tokenize=calls.tokenize_qwen_image, sequence_tokenizer="tokenizer", trained_text_encoders=(),
    encode_prompt=calls.encode_qwen_image, encoding_flags=(), vae_class="AutoencoderKLQwenImage",
    encode_images=calls.frame_latents, prepare_latents=calls.qwen_image_latents, patch_size=2,
    denoise=calls.call_qwen_image, freeze_unread=None, lora_targets=UNET_LORA_TARGETS, size_multiple=16,
    pipeline_kwargs=(), embedding_arguments=calls.pipeline_embeddings("prompt_embeds_mask"), upcast_vae=False,
    training_defaults=lambda config: {**FLOW_DEFAULTS, "weighting_scheme": "none", "max_sequence_length": 512,
                                      **({"guidance_scale": 1.0} if config.get("guidance_embeds") else {}),
                                      "validation_guidance_scale": 4.0, "validation_inference_steps": 50},
    sampling_defaults=lambda config: {"validation_guidance_scale": 4.0, "validation_inference_steps": 50},
    guidance_argument=flux_guidance, unguided_scale=1.0, embedding_keys=(), kohya_prefixes=(), peft_lora_keys=True,
    single_file_layout="", hub_tag="qwen-image")
FAMILIES = {family.name: family for family in (SD, SDXL, FLUX, SD3, Z_IMAGE, FLUX2_KLEIN, QWEN_IMAGE)}
# every flag some family reads; read_model's caller refuses those the model's family does not, saying what it is for
FAMILY_FLAGS = tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.training_defaults({"guidance_embeds": True})))
FLAG_SCOPES = {"flow": "flow-matching models (FLUX.1, SD 3.5, Z-Image, FLUX.2 klein, Qwen-Image)",
               "precondition_outputs": "SD3 and SD 3.5",
               "lora_blocks": "SD3 and SD 3.5 (their joint blocks)",
               "max_sequence_length": "models with a T5 or language-model encoder",
               "text_encoder_out_layers": "FLUX.2 klein (the Qwen3 layers its prompt is read from)",
               "guidance_scale": "guidance-distilled FLUX.1 (dev: a transformer with a guidance embedding)"}


def family_of(pipe):
    """The row of a loaded pipeline."""
    return next(f for f in FAMILIES.values() if type(pipe).__name__ == f.pipeline)


def family_of_record(config):
    """The row of a run's record (run_config.json's config); records of versions before SDXL have none: SD's."""
    return FAMILIES[config.get("model_family", SD.name)]
DENOISERS = tuple(dict.fromkeys(family.denoiser for family in FAMILIES.values()))  # their subfolders, in row order


class Model(NamedTuple):
    family: Family
    resolution: int  # native: 512 SD 1.5, 768 SD 2.x, 1024 SDXL, FLUX.1 and SD 3.5
    config: dict  # the denoiser's config (its row's defaults read it: a distilled FLUX.1 has a guidance embedding)
    sequence_length: int = 0  # the sequence tokenizer's own model_max_length (T5's; 0: none, or the family has none)
    name: str = ""  # the hub id or folder it was read from (a distilled checkpoint is known by its name)


# Distilled checkpoints, known by their names (their configs are the base's): a LoRA trained on one comes out blurry
# or without effect (a recurring report in every trainer's tracker). Train on the base, preview on the distilled model
# (--validation_model_path). name part -> (the base to train, the distilled model's own sampler settings)
KLEIN_DISTILLED = {"validation_guidance_scale": 1.0, "validation_inference_steps": 4}
DISTILLED = {"z-image-turbo": ("Tongyi-MAI/Z-Image",
                               {"validation_guidance_scale": 0.0, "validation_inference_steps": 9}),
             "flux.2-klein-4b": ("black-forest-labs/FLUX.2-klein-base-4B", KLEIN_DISTILLED),
             "flux.2-klein-9b": ("black-forest-labs/FLUX.2-klein-base-9B", KLEIN_DISTILLED)}


def distilled(name_or_path):
    """(base, sampler settings) when the name marks a distilled checkpoint, else None."""
    name = Path(str(name_or_path).rstrip("/")).name.lower()
    return next((value for part, value in DISTILLED.items() if part in name), None)


def sampling_defaults(model):
    """The sampler settings that differ from the scripts' defaults: the family's, a distilled checkpoint's own."""
    return {**model.family.sampling_defaults(model.config), **(distilled(model.name) or ("", {}))[1]}


def prompt_encoder(family, config):
    """The family's encode_prompt with the run's encoding flags (FLUX.2 klein: --text_encoder_out_layers)."""
    return functools.partial(family.encode_prompt, **{flag: tuple(config[flag]) for flag in family.encoding_flags})


def encoding_arguments(family, config):
    """The pipeline call's keywords for the run's encoding flags, as it trained ({} where the record has none)."""
    return {flag: tuple(config[flag]) for flag in family.encoding_flags if config.get(flag)}


def guidance_arguments(family, config, scale, negative, n):
    """The pipeline call's guidance for n images: the scale in the argument the family's pipeline reads it from, and
    the negative prompt where a guidance pass reads it. A pipeline that guides with a second pass (true_cfg_scale)
    does so only when it has a negative prompt: the empty one when none is given, as classifier-free guidance means."""
    name = family.guidance_argument(config)
    if not guides_with_negative(family, config, scale):
        negative = None  # no second pass reads it (the images are the same with and without it)
    elif name == "true_cfg_scale" and not negative:
        negative = ""
    return {name: scale, **({} if negative is None else {"negative_prompt": [negative] * n})}


def takes_negative_prompt(family):
    """Whether the family's pipeline has a negative prompt (Flux2KleinPipeline guides against the empty prompt only)."""
    import inspect

    return "negative_prompt" in inspect.signature(family.pipeline_class().__call__).parameters


def guides_with_negative(family, config, scale):
    """Whether sampling at this scale runs classifier-free guidance, the pass that reads the negative prompt: above
    1 (Z-Image: 0), where the scale is not an input of the transformer (a guidance-distilled FLUX.1 runs no second
    pass) and the pipeline takes a negative prompt."""
    distilled = family.guidance_argument(config) == "guidance_scale" and config.get("guidance_embeds")
    return scale > family.unguided_scale and not distilled and takes_negative_prompt(family)


def sampling_sequence_length(family, pipe):
    """T5's prompt length when sampling: the pipeline's default, or the tokenizer's own length where that is shorter
    (a model trained on shorter prompts, as the toy FLUX.1; a full fine-tune saves its tokenizer with the length it
    trained with). {} for families without a sequence tokenizer."""
    import inspect

    if not family.sequence_tokenizer:
        return {}
    default = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    return {"max_sequence_length": min(default, getattr(pipe, family.sequence_tokenizer).model_max_length)}


def family_of_single_file(keys, path):
    """The row of a single-file checkpoint, from its keys (the web UIs' files of SD 1.x/2.x and SDXL; SDXL's has a
    second text encoder under conditioner.embedders.1)."""
    if any({"double_blocks", "joint_blocks"} & set(k.split(".")) for k in keys):
        cli.fail(f"{path} is a FLUX.1 or SD3 single file: give the model as a diffusers folder or hub id (single files "
                 "of these families are not read by this version)")
    if not any(k.startswith(("model.diffusion_model.", "conditioner.", "cond_stage_model.", "first_stage_model."))
               for k in keys):  # no model: say what it is, rather than what the converter could not find online
        embeddings = {k.split(".")[0] for k in keys} <= {"emb_params", "clip_l", "clip_g", "t5", "string_to_param"}
        lora = any("lora" in k.lower() for k in keys)
        what = ("a LoRA file, not a model" if lora else "a token-embeddings file (textual inversion), not a model"
                if keys and embeddings else "no model checkpoint (none of its keys is a model's)")
        cli.fail(f"{path} is {what}: give the base model (a diffusers folder, hub id or checkpoint file) as the model"
                 + ("; infer.py takes the adapters with --lora" if lora else ""))
    return SDXL if any(k.startswith("conditioner.embedders.1.") for k in keys) else SD


def read_model(name_or_path, revision=None):
    """The model's family, native resolution and denoiser config, from model_index.json and the denoiser's and VAE's
    configs, before any weights load. The family is the row whose pipeline and denoiser class model_index.json names
    (SD and SDXL share a UNet class: SDXL's UNet takes the pooled text embedding and the size/crop time ids,
    addition_embed_type "text_time"). The native resolution is the denoiser's sample size times the VAE's
    downsampling, or the VAE's own sample size where the denoiser has none (FLUX.1)."""
    import diffusers
    from diffusers import AutoencoderKL, DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except (OSError, ValueError) as e:
        loading.load_error("the model config", name_or_path, e)
    rows = [f for f in FAMILIES.values() if (index.get(f.denoiser) or [None, None])[1] == f.denoiser_class]
    try:
        denoiser = getattr(diffusers, rows[0].denoiser_class).load_config(
            name_or_path, subfolder=rows[0].denoiser, revision=revision) if rows else {}
        vae = AutoencoderKL.load_config(name_or_path, subfolder="vae", revision=revision)
    except (OSError, ValueError) as e:
        loading.load_error("the model config", name_or_path, e)
    family = next((f for f in rows if f.detect(denoiser)), None)
    if family is None:
        cli.fail(f"{name_or_path} is a {index.get('_class_name', 'model of unknown kind')}: this suite trains "
                 + ", ".join(f.pipeline for f in FAMILIES.values()))
    return Model(family, native_resolution(denoiser, vae), dict(denoiser),
                 tokenizer_length(name_or_path, family.sequence_tokenizer, revision), str(name_or_path))


def native_resolution(denoiser, vae):
    """The denoiser's sample size times the VAE's downsampling (a video VAE's: its temporal_downsample levels), or the
    VAE's own sample size where the denoiser has none (FLUX.1), or 1024 where neither config says (Qwen-Image: its
    pipeline's default)."""
    factor = 2 ** (len(vae["block_out_channels"]) - 1 if "block_out_channels" in vae else len(vae["temperal_downsample"]))
    return denoiser["sample_size"] * factor if denoiser.get("sample_size") else vae.get("sample_size", 1024)


def tokenizer_length(name_or_path, subfolder, revision=None):
    """A tokenizer's model_max_length from its config file, before anything loads (0: no such tokenizer or value)."""
    from transformers.utils import cached_file

    if not subfolder:
        return 0
    try:
        path = cached_file(name_or_path, "tokenizer_config.json", subfolder=subfolder, revision=revision,
                           _raise_exceptions_for_missing_entries=False)
        length = json.loads(Path(path).read_text()).get("model_max_length", 0) if path else 0
    except (OSError, ValueError) as e:
        loading.load_error("the tokenizer config", name_or_path, e)
    return int(length) if isinstance(length, (int, float)) and length < 10**9 else 0


# ----------------------------------------------------------------------------------------------------------------
# LoRA and pivotal tuning


# LoRA through peft: the text encoders' attention projections (the denoiser's are in the family rows)
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
EMBEDDINGS = "{name}_emb.safetensors"  # pivotal tuning's tokens, named after the run as diffusers' advanced script does
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name: load_lora_weights(folder) finds it
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"  # the same adapters under kohya's names, for the web UIs


# Text-encoder weights in files keep the names the ecosystem reads: transformers 4's CLIP layout ("text_model.encoder.
# layers.N..."), which diffusers' LoRA files, kohya's and every web UI's key map use. important! transformers 5's
# CLIPTextModel dropped its `text_model` level (CLIPTextModelWithProjection kept it): written with the module's own
# names, ComfyUI drops every first-text-encoder layer of a LoRA without an error, only "lora key not loaded" lines.
CLIP_LEVEL = "text_model."


def file_keys(state, encoder_class):
    """A text encoder's state (keys relative to the encoder) under the files' names, whichever transformers built it."""
    if not encoder_class.startswith("CLIPText"):
        return state
    return {k if k.startswith((CLIP_LEVEL, "text_projection.")) else CLIP_LEVEL + k: v for k, v in state.items()}


def module_keys(state, module):
    """The files' names of a text encoder's state (or a file of an older version, without the level) -> the names of
    `module` as the installed transformers builds it."""
    state = file_keys(state, type(module).__name__)
    if not type(module).__name__.startswith("CLIPText") or hasattr(module, "text_model"):
        return state
    return {k.removeprefix(CLIP_LEVEL): v for k, v in state.items()}


def pivot_prompt(prompt, word, tokens):
    """Pivotal tuning: the identifier in a prompt replaced by the run's new tokens ("a photo of sks dog" -> "a photo
    of <s0><s1> dog"): as a whole word in any case (CLIP lower-cases what it reads: "SKS" is "sks" to it), any
    characters in it ("<sks>")."""
    return re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", "".join(tokens), prompt, flags=re.IGNORECASE)


def check_token_budget(family, tokenizers, prompt, word, num_tokens, max_sequence_length):
    """Pivotal tuning: refuse a prompt that its identifier's new tokens push past a text encoder's length (the words
    after them would be cut off without a word)."""
    for sub, encoder, tokenizer in zip(family.tokenizers, family.text_encoder_names, tokenizers):
        limit = max_sequence_length if sub == family.sequence_tokenizer else tokenizer.model_max_length
        uses = len(pivot_prompt(prompt, word, ["<>"]).split("<>")) - 1
        length = len(tokenizer(pivot_prompt(prompt, word, []), verbose=False).input_ids) + num_tokens * uses
        if length > limit:
            cli.fail(f"with {num_tokens} new tokens (--num_new_tokens_per_abstraction) the prompt '{prompt}' is "
                     f"{length} tokens, past {encoder}'s {limit}: the words after them would be cut off; use fewer "
                     "tokens or a shorter prompt")


def load_token_embeddings(pipe, path, family, tokens):
    """A pivotal-tuning embeddings file into a pipeline: each text encoder's rows under the run's tokens, through
    diffusers' load_textual_inversion (the file is in the web UIs' format: one key per text encoder)."""
    from safetensors.torch import load_file

    state = load_file(path)
    for key, (encoder, _), tokenizer in zip(family.embedding_keys, family.text_encoders, family.tokenizers):
        pipe.load_textual_inversion(state[key], token=list(tokens), text_encoder=getattr(pipe, encoder),
                                    tokenizer=getattr(pipe, tokenizer))


def add_new_tokens(tokenizers, text_encoders, new_tokens, initializer_concept=None):
    """Pivotal tuning: the run's new tokens (<s0><s1>...) join every tokenizer, and each text encoder's embedding
    matrix grows by their rows, which start from --initializer_concept's embedding (its tokens' mean) or at random with
    the matrix's spread (diffusers' advanced script). Only those rows train: the matrix becomes an fp32 parameter
    whose gradient is masked to them, and it gets no weight decay (make_optimizer), so every other row stays
    bit-identical. Returns the new rows' ids, per text encoder."""
    ids = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        if any(t in tokenizer.get_vocab() for t in new_tokens):
            cli.fail(f"the tokenizer already has the tokens {new_tokens}")
        tokenizer.add_tokens(new_tokens)
        new = tokenizer.convert_tokens_to_ids(new_tokens)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        weight = encoder.get_input_embeddings().weight
        weight.data = weight.data.float()
        with torch.no_grad():
            if initializer_concept:
                concept = tokenizer(initializer_concept, add_special_tokens=False).input_ids
                weight[new] = weight[concept].mean(0)
            else:
                weight[new] = torch.randn(len(new), weight.shape[1]).to(weight) * weight[:new[0]].std()
        trained = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
        trained[new] = True
        weight.requires_grad_(True).register_hook(lambda grad, trained=trained: torch.where(trained, grad, 0))
        ids.append(new)
    return ids


def add_lora(model, config, targets):
    """Inject LoRA adapters (the run config's rank, alpha, dropout, DoRA) into a diffusers or transformers model."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=config["lora_rank"], lora_alpha=config["lora_alpha"] or config["lora_rank"],
                                 lora_dropout=config["lora_dropout"], init_lora_weights="gaussian",
                                 use_dora=bool(config.get("use_dora")), target_modules=targets))
