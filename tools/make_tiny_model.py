"""Write a tiny, randomly initialised pipeline folder (SD, SDXL, FLUX.1, SD 3.5, Z-Image, FLUX.2 klein,
Qwen-Image) and a few sample photos.

Nothing is downloaded: every component is built from a config dict and saved with `save_pretrained`, so the
scripts load it through the same `from_pretrained` code they use for a hub model. The weights are random: the
images it makes are noise. It exists for the demo and the tests (a few MB, a training step in well under a
second on a CPU).

    python tools/make_tiny_model.py --output_dir tiny-sd [--prediction_type v_prediction] [--images_dir photos]
    python tools/make_tiny_model.py --output_dir tiny-sdxl --family sdxl
    python tools/make_tiny_model.py --output_dir tiny-flux --family flux    # also flux-schnell, sd3, z-image, flux2-klein, qwen-image

The SDXL one is built as diffusers' own SDXL tests build theirs: a `text_time` UNet (small `addition_time_embed_dim`
and `projection_class_embeddings_input_dim`), a `CLIPTextModel` and a `CLIPTextModelWithProjection` whose hidden
states side by side are the UNet's cross-attention width, and two tokenizers.
"""

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image, ImageDraw


def bytes_to_unicode():
    # The byte -> printable-character table of GPT-2/CLIP byte-level BPE (every byte gets a visible character).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder, pad_token="<|endoftext|>"):
    """A CLIP-format tokenizer with a byte-level vocabulary (every character, alone and word-final) and a few merges."""
    os.makedirs(folder, exist_ok=True)
    chars = bytes_to_unicode()
    merges = ["s k", "sk s</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>"]
    vocab_list = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77, pad_token=pad_token
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_vae(**kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        **{"latent_channels": 4, **kwargs},
    )


def tiny_text_config(tokenizer, hidden_size=32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# What the tiny UNets share, and the noise schedule both families ship (scaled-linear betas); training reads the
# model's scheduler config as DDPM.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                 norm_num_groups=32)
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)


def write_t5_tokenizer(folder, max_length=512):
    """A T5-format tokenizer (SentencePiece-style Unigram) with a small vocabulary: lower-case letters, digits and a
    few words, built with the tokenizers library (nothing downloaded)."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-<>")
    words = ["a", "photo", "of", "sks", "dog", "in", "the", "on"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars] + [
        ("\u2581" + c, -3.5) for c in chars] + [("\u2581" + w, -1.0) for w in words]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.normalizer, backend.pre_tokenizer, backend.decoder = normalizers.Lowercase(), pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


# Qwen3's chat template, cut to what the image pipelines use: user turns and the assistant's opening, with Qwen3's
# empty thinking block when enable_thinking is False
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")


def write_qwen_tokenizer(folder, words=()):
    """A Qwen2/Qwen3-format tokenizer (byte-level BPE, Qwen's special tokens and a chat template), with every byte in
    its vocabulary and a few merges, built with the tokenizers library (nothing downloaded); `words` become one token
    each, as in Qwen's own vocabulary (Qwen-Image's template: its 34 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    chars = bytes_to_unicode()
    merges = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o"), ("s", "k"), ("sk", "s"), ("d", "o"), ("do", "g"),
              ("Ġ", "a"), ("Ġ", "photo"), ("Ġ", "sks"), ("Ġ", "dog")]
    for word in (w.replace(" ", "Ġ") for w in words):  # each word merged from its first character on
        merges += [m for m in ((word[:i], word[i]) for i in range(1, len(word))) if m not in merges]
    vocab = {c: i for i, c in enumerate(chars + ["".join(m) for m in merges])}
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_qwen3(tokenizer, hidden_size=16, layers=2, causal_lm=False):
    import transformers

    config = transformers.Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=16,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                      head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    return (transformers.Qwen3ForCausalLM if causal_lm else transformers.Qwen3Model)(config)


def tiny_t5(tokenizer, d_model):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def make_tiny_flux_pipeline(output_dir, seed=0, guidance=True):
    """FLUX.1-shaped (as diffusers' FluxPipeline tests build theirs): double and single blocks, CLIP's pooled vector and
    T5's sequence, a VAE with a shift, FLUX.1-dev's scheduler (resolution-dependent shift); `guidance`: a
    guidance-distilled transformer (dev) or not (schnell)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(os.path.join(output_dir, "tokenizer"))
    tokenizer_2 = write_t5_tokenizer(os.path.join(output_dir, "tokenizer_2"))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(transformer=transformer, vae=tiny_vae(shift_factor=0.1159, scaling_factor=0.3611,
                                                              use_quant_conv=False, use_post_quant_conv=False),
                        text_encoder=CLIPTextModel(tiny_text_config(tokenizer)), tokenizer=tokenizer,
                        text_encoder_2=tiny_t5(tokenizer_2, 32), tokenizer_2=tokenizer_2,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                                  max_shift=1.15, base_image_seq_len=256,
                                                                  max_image_seq_len=4096))
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def make_tiny_sd3_pipeline(output_dir, seed=0):
    """SD 3.5-shaped: an MMDiT with qk RMS norm, two CLIP encoders with projections (the second wider, as CLIP-G) and
    T5, a VAE with a shift, SD 3.5's scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(os.path.join(output_dir, "tokenizer"))
    tokenizer_2 = write_clip_tokenizer(os.path.join(output_dir, "tokenizer_2"))
    tokenizer_3 = write_t5_tokenizer(os.path.join(output_dir, "tokenizer_3"), max_length=256)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
                                        qk_norm="rms_norm", dual_attention_layers=(0,))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(tiny_text_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, hidden_size=48)), tokenizer_2=tokenizer_2,
        text_encoder_3=tiny_t5(tokenizer_3, 96), tokenizer_3=tokenizer_3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def make_tiny_z_image_pipeline(output_dir, seed=0):
    """Z-Image-shaped (as diffusers' ZImagePipeline tests build theirs): the single-stream transformer with its
    refiner layers, a Qwen3 text encoder and tokenizer with the chat template, FLUX.1's kind of VAE (16 channels,
    shifted), Z-Image's scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(os.path.join(output_dir, "tokenizer"))
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # made with torch.empty: fixed, as diffusers' tests do
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    pipe = ZImagePipeline(transformer=transformer, text_encoder=tiny_qwen3(tokenizer), tokenizer=tokenizer,
                          vae=tiny_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
                                       use_quant_conv=False, use_post_quant_conv=False),
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


# The words of QwenImagePipeline's prompt template, as Qwen's tokenizer splits it
QWEN_IMAGE_WORDS = ("system", "Describe", " the", " image", " by", " detailing", " color", " shape", " size", " texture",
                    " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background", "user",
                    "assistant")


def make_tiny_qwen_image_pipeline(output_dir, seed=0):
    """Qwen-Image-shaped (as diffusers' QwenImagePipeline tests build theirs): the dual-stream transformer over
    2x2-patched latents, a Qwen2.5-VL model (its language model reads the prompt; a vision tower of two layers) and a
    tokenizer that splits the pipeline's template into its 34 tokens as Qwen's does, Qwen-Image's video VAE (a frame
    axis, per-channel mean and std: not the identity here)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(os.path.join(output_dir, "tokenizer"), words=QWEN_IMAGE_WORDS)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                 latents_std=[1.5, 0.8, 1.2, 2.0])
    n = len(tokenizer)
    config = Qwen2_5_VLConfig(text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": n,
                                           "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                           "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
                                                            "type": "default"}, "rope_theta": 1000000.0},
                              vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                                             "out_hidden_size": 16},
                              hidden_size=16, vocab_size=n, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.eos_token_id, vision_start_token_id=n, vision_end_token_id=n + 1,
                              vision_token_id=n + 2)  # no image ever goes in: ids past the vocabulary
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, tokenizer=tokenizer,
                             text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
                             scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def make_tiny_flux2_klein_pipeline(output_dir, seed=0, distilled=False):
    """FLUX.2 klein-shaped (as diffusers' Flux2KleinPipeline tests build theirs): double and single blocks over
    128-channel patchified latents, a Qwen3 causal LM whose hidden states 9, 18 and 27 (the pipeline's default) side by
    side are the prompt (28 layers of width 16), FLUX.2's VAE (32 channels, batch-norm statistics), klein's scheduler
    (resolution-dependent shift); `distilled`: marked as the few-step checkpoint."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(os.path.join(output_dir, "tokenizer"))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2(sample_size=64, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=32,
                             norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # batch-norm statistics of a trained VAE, not the identity
        vae.bn.running_mean.normal_(0, 0.1)
        vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = Flux2KleinPipeline(transformer=transformer, vae=vae, tokenizer=tokenizer, is_distilled=distilled,
                              text_encoder=tiny_qwen3(tokenizer, layers=28, causal_lm=True),
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                                        base_shift=0.5, max_shift=1.15,
                                                                        base_image_seq_len=256, max_image_seq_len=4096))
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def make_tiny_pipeline(output_dir, prediction_type="epsilon", seed=0, family="sd"):
    if family in ("flux2-klein", "flux2-klein-distilled"):
        return make_tiny_flux2_klein_pipeline(output_dir, seed, distilled=family.endswith("distilled"))
    if family == "qwen-image":
        return make_tiny_qwen_image_pipeline(output_dir, seed)
    if family == "z-image":
        return make_tiny_z_image_pipeline(output_dir, seed)
    if family == "sdxl":
        return make_tiny_sdxl_pipeline(output_dir, prediction_type, seed)
    if family in ("flux", "flux-schnell"):
        return make_tiny_flux_pipeline(output_dir, seed, guidance=family == "flux")
    if family == "sd3":
        return make_tiny_sd3_pipeline(output_dir, seed)
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(os.path.join(output_dir, "tokenizer"))
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    # The scheduler Stable Diffusion 1.5 ships
    scheduler = PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def make_tiny_sdxl_pipeline(output_dir, prediction_type="epsilon", seed=0):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(os.path.join(output_dir, "tokenizer"))
    tokenizer_2 = write_clip_tokenizer(os.path.join(output_dir, "tokenizer_2"), pad_token="!")  # as SDXL's second
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",  # SDXL's micro-conditioning: pooled text embedding + size/crop time ids
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of 8 each, and the pooled embedding
        cross_attention_dim=32 + 48,  # the two text encoders' hidden states side by side
    )
    vae = tiny_vae(force_upcast=True, scaling_factor=0.13025)  # SDXL's VAE: kept in fp32 under fp16
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    # wider than the first, as in SDXL (768 and 1280): loaders tell the two apart by their width
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, hidden_size=48))
    # The scheduler SDXL base 1.0 ships
    scheduler = EulerDiscreteScheduler(**BETAS, timestep_spacing="leading", prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def make_sample_photos(folder, n=4, size=64, seed=0):
    """A few "photos" of one subject: a two-colour ring at different places on different backgrounds."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        bg = tuple(int(v) for v in rng.integers(0, 256, size=3))
        img = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(img)
        r = size // 4
        cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(230, 40, 40))
        draw.ellipse([cx - r // 2, cy - r // 2, cx + r // 2, cy + r // 2], fill=(250, 220, 30))
        path = os.path.join(folder, f"photo_{i}.png")
        img.save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="where the pipeline folder is written")
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl", "flux", "flux-schnell", "sd3", "z-image", "flux2-klein",
                                                       "flux2-klein-distilled", "qwen-image"],
                        help="Stable Diffusion 1.x/2.x, SDXL, FLUX.1 (dev or schnell), SD 3.5, Z-Image, FLUX.2 klein "
                        "or Qwen-Image")
    parser.add_argument("--images_dir", default=None, help="also write a few sample subject photos here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_pipeline(args.output_dir, args.prediction_type, args.seed, args.family)
    print(f"tiny model written to {args.output_dir}")
    if args.images_dir:
        make_sample_photos(args.images_dir, seed=args.seed)
        print(f"sample photos written to {args.images_dir}")
