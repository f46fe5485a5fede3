"""What the family rows of families.py name: how a prompt becomes token tensors and embeddings, how each family's
denoiser is called (in the latents' own layout, so the loss, masks and buckets never see a family's packing), what never
trains, how latents are scaled, how pre-computed embeddings go into a pipeline call. Tensors in, tensors out."""

import torch


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
    guidance = (torch.full((b,), float(guidance), device=noisy_latents.device)
                if transformer.config.guidance_embeds else None)
    out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids).sample
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


def latent_sampler(vae, cached=False):
    """Images -> a sample of the frozen VAE's latent distribution; `cached` (--cache_latents): the batch holds the
    cached distribution's parameters, sampled with the training random state as the VAE would."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if cached:
        return lambda images: DiagonalGaussianDistribution(images).sample()
    return lambda images: vae.encode(images.to(vae.dtype)).latent_dist.sample()
