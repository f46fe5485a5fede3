"""What the family rows of families.py name: how a prompt becomes token tensors and embeddings, how each family's
denoiser is called (in the latents' own layout, so the loss, masks and buckets never see a family's packing), what never
trains, how latents are scaled, how pre-computed embeddings go into a pipeline call. Tensors in, tensors out."""

import torch

# QwenImagePipeline's prompt template and the number of its tokens dropped from the encoding (the system turn and the
# user turn's opening: the prompt's own tokens and the template's end are what the transformer reads)
QWEN_IMAGE_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                       "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                       "<|im_end|>\n<|im_start|>assistant\n")
QWEN_IMAGE_TEMPLATE_TOKENS = 34


def tokenize_padded(tokenizers, prompt):
    """Token ids per tokenizer, each padded to its own length (CLIP's 77, T5's --max_sequence_length)."""
    return tuple(t(prompt, padding="max_length", truncation=True, max_length=t.model_max_length,
                   return_tensors="pt").input_ids[0] for t in tokenizers)


def tokenize_chat(tokenizers, prompt, thinking=True):
    """A language-model encoder (Qwen3): the prompt as the user's turn of the tokenizer's chat template with the
    assistant's turn opened (thinking on for ZImagePipeline, off for Flux2KleinPipeline), padded to
    --max_sequence_length: (token ids, attention mask)."""
    tokenizer = tokenizers[0]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    out = tokenizer(text, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt")
    return out.input_ids[0], out.attention_mask[0]


def tokenize_qwen_image(tokenizers, prompt):
    """Qwen-Image: the prompt in the pipeline's template, padded to the template's 34 tokens + --max_sequence_length:
    (token ids, attention mask)."""
    tokenizer = tokenizers[0]
    out = tokenizer(QWEN_IMAGE_TEMPLATE.format(prompt), padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length + QWEN_IMAGE_TEMPLATE_TOKENS, return_tensors="pt")
    return out.input_ids[0], out.attention_mask[0]


def encode_sd(text_encoders, ids):
    """SD 1.x/2.x: the text encoder's last hidden state (StableDiffusionPipeline.encode_prompt). Its pooled output
    rides along unused: this UNet has no added embedding and ignores it."""
    out = text_encoders[0](ids[0])
    return out.last_hidden_state, out.pooler_output


def encode_sdxl(text_encoders, ids):
    """SDXL: the penultimate hidden states of both encoders side by side, and the second's projected pooled output
    (StableDiffusionXLPipeline.encode_prompt)."""
    outs = [encoder(i, output_hidden_states=True) for encoder, i in zip(text_encoders, ids)]
    return torch.cat([out.hidden_states[-2] for out in outs], dim=-1), outs[-1].text_embeds


def encode_flux(text_encoders, ids):
    """FLUX.1: CLIP's pooled output, T5's last hidden state as the sequence (FluxPipeline.encode_prompt)."""
    clip, t5 = text_encoders
    return t5(ids[1]).last_hidden_state, clip(ids[0]).pooler_output


def encode_sd3(text_encoders, ids):
    """SD3 and 3.5: both CLIP encoders' penultimate hidden states side by side, zero-padded to T5's width, then T5's
    sequence after them; the pooled vector is both CLIPs' projected outputs side by side
    (StableDiffusion3Pipeline.encode_prompt)."""
    outs = [encoder(i, output_hidden_states=True) for encoder, i in zip(text_encoders[:2], ids[:2])]
    t5 = text_encoders[2](ids[2]).last_hidden_state
    clip = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([out.text_embeds for out in outs], dim=-1)


def encode_z_image(text_encoders, texts):
    """Z-Image: the Qwen3 encoder's second-to-last hidden states, and the attention mask in the pooled embedding's
    place (the transformer reads each prompt's unpadded tokens: ZImagePipeline.encode_prompt)."""
    ids, mask = texts
    hidden = text_encoders[0](input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
    return hidden, mask


def encode_flux2(text_encoders, texts, text_encoder_out_layers=(9, 18, 27)):
    """FLUX.2 klein: hidden states of several layers of the Qwen3 model side by side (--text_encoder_out_layers), over
    the whole padded sequence, which the transformer reads (Flux2KleinPipeline.encode_prompt); the mask rides along."""
    ids, mask = texts
    out = text_encoders[0](input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return torch.cat([out.hidden_states[k] for k in text_encoder_out_layers], dim=-1), mask


def encode_qwen_image(text_encoders, texts):
    """Qwen-Image: the Qwen2.5-VL model's last hidden states of each prompt's tokens after the template's first 34,
    zero-padded to --max_sequence_length, and their mask (QwenImagePipeline.encode_prompt, which pads to the longest
    prompt instead: the transformer masks the padding either way)."""
    ids, mask = texts
    hidden = text_encoders[0](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    rows = [h[m.bool()][QWEN_IMAGE_TEMPLATE_TOKENS:] for h, m in zip(hidden, mask)]
    length = ids.shape[1] - QWEN_IMAGE_TEMPLATE_TOKENS
    lengths = torch.tensor([len(row) for row in rows], device=ids.device)
    return (torch.stack([torch.nn.functional.pad(row, (0, 0, 0, length - len(row))) for row in rows]),
            (torch.arange(length, device=ids.device) < lengths[:, None]).long())


def call_unet(unet, noisy_latents, timesteps, prompt_embeds, pooled, time_ids, guidance=None):
    """The UNet's prediction. SDXL's UNet adds the pooled embedding and the size/crop time ids to its timestep
    embedding; SD 1.x/2.x's ignores added_cond_kwargs."""
    return unet(noisy_latents, timesteps, prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def call_flux(transformer, noisy_latents, timesteps, prompt_embeds, pooled, time_ids, guidance=None):
    """FLUX.1's prediction in the latents' own layout: the latents packed into 2x2 patches with their position ids,
    the timestep as a fraction (sigma), the guidance value when the checkpoint is guidance-distilled (FLUX.1-dev has
    the embedding, schnell not), the output unpacked again, so the loss, masks and buckets see ordinary latents."""
    from diffusers import FluxPipeline

    b, c, h, w = noisy_latents.shape
    packed = FluxPipeline._pack_latents(noisy_latents, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy_latents.device, noisy_latents.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=noisy_latents.device, dtype=noisy_latents.dtype)
    guidance = (torch.as_tensor(guidance, dtype=torch.float32, device=noisy_latents.device).expand(b)
                if transformer.config.guidance_embeds else None)  # one value, or one per image
    out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids).sample
    return unpack_patches(out, b, c, h, w)


def unpack_patches(out, b, c, h, w):
    """A sequence of 2x2 latent patches (FLUX.1's and Qwen-Image's packing) back into latents of shape (b, c, h, w)."""
    return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def call_sd3(transformer, noisy_latents, timesteps, prompt_embeds, pooled, time_ids, guidance=None):
    """SD3's MMDiT: patches itself; the timestep on the 0-1000 scale."""
    return transformer(hidden_states=noisy_latents, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                       pooled_projections=pooled).sample


def call_z_image(transformer, noisy_latents, timesteps, prompt_embeds, mask, time_ids, guidance=None):
    """Z-Image's prediction: a list of latents with a frame axis, the timestep as 1 - sigma, each prompt's unpadded
    embeddings, and the output negated (the transformer predicts the velocity from noise to image)."""
    captions = [embeds[m.bool()] for embeds, m in zip(prompt_embeds, mask)]
    out = transformer(list(noisy_latents.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions,
                      return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def call_flux2(transformer, noisy_latents, timesteps, prompt_embeds, mask, time_ids, guidance=None):
    """FLUX.2's prediction: the latents (already in 2x2 patches) as a sequence with (t, h, w, l) position ids, the
    prompt's positions along l, the timestep as a fraction (sigma), the guidance value where the transformer embeds
    one, the output back in the latents' layout."""
    from diffusers import Flux2KleinPipeline

    b, c, h, w = noisy_latents.shape
    packed = Flux2KleinPipeline._pack_latents(noisy_latents)
    image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy_latents).to(noisy_latents.device)
    text_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(noisy_latents.device)
    guidance = (torch.full((b,), float(guidance), device=noisy_latents.device)
                if transformer.config.guidance_embeds else None)
    out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, txt_ids=text_ids,
                      img_ids=image_ids, encoder_hidden_states=prompt_embeds).sample
    return out[:, :h * w].permute(0, 2, 1).reshape(b, c, h, w)


def call_qwen_image(transformer, noisy_latents, timesteps, prompt_embeds, mask, time_ids, guidance=None):
    """Qwen-Image's prediction: the latents packed into 2x2 patches (FLUX.1's packing) with their (frame, height,
    width) shape for the rotary positions, the timestep as a fraction (sigma), the prompt's mask (none where every
    token is the prompt's, as the pipeline passes it), the output unpacked."""
    from diffusers import QwenImagePipeline

    b, c, h, w = noisy_latents.shape
    packed = QwenImagePipeline._pack_latents(noisy_latents, b, c, h, w)
    guidance = (torch.full((b,), float(guidance), device=noisy_latents.device)
                if transformer.config.guidance_embeds else None)
    out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                      encoder_hidden_states=prompt_embeds,
                      encoder_hidden_states_mask=None if mask.all() else mask.bool(),
                      img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return unpack_patches(out, b, c, h, w)


def pipeline_embeddings(pooled_argument):
    """A pipeline call's pre-computed embeddings (SD's UNet has no pooled input: pooled_argument "")."""
    return lambda embeds, pooled, prefix="": {prefix + "prompt_embeds": embeds,
                                              **({prefix + pooled_argument: pooled} if pooled_argument else {})}


def unpadded_embeddings(embeds, mask, prefix=""):
    """ZImagePipeline takes a list of each prompt's unpadded embeddings."""
    return {prefix + "prompt_embeds": [e[m.bool()] for e, m in zip(embeds, mask)]}


def freeze_unread_sdxl_layers(text_encoders):
    """important! SDXL reads the first encoder's penultimate layer: its last layer and final norm never reach the
    loss. Frozen (with any adapters in them), so that DDP does not wait for gradients that never come."""
    first = getattr(text_encoders["text_encoder"], "text_model", text_encoders["text_encoder"])  # transformers 4/5
    first.encoder.layers[-1].requires_grad_(False)
    first.final_layer_norm.requires_grad_(False)


def scale_latents(latents, vae_config):
    """The VAE's latents as the denoiser sees them: shifted (where the VAE's config has a shift) and scaled."""
    shift = vae_config.get("shift_factor")
    return (latents - shift if shift is not None else latents) * vae_config["scaling_factor"]


def vae_latents(latents, vae):
    """The latents the denoiser sees, from the VAE's: shifted and scaled by its config."""
    return scale_latents(latents, vae.config)


def flux2_latents(latents, vae):
    """FLUX.2: the VAE's latents in 2x2 patches (4x the channels, half the side), normalised by the VAE's batch-norm
    statistics (Flux2KleinPipeline._encode_vae_image)."""
    from diffusers import Flux2KleinPipeline

    patched = Flux2KleinPipeline._patchify_latents(latents)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patched)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patched)
    return (patched - mean) / std


def qwen_image_latents(latents, vae):
    """Qwen-Image: the VAE's latents normalised per channel by its config's latents_mean and latents_std (as
    QwenImagePipeline decodes them)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(latents)
    return (latents - mean) * (1.0 / std)


def image_latents(vae, images):
    """The VAE's latent distribution of a batch of images."""
    return vae.encode(images.to(vae.dtype)).latent_dist


def frame_latents(vae, images):
    """A video VAE (Qwen-Image's): the images as one-frame clips, the distribution without the frame axis."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(vae.encode(images.to(vae.dtype).unsqueeze(2)).latent_dist.parameters.squeeze(2))


def latent_sampler(encode_images, vae, cached=False):
    """Images -> a sample of the frozen VAE's latent distribution (`encode_images`: the family's); `cached`
    (--cache_latents): the batch holds the cached distribution's parameters, sampled with the training random state
    as the VAE would."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if cached:
        return lambda images: DiagonalGaussianDistribution(images).sample()
    return lambda images: encode_images(vae, images).sample()
