"""Measure a toy-world model with the suite's own scripts, as a user would run them (issue 10).

    python toyworld/evaluate.py --model toyworld/toy-sd --output_dir toy-eval

Part one, here now: how well the base model follows prompts from the caption templates (shape, object colour and
background accuracy, read back from the generated images by the world's evaluator). Still to come: DreamBooth runs
on the subject and their subject fidelity, prompt fidelity, drift and diversity, as an ablation table.
"""

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toyworld.world import PALETTE, SHAPES, read_attributes  # noqa: E402


def prompt_following(model, out, num_prompts, images_per_prompt, seed, steps, guidance):
    """Accuracy of shape, colour and background over prompts drawn from the caption template."""
    rng = random.Random(seed)
    asked = []
    for _ in range(num_prompts):
        colour = rng.choice(list(PALETTE))
        asked.append((rng.choice(SHAPES), colour, rng.choice([c for c in PALETTE if c != colour])))
    prompts = out / "prompts.txt"
    out.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(f"a photo of a {c} {s} on a {b} background\n" for s, c, b in asked))
    subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", model, "--prompts_file", str(prompts),
                    "--num_images_per_prompt", str(images_per_prompt), "--seed", str(seed),
                    "--num_inference_steps", str(steps), "--guidance_scale", str(guidance), "--scheduler", "ddim",
                    "--output_dir", str(out / "images")], check=True, cwd=ROOT)
    right = {"shape": 0, "colour": 0, "background": 0}
    total = 0
    for p_idx, (shape, colour, background) in enumerate(asked):
        for path in sorted((out / "images").glob(f"p{p_idx:02d}-*.png")):
            seen = read_attributes(Image.open(path))
            right["shape"] += seen["shape"] == shape
            right["colour"] += seen["colour"] == colour
            right["background"] += seen["background"] == background
            total += 1
    return {k: v / total for k, v in right.items()}, total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "toyworld" / "toy-sd"))
    p.add_argument("--output_dir", default="toy-eval")
    p.add_argument("--num_prompts", type=int, default=30)
    p.add_argument("--images_per_prompt", type=int, default=2)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    accuracy, n = prompt_following(args.model, Path(args.output_dir) / "base", args.num_prompts, args.images_per_prompt,
                                   args.seed, args.num_inference_steps, args.guidance_scale)
    print(json.dumps({"base_model_prompt_following": accuracy, "images": n}, indent=2))
    print("| base model, prompts from the caption template | shape | colour | background | images |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} | {accuracy['shape']:.0%} | {accuracy['colour']:.0%} | {accuracy['background']:.0%} | {n} |")


if __name__ == "__main__":
    main()
