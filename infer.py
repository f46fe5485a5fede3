"""Generate images from a fine-tuned DreamBooth model, or any Stable Diffusion pipeline folder or hub id.

    python infer.py --pretrained_model_name_or_path sks-dog --prompt "a photo of sks dog on the moon" --seed 0

Image j of each prompt uses its own generator seeded from (--seed, j), so any one image can be made again alone.
Each PNG carries its settings in a `parameters` text chunk (the format AUTOMATIC1111 and Civitai read).
"""

import argparse
import json
import re
import time
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

import dreambooth_utils as du


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    du.add_model_args(p)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", required=True, help="prompt; repeat the flag for several")
    g.add_argument("--negative_prompt", default=None)
    g.add_argument("--num_images_per_prompt", type=int, default=4)
    g.add_argument("--seed", type=int, default=0, help="image j of a prompt uses a generator seeded from (seed, j)")
    g = p.add_argument_group("sampling")
    g.add_argument("--num_inference_steps", type=int, default=30)
    g.add_argument("--guidance_scale", type=float, default=7.5)
    g.add_argument("--scheduler", default=None, choices=sorted(du.SCHEDULERS), help="sampler (default: the model's own)")
    g.add_argument("--height", type=int, default=None, help="default: the model's")
    g.add_argument("--width", type=int, default=None, help="default: the model's")
    g.add_argument("--batch_size", type=int, default=4, help="images per forward pass")
    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on CUDA, else fp32")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true", help="xformers attention (CUDA only)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="samples", help="where the PNGs go")
    return p.parse_args(argv)


def a1111_parameters(prompt, negative_prompt, steps, sampler, cfg, seed, width, height, model):
    """Generation settings as AUTOMATIC1111 writes them into a PNG's `parameters` chunk."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg}, Seed: {seed}, Size: {width}x{height}, Model: {model}")
    return "\n".join(lines)


def slug(text, n=40):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "prompt"


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # ---- check the input before anything loads
    if args.num_images_per_prompt < 1 or args.batch_size < 1 or args.num_inference_steps < 1:
        du.fail("--num_images_per_prompt, --batch_size and --num_inference_steps must be at least 1")
    du.check_model_source(args.pretrained_model_name_or_path)
    if args.enable_xformers_memory_efficient_attention:
        du.check_xformers()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    precision = args.dtype if args.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")

    # ---- load
    pipe = du.load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, du.torch_dtype(precision), device)
    du.set_scheduler(pipe, args.scheduler)
    if args.enable_xformers_memory_efficient_attention:
        du.enable_xformers(pipe)
    height = args.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = args.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sampler = args.scheduler or pipe.scheduler.__class__.__name__
    model_name = Path(args.pretrained_model_name_or_path.rstrip("/")).name

    # ---- generate
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, t0 = [], time.perf_counter()
    for p_idx, prompt in enumerate(args.prompt):
        for start in range(0, args.num_images_per_prompt, args.batch_size):
            js = list(range(start, min(start + args.batch_size, args.num_images_per_prompt)))
            seeds = [du.image_seed(args.seed, j) for j in js]
            images = pipe([prompt] * len(js), negative_prompt=[args.negative_prompt] * len(js) if args.negative_prompt else None,
                          num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                          height=height, width=width,
                          generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
            for j, seed, image in zip(js, seeds, images):
                settings = {"prompt": prompt, "negative_prompt": args.negative_prompt, "seed": args.seed, "image_index": j,
                            "image_seed": seed, "num_inference_steps": args.num_inference_steps,
                            "guidance_scale": args.guidance_scale, "sampler": sampler, "width": width, "height": height,
                            "model": args.pretrained_model_name_or_path, "dtype": precision}
                info = PngInfo()
                info.add_text("parameters", a1111_parameters(prompt, args.negative_prompt, args.num_inference_steps,
                                                             sampler, args.guidance_scale, seed, width, height, model_name))
                info.add_text("dreambooth", json.dumps(settings))
                path = out / f"p{p_idx:02d}-{slug(prompt)}-i{j:03d}-seed{args.seed}.png"
                image.save(path, pnginfo=info)
                written.append(path)
    seconds = time.perf_counter() - t0
    print(f"wrote {len(written)} images to {out} ({len(written) / seconds:.2f} images/s)")


if __name__ == "__main__":
    main()
