"""Time the real training script over a matrix of flags and print a table: median steps/s after warm-up and peak
memory (the GPU's max allocated memory, or the process's max RSS on a CPU).

    python bench/benchmark.py --model tiny                 # seconds, any machine (the test suite runs this)
    python bench/benchmark.py --model mid --steps 5        # minutes on 2 CPU cores
    python bench/benchmark.py --model sd15 --steps 20      # the SD 1.5 architecture at 512 px: a GPU
    python bench/benchmark.py --model sdxl --steps 10      # the SDXL architecture at 1024 px: a GPU

Each row is `python train_dreambooth.py ...` on a model folder written here with random weights (`tiny`,
`tiny-sdxl` and `mid` built from small configs, `sd15` and `sdxl` from the real configs in bench/architectures):
a step costs the same whatever the weights. Batch 1 with prior preservation, as DreamBooth is usually run. The
SD rows change one thing at a time from the baseline, then a row with everything that saves memory and one with
everything that saves time; the SDXL rows are the memory targets of the README. On a GPU with a known peak, the
model FLOP utilisation (MFU) of the SD 1.5 and SDXL rows counts the step's model FLOPs (bench/architectures).
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
ARCHITECTURES = ROOT / "bench" / "architectures"
# Model TFLOP of one step with prior preservation (UNet batch 2, forward + backward = 3 forwards), latents and
# embeddings cached: from the UNet forward at the native size (bench/architectures/*/README.md)
STEP_TFLOP = {"sd15": 3 * 2 * 0.80, "sdxl": 3 * 2 * 6.76}
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L4": 121, "A10": 125, "4090": 165}  # dense fp16/bf16


def make_model(kind, folder):
    import make_tiny_model

    if kind in ("tiny", "tiny-sdxl"):
        return make_tiny_model.make_tiny_pipeline(folder, family="sdxl" if kind == "tiny-sdxl" else "sd")
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    arch = ARCHITECTURES / ("sdxl" if kind == "sdxl" else "sd15")
    configs = {p.name.removesuffix("_config.json"): json.loads(p.read_text()) for p in arch.glob("*_config.json")}
    if kind == "mid":  # the SD 1.5 layout at about a tenth of the width and depth: minutes on a CPU
        configs["unet"].update(block_out_channels=[64, 128, 256, 256], cross_attention_dim=256, attention_head_dim=4)
        configs["vae"].update(block_out_channels=[32, 64, 128, 128])
        configs["text_encoder"].update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                       num_attention_heads=4, projection_dim=256)
    # any CLIP-format tokenizer works for timing: its ids only need to be in the text encoder's vocabulary
    torch.manual_seed(0)

    def text_encoder(name, cls):
        return cls(CLIPTextConfig(**{k: v for k, v in configs[name].items() if k != "architectures"}))

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random initialisation of 3.5 B weights
        parts = dict(unet=UNet2DConditionModel.from_config(configs["unet"]), vae=AutoencoderKL.from_config(configs["vae"]),
                     text_encoder=text_encoder("text_encoder", CLIPTextModel))
        if kind == "sdxl":
            parts["text_encoder_2"] = text_encoder("text_encoder_2", CLIPTextModelWithProjection)
    parts["tokenizer"] = make_tiny_model.write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **parts,
            tokenizer_2=make_tiny_model.write_clip_tokenizer(os.path.join(folder, "tokenizer_2"), pad_token="!"),
            scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]), add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, scheduler=PNDMScheduler.from_config(configs["scheduler"]),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind != "mid":  # half the disk and load time; trained weights load as fp32 either way
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def sdxl_matrix(gpu):
    """The memory targets: 1024 px, fp16, 8-bit Adam, gradient checkpointing, cached latents."""
    base = ["--mixed_precision", "fp16" if gpu else "no", "--use_8bit_adam", "--gradient_checkpointing", "--cache_latents"]
    return [("SDXL LoRA rank 4 UNet, + embeddings cached (target 10 GB)", base + ["--lora_rank", "4",
                                                                                "--pre_compute_text_embeddings"]),
            ("SDXL LoRA rank 4 UNet + both text encoders (target 14 GB)", base + ["--lora_rank", "4",
                                                                                 "--train_text_encoder"]),
            ("SDXL full UNet, + embeddings cached (target 32 GB)", base + ["--pre_compute_text_embeddings"]),
            ("SDXL LoRA rank 4 UNet on an NF4 base, + embeddings cached (target 6 GB)",
             base + ["--lora_rank", "4", "--pre_compute_text_embeddings", "--quantize_base", "nf4"])]


def matrix(gpu):
    base = ["--mixed_precision", "fp16" if gpu else "no"]
    rows = [("baseline (full UNet, AdamW)", base),
            ("8-bit Adam", base + ["--use_8bit_adam"]),
            ("gradient checkpointing", base + ["--gradient_checkpointing"]),
            ("cached latents + embeddings", base + ["--cache_latents", "--pre_compute_text_embeddings"]),
            ("+ text encoder", base + ["--train_text_encoder"]),
            ("LoRA rank 4 + text encoder", base + ["--lora_rank", "4", "--train_text_encoder"]),
            ("bf16", ["--mixed_precision", "bf16"]),
            ("EMA of the weights", base + ["--use_ema"]),
            ("Prodigy", base + ["--optimizer", "prodigy"]),
            ("DoRA rank 4 + text encoder", base + ["--lora_rank", "4", "--use_dora", "--train_text_encoder"]),
            ("LoRA rank 4 + pivotal tuning", base + ["--lora_rank", "4", "--train_text_encoder_ti"])]
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


# --profile: the training run inside torch.profiler, its kernel table and the CUDA memory summary written to a file
PROFILE = """import sys, torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, sys.argv[1])
import train_dreambooth
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], profile_memory=True) as prof:
    train_dreambooth.main(sys.argv[3:])
with open(sys.argv[2], "w") as f:
    f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40) + "\\n" +
            (torch.cuda.memory_summary() if torch.cuda.is_available() else ""))
"""


def run_row(model, photos, out, flags, args):
    """One training run; returns (median seconds per step after warm-up, peak memory in GiB)."""
    script = ["-c", PROFILE, str(ROOT), str(Path(args.profile, "profile.txt"))] if args.profile else \
        [str(ROOT / "train_dreambooth.py")]
    cmd = [sys.executable, *script, "--pretrained_model_name_or_path", model,
           "--instance_dir", photos, "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
           "--class_dir", str(Path(photos).parent / "class-images"), "--class_prompt", "a photo of dog",
           "--num_class_images", "4",
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
    p.add_argument("--model", choices=["tiny", "tiny-sdxl", "mid", "sd15", "sdxl"], default="tiny")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 256 mid, 512 sd15, 1024 sdxl")
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense fp16 peak, for MFU (default: known GPUs)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--only", action="append", default=None,
                   help="run only the rows whose name contains this (repeatable: any of them)")
    p.add_argument("--profile", default=None, help="a folder: profile the rows' runs (torch.profiler) into profile.txt")
    args = p.parse_args()
    if args.resolution is None:
        args.resolution = {"tiny": 64, "tiny-sdxl": 64, "mid": 256, "sd15": 512, "sdxl": 1024}[args.model]
    gpu = torch.cuda.is_available()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads"
    work = Path(tempfile.mkdtemp(prefix="dreambooth-bench-"))
    import make_tiny_model

    model = make_model(args.model, str(work / "model"))
    torch.cuda.empty_cache()  # the random weights were made on the GPU: give their memory back to the runs
    for folder in ("photos", "class-images"):  # the class images ready-made (the same pictures): no sampling timed
        make_tiny_model.make_sample_photos(str(work / folder), n=4, size=args.resolution + args.resolution // 8)
    print(f"model {args.model} at {args.resolution} px, batch 1 + 1 class image, {args.steps} timed steps after "
          f"{args.warmup}; {machine}; torch {torch.__version__}")
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if gpu and k in machine), None)
    mfu = STEP_TFLOP.get(args.model) and peak_tflops
    print("| configuration | steps/s | s/step | peak memory (GiB) |" + (" MFU |\n" if mfu else "\n") +
          "|---|---|---|---|" + ("---|" if mfu else ""), flush=True)
    rows = sdxl_matrix(gpu) if "sdxl" in args.model else matrix(gpu)
    for i, (name, flags) in enumerate(rows):
        if args.only and not any(part in name for part in args.only):
            continue
        seconds, peak = run_row(model, str(work / "photos"), str(work / f"run{i}"), flags, args)
        utilisation = f" {STEP_TFLOP[args.model] / seconds / peak_tflops:.1%} |" if mfu else ""
        print(f"| {name} | {1 / seconds:.2f} | {seconds:.3f} | {peak:.2f} |{utilisation}", flush=True)
    print(f"memory: {'torch.cuda.max_memory_allocated' if gpu else 'max RSS of the training process'}")


if __name__ == "__main__":
    main()
