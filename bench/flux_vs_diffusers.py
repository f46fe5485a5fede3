"""FLUX.1 LoRA DreamBooth: seconds per step of train_dreambooth.py against diffusers' train_dreambooth_lora_flux.py,
the same flags, the same mid-size FLUX.1-shaped model, side by side in one run.

    python bench/flux_vs_diffusers.py --diffusers_script PATH/examples/dreambooth/train_dreambooth_lora_flux.py

The model is written here with random weights (a step costs the same whatever the weights): FLUX.1's layout at
a small width and depth (double and single blocks, CLIP for the pooled vector, a T5 encoder for the sequence, a VAE
with 16 latent channels and 8x downsampling), big enough that a step's compute is well above either script's
overhead. Each script runs for --short and --long optimizer steps; the time per step is the difference of the two
wall times over the difference of the steps, so start-up, loading and saving cancel out; --repeats times, the two
scripts taking turns, the median reported with the range. Prints a table.
diffusers' script imports torchvision for its data transforms; give --pythonpath a folder with a stand-in if the
installed torch has no matching torchvision build.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def make_mid_flux(folder):
    """FLUX.1-dev's layout at about a twelfth of its width: 2 double and 4 single blocks of width 256."""
    import make_tiny_model
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    tokenizer = make_tiny_model.write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    tokenizer_2 = make_tiny_model.write_t5_tokenizer(os.path.join(folder, "tokenizer_2"))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024,
                                        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), latent_channels=16, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                                         num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=256,
                                         guidance_embeds=True, axes_dims_rope=(16, 24, 24))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                 tokenizer_2=tokenizer_2, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder, sum(p.numel() for p in transformer.parameters())


def wall_time(cmd, log, env):
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:2]))} failed; see {log}")
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--diffusers_script", required=True, help="diffusers' examples/dreambooth/train_dreambooth_lora_flux.py")
    p.add_argument("--pythonpath", default=None, help="prepended to PYTHONPATH for diffusers' script")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--captions", action="store_true", help="a caption per photo (a --dataset_name imagefolder)")
    p.add_argument("--short", type=int, default=4, help="optimizer steps of the short runs")
    p.add_argument("--long", type=int, default=24, help="optimizer steps of the long runs")
    p.add_argument("--repeats", type=int, default=3, help="runs of each length per script (the median is reported)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    import make_tiny_model

    model, parameters = make_mid_flux(str(work / "model"))
    make_tiny_model.make_sample_photos(str(work / "photos"), n=4, size=args.resolution + args.resolution // 8)
    if args.captions:  # an imagefolder dataset with a caption per photo, read by both scripts with `datasets`
        photos = sorted((work / "photos").glob("*.png"))
        (work / "photos" / "metadata.jsonl").write_text("".join(
            f'{{"file_name": "{p.name}", "text": "a photo of sks dog, view {i}"}}\n' for i, p in enumerate(photos)))
        data = ["--dataset_name", str(work / "photos"), "--caption_column", "text"]
    else:
        data = ["--instance_data_dir", str(work / "photos")]
    # the flags both scripts take, with the same meaning: LoRA rank 16, batch 1, T5 at 512 tokens, guidance 1
    common = ["--pretrained_model_name_or_path", model, *data,
              "--instance_prompt", "a photo of sks dog", "--resolution", str(args.resolution), "--train_batch_size", "1",
              "--rank", "16", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
              "--max_sequence_length", "512", "--guidance_scale", "1", "--seed", "0", "--center_crop",
              "--checkpointing_steps", "1000000", "--report_to", "tensorboard"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    denv = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [args.pythonpath, env.get("PYTHONPATH")]))}
    scripts = {"train_dreambooth.py (this suite)": ([sys.executable, str(ROOT / "train_dreambooth.py")], env),
               "diffusers' train_dreambooth_lora_flux.py": ([sys.executable, args.diffusers_script], denv)}
    print(f"mid FLUX.1-shaped model ({parameters / 1e6:.1f} M transformer parameters), {args.resolution} px, "
          f"{'a caption per photo' if args.captions else 'one instance prompt'}, LoRA rank 16, batch 1, T5 at 512 tokens; "
          f"{os.cpu_count()} CPU threads; torch {torch.__version__}")
    print(f"| script | seconds per step (median of {args.repeats}) | range | steps/s |\n|---|---|---|---|")
    per_step = {name: [] for name in scripts}
    for r in range(args.repeats):  # the two scripts take turns, so a slow spell of the machine hits both
        for name, (cmd, script_env) in scripts.items():
            times = {}
            for steps in (args.short, args.long):
                out = work / f"{name.split()[0].strip(chr(39))}-{steps}-{r}"
                times[steps] = wall_time([*cmd, *common, "--output_dir", str(out), "--max_train_steps", str(steps)],
                                         out.with_suffix(".log"), script_env)
            per_step[name].append((times[args.long] - times[args.short]) / (args.long - args.short))
    for name, values in per_step.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f}-{max(values):.3f} | {1 / median:.2f} |")


if __name__ == "__main__":
    main()
