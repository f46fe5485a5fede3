"""Guidance-distil the toy FLUX.1, as FLUX.1-dev was made: a student transformer with FLUX's guidance embedding learns
to give, in one pass and for a guidance value it is fed, what the teacher gives with classifier-free guidance at that
value (two passes: v_uncond + g * (v_cond - v_uncond)).

    python toyworld/distill_flux.py --teacher toyworld/toy-flux --output_dir toyworld/toy-flux-dev --steps 1200

The student is the teacher's transformer with `guidance_embeds=True`: every weight copied from the teacher, the new
guidance embedder's output layer at zero, so at step 0 the student gives exactly the teacher's unguided conditional
prediction, whatever guidance it is fed. Training: the world's images and captions (as in pretraining, 10% of them
empty), noised at logit-normal timesteps with the scheduler's shift (the suite's objectives.Flow), a guidance value
drawn uniformly from [--min_guidance, --max_guidance] per image; the loss is the student's distance to the teacher's
guided prediction. The VAE, both text encoders and the tokenizers are the teacher's, unchanged: the output folder is
a FluxPipeline folder like the teacher's, whose transformer embeds guidance, so the suite's scripts treat it as a
guidance-distilled FLUX.1 (dev): `--guidance_scale` is fed to the transformer, one pass per step.

The folder records the command, seed, losses and wall time in `distill.json`.
"""

import argparse
import json
import math
import os
import shutil
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
from toyworld.pretrain import batch  # noqa: E402


def student_of(teacher):
    """The teacher's transformer with a guidance embedding: its weights, the embedder's output layer at zero."""
    from diffusers import FluxTransformer2DModel

    student = FluxTransformer2DModel.from_config({**teacher.config, "guidance_embeds": True})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_text_embed.guidance_embedder.") for k in missing), missing
    torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.weight)
    torch.nn.init.zeros_(student.time_text_embed.guidance_embedder.linear_2.bias)
    return student


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="toyworld/toy-flux", help="a FluxPipeline folder without a guidance embedding")
    p.add_argument("--output_dir", default="toyworld/toy-flux-dev")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--min_guidance", type=float, default=1.0)
    p.add_argument("--max_guidance", type=float, default=8.0)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_precision", default="fp16", choices=["fp16", "fp32"])
    args = p.parse_args()
    from diffusers import FluxPipeline

    teacher_dir, out = Path(args.teacher), Path(args.output_dir)
    config = teacher_dir / "transformer" / "config.json"
    if not (teacher_dir / "model_index.json").is_file() or not config.is_file():
        sys.exit(f"error: --teacher {teacher_dir} is not a FluxPipeline folder (no model_index.json or transformer/)")
    if json.loads(config.read_text()).get("guidance_embeds"):
        sys.exit(f"error: --teacher {teacher_dir} already embeds guidance (it is guidance-distilled)")
    if out.resolve() == teacher_dir.resolve():
        sys.exit(f"error: --output_dir {out} is the teacher's folder; the distilled model goes beside it")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pipe = FluxPipeline.from_pretrained(teacher_dir, torch_dtype=torch.float32)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        module.requires_grad_(False).eval()
    teacher, student = pipe.transformer, student_of(pipe.transformer)
    student.train()
    flow = objectives.Flow(pipe.scheduler, weighting_scheme="logit_normal")

    def encode(captions):  # CLIP's and T5's ids, each padded to its tokenizer's length, as the training script's
        tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
        ids = [torch.stack(i) for i in zip(*(model_calls.tokenize_padded(tokenizers, c) for c in captions))]
        with torch.no_grad():
            return model_calls.encode_flux((pipe.text_encoder, pipe.text_encoder_2), ids)

    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    warmup = min(100, args.steps)

    def lr_at(step):  # warm-up, then cosine down to 10%
        return min(1.0, (step + 1) / warmup) * max(0.1, 0.5 * (1 + math.cos(math.pi * step / args.steps)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    record = {"command": " ".join([sys.executable] + sys.argv), "teacher": str(teacher_dir), "seed": args.seed,
              "batch_size": args.batch_size, "guidance": [args.min_guidance, args.max_guidance],
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    empty = encode([""])
    t0, losses = time.time(), []
    for step in range(1, args.steps + 1):
        pixels, captions = batch(rng, args.batch_size)
        captions = [c if rng.random() > 0.1 else "" for c in captions]
        with torch.no_grad():
            latents = model_calls.scale_latents(pipe.vae.encode(pixels).latent_dist.sample(), pipe.vae.config)
        sequence, pooled = encode(captions)
        guidance = torch.from_numpy(rng.uniform(args.min_guidance, args.max_guidance, len(captions))).float()
        draw = flow.draw(latents)
        with torch.no_grad():  # the teacher's classifier-free guidance at each image's value
            n = len(captions)
            both = model_calls.call_flux(teacher, draw.noisy_latents.repeat(2, 1, 1, 1), draw.timesteps.repeat(2),
                                         torch.cat([sequence, empty[0].expand(n, -1, -1)]),
                                         torch.cat([pooled, empty[1].expand(n, -1)]), None)
            conditional, unconditional = both.chunk(2)
            target = unconditional + guidance.view(-1, 1, 1, 1) * (conditional - unconditional)
        prediction = model_calls.call_flux(student, draw.noisy_latents, draw.timesteps, sequence, pooled, None,
                                           guidance)
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"distill step {step} loss {np.mean(losses[-50:]):.5f} ({time.time() - t0:.0f} s)", flush=True)
    record.update(steps=args.steps, learning_rate=args.learning_rate, first_loss=losses[0],
                  final_loss=float(np.mean(losses[-50:])), seconds=round(time.time() - t0))
    # the teacher's folder with the student as its transformer, written beside and renamed: nothing half-written
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(teacher_dir, partial, ignore=shutil.ignore_patterns("transformer", "pretrain.*", "*.pt"))
    dtype = torch.float16 if args.save_precision == "fp16" else torch.float32
    student.to(dtype).save_pretrained(partial / "transformer", safe_serialization=True)
    (partial / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    print(f"saved the guidance-distilled toy model to {out}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
