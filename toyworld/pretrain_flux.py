"""Pretrain a toy FLUX.1 from scratch on the toy world: a real FluxPipeline folder with an AutoencoderKL of FLUX's
kind (32 px -> 8x8x16 latents, shifted and scaled, no quant convs), a CLIP text model for the pooled vector and a T5
encoder for the sequence (word-level tokenizers in CLIP's and T5's formats), a FluxTransformer2DModel (double-stream
and single-stream blocks, rotary positions, 2x2 patches: 16 image tokens) and FLUX.1-dev's scheduler
(resolution-dependent shift).

    python toyworld/pretrain_flux.py --output_dir toyworld/toy-flux --vae_steps 1500 --transformer_steps 4000 --seed 0

Stage 1 trains the VAE on reconstruction (FLUX's VAE has a KL term too small to matter; so does this one) on world
images, half of them with the object cut in two random palette colours along a random line, so that the latent space
can hold two-colour objects (the subject is one such object among very many; nothing else in pretraining shows one);
the VAE ceiling (the subject encoded, decoded and read back on every background) is measured and recorded. Stage 2
freezes the VAE and trains the transformer and both text encoders together with the suite's own FLUX code
(model_calls.encode_flux, model_calls.call_flux, objectives.Flow: rectified flow, logit-normal timesteps, the scheduler's
shift for 16 tokens), on captions that leave out the colour or the background 30% of the time each and are dropped
10% of the time for classifier-free guidance. The transformer has no guidance embedding (as FLUX.1-schnell and the
de-distilled FLUX.1 checkpoints): it is sampled with real classifier-free guidance, which the suite's scripts apply on
FLUX models without the embedding when --guidance_scale is above 1.

The model is a function of the command (steps, batch size, seed), not of the machine's speed; the folder records the
command, seed, losses, the VAE ceiling and wall time in `pretrain.json`. The VAE is saved as soon as stage 1 ends
(`--vae_from` that folder skips it), and `--save_every` saves the pipeline during stage 2 with the training state
beside it (`training_state.pt`: fp32 weights, optimizer, random states): a long run that is cut off leaves what it
had made, and `--resume` continues it exactly, with the same command.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model_calls  # noqa: E402
import objectives  # noqa: E402
from toyworld.evaluate import autoencoder_ceiling  # noqa: E402
from toyworld.pretrain import WORDS, batch, train_vae, two_tone_batch, write_word_tokenizer  # noqa: E402

T5_LENGTH = 32  # tokens of T5's sequence: the world's longest caption is 11, pivotal tuning's tokens fit too


def write_word_t5_tokenizer(folder, max_length=T5_LENGTH):
    """T5's format (a SentencePiece-style Unigram model) with every word of the world as one piece and single
    characters for anything else."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-<>")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -4.0) for c in chars] + [
        ("\u2581" + c, -4.5) for c in chars] + [("\u2581" + w, -1.0) for w in WORDS]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.normalizer, backend.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build(out, heads, double_blocks, single_blocks, vae_factor, latent_channels, t5_length):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = write_word_tokenizer(out / "tokenizer")
    tokenizer_2 = write_word_t5_tokenizer(out / "tokenizer_2", t5_length)
    blocks = {2: (32, 64), 4: (32, 64, 64)}[vae_factor]  # each block after the first halves the side
    vae = AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), latent_channels=latent_channels,
                        layers_per_block=1, norm_num_groups=32, sample_size=32, use_quant_conv=False,
                        use_post_quant_conv=False)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, feed_forward_proj="gated-gelu"))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=double_blocks,
                                         num_single_layers=single_blocks, attention_head_dim=32,
                                         num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=64,
                                         guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's
    return tokenizer, tokenizer_2, vae, clip, t5, transformer, scheduler


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", default="toyworld/toy-flux")
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--transformer_steps", type=int, default=4000, help="transformer and text encoder steps")
    p.add_argument("--heads", type=int, default=6, help="attention heads of 32 channels: the transformer's width")
    p.add_argument("--double_blocks", type=int, default=2)
    p.add_argument("--single_blocks", type=int, default=4)
    p.add_argument("--vae_factor", type=int, default=4, choices=[2, 4],
                   help="the VAE's downsampling: 4 gives 8x8 latents (16 image tokens), 2 gives 16x16 (64 tokens)")
    p.add_argument("--latent_channels", type=int, default=16, help="FLUX.1's VAE has 16")
    p.add_argument("--t5_length", type=int, default=T5_LENGTH, help="T5's padded sequence (the tokenizer's length)")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_precision", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--ceiling_renders", type=int, default=100, help="subject renders per background for the VAE ceiling")
    p.add_argument("--vae_from", default=None,
                   help="a folder this script wrote (its vae/ is saved as soon as stage 1 ends): its VAE replaces stage 1")
    p.add_argument("--save_every", type=int, default=0,
                   help="also save the whole pipeline every N transformer steps, so that a run cut off leaves a model, "
                        "and the training state (training_state.pt), so that --resume continues it exactly")
    p.add_argument("--resume", action="store_true", help="continue stage 2 of a run cut off, exactly, from the "
                   "training state in --output_dir (the same command otherwise; its VAE is --output_dir's)")
    args = p.parse_args()
    from diffusers import FluxPipeline

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.output_dir)
    tokenizer, tokenizer_2, vae, clip, t5, transformer, scheduler = build(
        out, args.heads, args.double_blocks, args.single_blocks, args.vae_factor, args.latent_channels, args.t5_length)
    record = {"command": " ".join([sys.executable] + sys.argv), "seed": args.seed, "batch_size": args.batch_size,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "parameters": {name: sum(p.numel() for p in m.parameters())
                             for name, m in (("vae", vae), ("text_encoder", clip), ("text_encoder_2", t5),
                                             ("transformer", transformer))}}
    print(f"parameters: {record['parameters']}", flush=True)

    dtype = torch.float16 if args.save_precision == "fp16" else torch.float32

    def save(pipe_or_model, folder):  # a copy at the saving precision: training goes on in fp32
        copy.deepcopy(pipe_or_model).to(dtype).save_pretrained(folder, safe_serialization=True)

    state_file = out / "training_state.pt"  # --save_every's: the fp32 weights, optimizer, random states (not the model)
    resumed = torch.load(state_file, weights_only=False) if args.resume else None
    if args.resume:
        args.vae_from, record = out, resumed["record"]
    # ---- stage 1: the VAE learns to reconstruct the world, two-colour objects included
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", torch_dtype=torch.float32)
        record.setdefault("vae_from", str(args.vae_from))
    else:
        record.update(train_vae(vae, args.vae_steps, lambda: two_tone_batch(rng, args.batch_size), digits=5))
        with torch.no_grad():  # FLUX's latent normalisation: zero mean, unit variance
            latents = vae.encode(batch(rng, 8 * args.batch_size)[0]).latent_dist.sample()  # 512 images at batch 64
            vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
        save(vae, out / "vae")
    if resumed:  # the fp32 VAE stage 2 trained against (the saved one is at the saving precision)
        vae.load_state_dict(resumed["vae"])
    vae.requires_grad_(False).eval()
    ceiling = resumed["record"]["vae_ceiling"] if resumed else autoencoder_ceiling(vae, n=args.ceiling_renders)
    record["vae_ceiling"] = ceiling
    print("vae ceiling (subject fidelity, similarity): " + ", ".join(
        f"{b} {c['subject_fidelity']:.0%} {c['similarity']:.2f}" for b, c in ceiling.items()), flush=True)

    # ---- stage 2: the transformer and both text encoders learn to denoise latents given the caption
    flow = objectives.Flow(scheduler, weighting_scheme="logit_normal")
    params = [p for m in (transformer, clip, t5) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    warmup = 200
    lr_at = lambda step: min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.transformer_steps))  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(lr_at(step), 0.05))
    t0, losses, first = time.time(), [], 1
    if resumed:
        for module, name in ((transformer, "transformer"), (clip, "text_encoder"), (t5, "text_encoder_2")):
            module.load_state_dict(resumed[name])
        optimizer.load_state_dict(resumed["optimizer"])
        lr_schedule.load_state_dict(resumed["lr_schedule"])
        rng.bit_generator.state, first, losses = resumed["numpy_rng"], resumed["step"] + 1, resumed["losses"]
        torch.set_rng_state(resumed["torch_rng"])
        t0 -= resumed["seconds"]
        print(f"resumed at step {first} from {state_file}", flush=True)
    for step in range(first, args.transformer_steps + 1):
        pixels, captions = batch(rng, args.batch_size)
        captions = [c if rng.random() > 0.1 else "" for c in captions]  # unconditional, for classifier-free guidance
        with torch.no_grad():
            latents = model_calls.scale_latents(vae.encode(pixels).latent_dist.sample(), vae.config)
        ids = [tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids,
               tokenizer_2(captions, padding="max_length", max_length=args.t5_length, truncation=True,
                           return_tensors="pt").input_ids]
        sequence, pooled = model_calls.encode_flux((clip, t5), ids)
        draw = flow.draw(latents)
        prediction = draw.prediction(model_calls.call_flux(transformer, draw.noisy_latents, draw.timesteps, sequence,
                                                        pooled, None))
        loss = F.mse_loss(prediction, draw.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"transformer step {step} loss {np.mean(losses[-100:]):.4f} lr {lr_schedule.get_last_lr()[0]:.2e} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if step == args.transformer_steps or (args.save_every and step % args.save_every == 0):
            record.update(transformer_steps=step, transformer_final_loss=float(np.mean(losses[-100:])),
                          transformer_seconds=round(time.time() - t0), learning_rate=args.learning_rate)
            save(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                              text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer), out)
            (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
            if args.save_every:  # written whole, then renamed: a run killed while saving keeps the previous one
                torch.save({"step": step, "vae": vae.state_dict(), "transformer": transformer.state_dict(),
                            "text_encoder": clip.state_dict(),
                            "text_encoder_2": t5.state_dict(), "optimizer": optimizer.state_dict(),
                            "lr_schedule": lr_schedule.state_dict(), "numpy_rng": rng.bit_generator.state,
                            "torch_rng": torch.get_rng_state(), "losses": losses[-100:], "record": record,
                            "seconds": time.time() - t0}, state_file.with_suffix(".tmp"))
                os.replace(state_file.with_suffix(".tmp"), state_file)
            print(f"saved the toy model to {out} at step {step} of {args.transformer_steps}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
