"""Predicted peak GPU memory of a DreamBooth training step of the transformer families, from their real architecture
configs (bench/architectures): a prediction to check against measurements, not a measurement.

    python bench/memory.py                      # the table BENCHMARKS.md shows (1024 px, batch 1, LoRA rank 16)
    python bench/memory.py --resolution 512 --rank 4

What it adds up, per setting (full fine-tune or LoRA; base in bf16, int8 or NF4; gradient checkpointing or not;
AdamW or 8-bit AdamW), with the text encoders' output and the latents cached (they are off the GPU):
- the frozen weights: the transformer built on the meta device, its linear layers' weights at the base's precision
  (int8: 1 byte and an fp32 scale per row; NF4: half a byte and an fp32 scale per 64 weights, bitsandbytes' block),
  every other weight in bf16;
- what trains, in fp32 (the suite keeps trained weights in fp32): the weights, their gradients and the optimizer's
  two states (4 bytes each with AdamW, 1 byte each with 8-bit AdamW); LoRA's are the adapters of the family's default
  targets, counted from the model's own linear layers;
- activations kept for the backward pass, in bf16: a transformer block keeps about 34 bytes per token and per
  channel of its width (Korthikanti et al. 2022, for attention that keeps no token-by-token matrix, as PyTorch's
  SDPA kernels on a GPU); with gradient checkpointing only each block's input is kept, plus one block's activations
  while it is recomputed; a full fine-tune's activation memory is the same;
- 1.5 GB for the CUDA context, the kernels' workspace and the allocator's slack (an assumption);
- FSDP over N GPUs (configs/accelerate-fsdp2.yaml): each GPU holds 1/N of the weights, gradients and optimizer states,
  plus the whole bf16 weights of two shard units at a time (the block computing and the next one, gathered ahead),
  and its own activations (not sharded).
Every block sees all image and prompt tokens (joint attention in FLUX.1, SD 3.5, FLUX.2 and Qwen-Image; Z-Image's main
layers). The published figures it is checked against are in BENCHMARKS.md.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import families  # noqa: E402

# architecture folder -> (the family's row, prompt tokens the transformer reads at --max_sequence_length 512 or SD3's
# 77 CLIP + 77 T5, the transformer blocks' attribute names)
ARCHITECTURES = {
    "flux1-dev": (families.FLUX, 512, ("transformer_blocks", "single_transformer_blocks")),
    "sd35-large": (families.SD3, 154, ("transformer_blocks",)),
    "sd35-medium": (families.SD3, 154, ("transformer_blocks",)),
    "z-image": (families.Z_IMAGE, 512, ("layers",)),
    "flux2-klein-4b": (families.FLUX2_KLEIN, 512, ("transformer_blocks", "single_transformer_blocks")),
    "flux2-klein-9b": (families.FLUX2_KLEIN, 512, ("transformer_blocks", "single_transformer_blocks")),
    "qwen-image": (families.QWEN_IMAGE, 512, ("transformer_blocks",)),
}
ACTIVATION_BYTES = 34  # per token and channel of a block's width, bf16 (Korthikanti et al. 2022, no attention scores)
OVERHEAD_GB = 1.5
# a base's linear weights: n weights in `rows` output rows -> bytes
BASE_BYTES = {"bf16": lambda n, rows: 2 * n, "int8": lambda n, rows: n + 4 * rows,
              "nf4": lambda n, rows: n / 2 + 4 * n / 64}
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}


@functools.lru_cache(maxsize=None)  # built once per architecture for all the settings
def load(name):
    """The transformer of bench/architectures/<name>, built on the meta device (no memory)."""
    import diffusers

    config = json.loads((ROOT / "bench" / "architectures" / name / "transformer_config.json").read_text())
    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def lora_parameters(model, targets, rank):
    """Adapter parameters of rank `rank` on the linear layers peft would target (a name ending in a target)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def blocks_and_width(model, names):
    blocks = [block for name in names for block in getattr(model, name)]
    config = model.config  # Z-Image names its width
    width = config.dim if "dim" in config else config.num_attention_heads * config.attention_head_dim
    return len(blocks), width


def predict(name, resolution=1024, rank=16, lora=True, base="bf16", checkpointing=True, optimizer="adamw", batch=1,
            gpus=1):
    """Predicted peak memory in GB (1e9 bytes), and its parts."""
    family, prompt_tokens, block_names = ARCHITECTURES[name]
    model = load(name)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    linear_weights = sum(m.weight.numel() for m in linear)
    total = sum(p.numel() for p in model.parameters())
    weights = BASE_BYTES[base](linear_weights, sum(m.out_features for m in linear)) + 2 * (total - linear_weights)
    trained = lora_parameters(model, family.lora_targets, rank) if lora else total
    if not lora:
        weights = 0  # a full fine-tune's weights are the trained fp32 ones, below
    training = trained * (4 + 4 + OPTIMIZER_BYTES[optimizer])
    n_blocks, width = blocks_and_width(model, block_names)
    if gpus > 1:  # sharded, and two blocks gathered whole in bf16
        largest = max(sum(p.numel() for p in block.parameters()) for n in block_names for block in getattr(model, n))
        weights, training = weights / gpus + 2 * 2 * largest, training / gpus
    tokens = batch * ((resolution // 16) ** 2 + prompt_tokens)
    block = ACTIVATION_BYTES * tokens * width
    activations = n_blocks * 2 * tokens * width + block if checkpointing else n_blocks * block
    parts = {"weights": weights / 1e9, "training": training / 1e9, "activations": activations / 1e9,
             "overhead": OVERHEAD_GB}
    return sum(parts.values()), parts, trained


SETTINGS = [  # (label, keyword arguments of predict)
    ("LoRA, bf16 base, checkpointing", dict()),
    ("LoRA, int8 base, checkpointing", dict(base="int8")),
    ("LoRA, NF4 base, checkpointing", dict(base="nf4")),
    ("LoRA, bf16 base, no checkpointing", dict(checkpointing=False)),
    ("full, checkpointing, 8-bit AdamW", dict(lora=False, optimizer="adamw8bit")),
    ("full, checkpointing, AdamW, FSDP over 8 GPUs (per GPU)", dict(lora=False, gpus=8)),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES))
    args = p.parse_args(argv)
    print(f"Predicted peak GPU memory (GB), {args.resolution} px, batch 1, LoRA rank {args.rank}, latents and prompts "
          "cached (python bench/memory.py" + (f" --resolution {args.resolution}" if args.resolution != 1024 else "")
          + (f" --rank {args.rank}" if args.rank != 16 else "") + ")\n")
    print("| transformer | " + " | ".join(label for label, _ in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for name in args.architectures:
        cells = [f"{predict(name, args.resolution, args.rank, **kwargs)[0]:.1f}" for _, kwargs in SETTINGS]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
