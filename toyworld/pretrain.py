"""Pretrain a toy Stable Diffusion from scratch on the toy world: a real diffusers pipeline folder with an
AutoencoderKL (32 px -> 8x8x4 latents), a CLIP text model with a word-level tokenizer in CLIP format, a
UNet2DConditionModel and Stable Diffusion's noise schedule.

    python toyworld/pretrain.py --output_dir toyworld/toy-sd --vae_steps 1000 --unet_steps 5000 --decoder_steps 300 --seed 0

Stage 1 trains the VAE on reconstruction (with SD's small KL term); stage 2 freezes it and trains the UNet and the
text encoder together on the diffusion loss, on captions that leave out the colour or the background 30% of the time
each (so the class word alone, "a photo of a circle", means something) and with 10% dropped for classifier-free
guidance; stage 3 fine-tunes the VAE decoder alone on objects cut in two random colours along random lines, so the
frozen VAE can draw a two-colour subject (the UNet and the text encoder never see one, and no caption names one).
The model is a function of the command (steps, batch size, seed), not of the machine's speed; the folder records the
command, seed, losses and wall time in `pretrain.json`.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

from toyworld.world import PALETTE, SHAPES, SIZE, render, sample_attributes  # noqa: E402

WORDS = ["a", "photo", "of", "on", "background", "sks", "dog", *SHAPES, *PALETTE]


def write_word_tokenizer(folder):
    """CLIP's byte-level BPE files, with merges that build every word of the world into one token (any other text
    still tokenizes, character by character)."""
    import make_tiny_model
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = make_tiny_model.bytes_to_unicode()
    merges, tokens = [], chars + [c + "</w>" for c in chars]
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            tokens.append(parts[0])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}
    Path(folder, "vocab.json").write_text(json.dumps(vocab))
    Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(Path(folder, "vocab.json")), str(Path(folder, "merges.txt")), model_max_length=77,
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def batch(rng, n, leave_out=0.3):
    """n rendered images in [-1, 1] (N, 3, 32, 32) and their captions, each leaving out the colour and the background
    with probability `leave_out` (independently), so that the model also knows "a photo of a circle"."""
    attributes = [sample_attributes(int(rng.integers(2**62))) for _ in range(n)]
    pixels = np.stack([np.asarray(render(a), dtype=np.float32) / 127.5 - 1 for a in attributes])
    captions = [a.caption(colour=rng.random() >= leave_out, background=rng.random() >= leave_out) for a in attributes]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), captions


def two_tone_batch(rng, n):
    """n world images in [-1, 1], half of them with the object cut in two palette colours along a random line through
    its middle: the decoder learns to draw two-colour objects (the subject is one such object out of very many)."""
    pixels = []
    for _ in range(n):
        a = sample_attributes(int(rng.integers(2**62)))
        image = np.asarray(render(a), dtype=np.float32)
        if rng.random() < 0.5:
            ys, xs = np.mgrid[:SIZE, :SIZE]
            angle = rng.uniform(0, 2 * np.pi)
            side = (ys - a.y - a.size / 2) * np.sin(angle) + (xs - a.x - a.size / 2) * np.cos(angle) > 0
            second = rng.choice([c for c in PALETTE if c not in (a.colour, a.background)])
            image[np.all(image == PALETTE[a.colour], axis=-1) & side] = PALETTE[second]
        pixels.append(image / 127.5 - 1)
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)


def train_vae(vae, steps, next_pixels, digits=4):
    """Stage 1 of both toy models: the VAE learns to reconstruct the world's images (with SD's small KL term), AdamW
    at 1e-3; `next_pixels()` gives each step's batch. Returns what the record keeps."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    t0 = time.time()
    for step in range(1, steps + 1):
        pixels = next_pixels()
        posterior = vae.encode(pixels).latent_dist
        loss = F.mse_loss(vae.decode(posterior.sample()).sample, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"vae step {step} loss {loss.item():.{digits}f} ({time.time() - t0:.0f} s)", flush=True)
    return {"vae_steps": steps, "vae_final_loss": loss.item(), "vae_seconds": round(time.time() - t0)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="toyworld/toy-sd")
    p.add_argument("--vae_steps", type=int, default=1000)
    p.add_argument("--unet_steps", type=int, default=5000, help="UNet and text encoder steps")
    p.add_argument("--decoder_steps", type=int, default=300, help="VAE decoder steps on two-colour objects (stage 3)")
    p.add_argument("--continue_from", default=None,
                   help="a folder this script wrote with --save_precision fp32: its models replace stages 1 and 2")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_precision", default="fp16", choices=["fp16", "fp32"], help="fp16 halves the folder (11 MB)")
    args = p.parse_args()
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.output_dir)
    tokenizer = write_word_tokenizer(out / "tokenizer")
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                        norm_num_groups=32, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=32)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)
    record = {"command": " ".join([sys.executable] + sys.argv), "seed": args.seed, "batch_size": args.batch_size,
              "torch": torch.__version__, "threads": torch.get_num_threads()}

    if args.continue_from:  # stages 1 and 2 as an earlier run left them
        vae = AutoencoderKL.from_pretrained(args.continue_from, subfolder="vae", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(args.continue_from, subfolder="unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(args.continue_from, subfolder="text_encoder", dtype=torch.float32)
        earlier = json.loads(Path(args.continue_from, "pretrain.json").read_text())
        record = {**earlier, **record, "stages_1_2_command": earlier["command"]}
    else:
        # ---- stage 1: the VAE learns to reconstruct the world
        record.update(train_vae(vae, args.vae_steps, lambda: batch(rng, args.batch_size)[0]))
        vae.requires_grad_(False).eval()
        with torch.no_grad():  # SD's scaling factor: unit variance latents
            vae.register_to_config(scaling_factor=1 / vae.encode(batch(rng, 512)[0]).latent_dist.sample().std().item())

        # ---- stage 2: the UNet and the text encoder learn to denoise latents given the caption
        params = list(unet.parameters()) + list(text_encoder.parameters())
        optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
        t0 = time.time()
        for step in range(1, args.unet_steps + 1):
            pixels, captions = batch(rng, args.batch_size)
            captions = [c if rng.random() > 0.1 else "" for c in captions]  # unconditional, for classifier-free guidance
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (len(latents),))
            pred = unet(noise_scheduler.add_noise(latents, noise, timesteps), timesteps, text_encoder(ids)[0]).sample
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if step % 100 == 0:
                print(f"unet step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        record.update(unet_steps=args.unet_steps, unet_final_loss=loss.item(), unet_seconds=round(time.time() - t0))

    # ---- stage 3: the decoder alone learns two-colour objects too, the encoder (so the latent space the UNet learned)
    # unchanged, as Stability's sd-vae-ft-mse fine-tuned SD's decoder. Seeded on its own: --continue_from gives the
    # same model as one run.
    torch.manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.time()
    for step in range(1, args.decoder_steps + 1):
        pixels = two_tone_batch(rng, args.batch_size)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
        loss = F.mse_loss(vae.decode(latents).sample, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"decoder step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    vae.requires_grad_(False)
    record.update(decoder_steps=args.decoder_steps, decoder_final_loss=loss.item() if args.decoder_steps else None,
                  decoder_seconds=round(time.time() - t0))

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16 if args.save_precision == "fp16" else torch.float32).save_pretrained(out, safe_serialization=True)
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved the toy model to {out}: {record}")


if __name__ == "__main__":
    main()
