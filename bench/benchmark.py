"""Time the real training script over a matrix of flags and print a table: median steps/s after warm-up and peak
memory (the GPU's max allocated memory, or the process's max RSS on a CPU).

    python bench/benchmark.py --model tiny                 # seconds, any machine (the test suite runs this)
    python bench/benchmark.py --model mid --steps 5        # minutes on 2 CPU cores
    python bench/benchmark.py --model sd15 --resolution 512 --steps 20   # the SD 1.5 architecture: a GPU

Each row is `python train_dreambooth.py ...` on a model folder written here with random weights (`tiny` and `mid`
built from small configs, `sd15` from the real SD 1.5 configs in ../shared/sd15-architecture): a step costs the same
whatever the weights. Batch 1 with prior preservation, as DreamBooth is usually run. Rows change one thing at a time
from the baseline, then a row with everything that saves memory and one with everything that saves time.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
SD15 = ROOT.parent / "shared" / "sd15-architecture"


def make_model(kind, folder):
    import make_tiny_model

    if kind == "tiny":
        return make_tiny_model.make_tiny_pipeline(folder)
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = {name: json.loads((SD15 / f"{name}_config.json").read_text())
               for name in ("unet", "vae", "text_encoder", "scheduler")}
    if kind == "mid":  # the SD 1.5 layout at about a tenth of the width and depth: minutes on a CPU
        configs["unet"].update(block_out_channels=[64, 128, 256, 256], cross_attention_dim=256, attention_head_dim=4)
        configs["vae"].update(block_out_channels=[32, 64, 128, 128])
        configs["text_encoder"].update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=4, projection_dim=256)
    # any CLIP-format tokenizer works for timing: its ids only need to be in the text encoder's vocabulary
    tokenizer = make_tiny_model.write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    configs["text_encoder"].pop("architectures", None)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(configs["unet"]), vae=AutoencoderKL.from_config(configs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])), tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(configs["scheduler"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def matrix(gpu):
    base = ["--mixed_precision", "fp16" if gpu else "no"]
    rows = [("baseline (full UNet, AdamW)", base),
            ("8-bit Adam", base + ["--use_8bit_adam"]),
            ("gradient checkpointing", base + ["--gradient_checkpointing"]),
            ("cached latents + embeddings", base + ["--cache_latents", "--pre_compute_text_embeddings"]),
            ("+ text encoder", base + ["--train_text_encoder"]),
            ("LoRA rank 4 + text encoder", base + ["--lora_rank", "4", "--train_text_encoder"]),
            ("bf16", ["--mixed_precision", "bf16"])]
    if gpu:
        try:
            import xformers  # noqa: F401

            rows.append(("xformers", base + ["--enable_xformers_memory_efficient_attention"]))
        except ImportError:
            pass
    low_memory = ["--use_8bit_adam", "--gradient_checkpointing", "--cache_latents", "--pre_compute_text_embeddings"]
    rows += [("least memory: 8-bit Adam, checkpointing, caches", base + low_memory),
             ("least memory + text encoder", base + ["--use_8bit_adam", "--gradient_checkpointing", "--cache_latents",
                                                      "--train_text_encoder"]),
             ("LoRA rank 4 + text encoder, least memory", base + ["--lora_rank", "4", "--train_text_encoder",
                                                                  "--gradient_checkpointing", "--cache_latents"])]
    if gpu:
        rows.append(("fastest: bf16, caches, compile, TF32", ["--mixed_precision", "bf16", "--cache_latents",
                                                              "--pre_compute_text_embeddings", "--compile",
                                                              "--allow_tf32", "--channels_last"]))
    return rows


def run_row(model, photos, out, flags, args):
    """One training run; returns (median seconds per step after warm-up, peak memory in GiB)."""
    cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), "--pretrained_model_name_or_path", model,
           "--instance_dir", photos, "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
           "--class_dir", photos, "--class_prompt", "a photo of dog", "--num_class_images", "4",
           "--output_dir", out, "--resolution", str(args.resolution), "--train_batch_size", "1",
           "--max_train_steps", str(args.warmup + args.steps), "--checkpointing_steps", "1000000", "--center_crop",
           "--learning_rate", "1e-6", "--lr_warmup_steps", "0", "--seed", "0", "--report_to", "tensorboard", *flags]
    with open(Path(out).with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, in KiB on Linux
    if os.waitstatus_to_exitcode(status) != 0:
        tail = Path(out).with_suffix(".log").read_text()[-1500:]
        raise SystemExit(f"error: this row failed: {' '.join(flags)}\n{tail}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(Path(out, "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    seconds = [e.value for e in acc.Scalars("seconds_per_step") if e.step > args.warmup]
    tags = acc.Tags()["scalars"]
    peak = max(e.value for e in acc.Scalars("peak_memory_gb")) if "peak_memory_gb" in tags else usage.ru_maxrss / 2**20
    return statistics.median(seconds), peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "mid", "sd15"], default="tiny")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 256 mid, 512 sd15")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--only", default=None, help="run only the rows whose name contains this")
    args = p.parse_args()
    args.resolution = args.resolution or {"tiny": 64, "mid": 256, "sd15": 512}[args.model]
    gpu = torch.cuda.is_available()
    machine = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads"
    work = Path(tempfile.mkdtemp(prefix="dreambooth-bench-"))
    import make_tiny_model

    model = make_model(args.model, str(work / "model"))
    make_tiny_model.make_sample_photos(str(work / "photos"), n=4, size=args.resolution + args.resolution // 8)
    print(f"model {args.model} at {args.resolution} px, batch 1 + 1 class image, {args.steps} timed steps after "
          f"{args.warmup}; {machine}; torch {torch.__version__}")
    print("| configuration | steps/s | s/step | peak memory (GiB) |\n|---|---|---|---|", flush=True)
    for i, (name, flags) in enumerate(matrix(gpu)):
        if args.only and args.only not in name:
            continue
        seconds, peak = run_row(model, str(work / "photos"), str(work / f"run{i}"), flags, args)
        print(f"| {name} | {1 / seconds:.2f} | {seconds:.3f} | {peak:.2f} |", flush=True)
    print(f"memory: {'torch.cuda.max_memory_allocated' if gpu else 'max RSS of the training process'}")


if __name__ == "__main__":
    main()
