"""The memory model's base bytes against a measurement on the CPU: a mid-size FLUX.1-shaped transformer (random
weights, 4 double and 8 single blocks of width 1024, about 0.3 B parameters) saved in bf16, then loaded in a fresh
process each way the suite loads a base (bf16; --quantize_base int8; --quantize_base nf4), and the process's resident
memory measured before and after the load, anonymous and file-mapped apart. The weights' memory (bf16: the mapped
file's pages, as safetensors maps them; quantized: the new anonymous memory) and its ratio to bf16 are compared with
bench/memory.py's bytes for the same model (its BASE_BYTES; what is not a linear layer stays bf16).

    python bench/quantized_rss.py            # the table BENCHMARKS.md shows
"""

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CONFIG = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
              num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
              axes_dims_rope=(16, 56, 56))


def rss_mb():
    """Resident memory in MB: (anonymous pages, pages of mapped files), after freed memory is handed back to the system
    (glibc keeps it otherwise, and the quantizing load frees a lot)."""
    import ctypes

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(status[key].split()[0]) / 1e3 for key in ("RssAnon", "RssFile"))


def measure(folder, base):
    """In this process: load the transformer as the suite loads a base; {resident MB added, peak MB}."""
    import loading
    from diffusers import FluxTransformer2DModel

    before = rss_mb()
    config = loading.QUANTIZE.get(base)
    model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.bfloat16,
                                                   **loading.quantized(config, torch.bfloat16, "cpu"))
    for p in model.parameters():  # every weight read once, so mapped pages are resident as in training
        p.float().sum() if p.dtype.is_floating_point else p.sum()
    after = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    anon, mapped = after[0] - before[0], after[1] - before[1]
    # bf16: the weights are the mapped file's pages (safetensors maps them); quantized: new anonymous memory, and the
    # file's pages stay mapped, clean (the system can drop them)
    return {"anon_mb": anon, "file_mb": mapped, "model_mb": anon + mapped if base == "bf16" else anon, "peak_mb": peak,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--measure", nargs=2, metavar=("FOLDER", "BASE"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    import memory
    from diffusers import FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**CONFIG).to(torch.bfloat16)
        model.save_pretrained(tmp)
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        n_linear, rows = sum(m.weight.numel() for m in linear), sum(m.out_features for m in linear)
        other = 2 * (sum(p.numel() for p in model.parameters()) - n_linear)
        del model
        rows_out = {}
        for base in ("bf16", "int8", "nf4"):
            proc = subprocess.run([sys.executable, __file__, "--measure", tmp, base], capture_output=True, text=True,
                                  check=True)
            rows_out[base] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows_out[base]["predicted_mb"] = (memory.BASE_BYTES[base](n_linear, rows) + other) / 1e6
    print(f"Mid-size FLUX.1-shaped transformer, {rows_out['bf16']['parameters']:,} parameters, loaded on the CPU "
          f"(torch {torch.__version__})\n")
    print("| base | anonymous memory added (MB) | mapped file pages added (MB) | the model's weights (MB) | ratio to bf16 "
          "| predicted (MB) | predicted ratio | peak RSS while loading (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for base, r in rows_out.items():
        print(f"| {base} | {r['anon_mb']:.0f} | {r['file_mb']:.0f} | {r['model_mb']:.0f} | "
              f"{r['model_mb'] / rows_out['bf16']['model_mb']:.3f} | {r['predicted_mb']:.0f} | "
              f"{r['predicted_mb'] / rows_out['bf16']['predicted_mb']:.3f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
