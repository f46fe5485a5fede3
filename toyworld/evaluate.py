"""Measure a toy-world model with the suite's own scripts, as a user would run them.

    python toyworld/evaluate.py --model toyworld/toy-sd --output_dir toy-eval
    python toyworld/evaluate.py --model toyworld/toy-flux --skip_dreambooth     # the toy FLUX.1's base model
    python toyworld/evaluate.py --model toyworld/toy-flux-dev --skip_dreambooth # its guidance-distilled sibling

With no flags: the default ablation (three rows, training seeds 0, 1 and 2, sampled at guidance 8; about 15 minutes
on 2 cores). --rows, --seeds and the settings below run any other table of QUALITY.md.

1. How well the base model follows prompts from the caption template: shape, object colour and background
   accuracy, read back from the generated images by the world's evaluator; and the VAE's own ceiling: the subject
   rendered on each background, encoded, decoded and read back.
2. DreamBooth on the subject (a circle with a red top and a yellow bottom, never seen in pretraining; 4 photos on
   white and green backgrounds) with generate_priors.py, train_dreambooth.py and infer.py, as an ablation table: full
   fine-tune with and without prior preservation, with the text encoder, LoRA, and the training options (--rows);
   each row the mean over --seeds training seeds with the range. For each, on backgrounds no photo had (blue,
   purple: the new contexts DreamBooth is for) apart from the photos' own (white, green):
   - subject fidelity: share of "a photo of sks circle on a <colour> background" images that show the subject
     (the evaluator's yes/no rule);
   - similarity: the evaluator's continuous score against the subject drawn at the object's place and size (about 1
     for the subject, 1/2 for a one-colour red or yellow circle, 0 for the halves swapped);
   - asked background (prompt fidelity): share of those with the asked background;
   - drift: share of plain "a photo of a circle" images that show the subject (the paper's language drift, which
     prior preservation is meant to prevent), and share of them that still show a circle;
   - diversity: entropy of the object colours of those (log2(6) = 2.58 bits would be all six colours alike);
   - more than one object: share of the subject prompts' images with something beside the object (count_objects).
3. The data options on photos made for each (--rows): wide photos in aspect-ratio buckets against centre crops; busy
   photos (two clutter objects) with and without the subject's masks; two subjects in one run (the second a circle
   with the halves swapped, "zwx circle"), with both subjects' fidelity and the cross-talk between them; photos
   with some on blue (blue then counts among the photos' backgrounds, and the new backgrounds are purple alone).
"""

import argparse
import functools
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import families  # noqa: E402
from toyworld.world import (PALETTE, SHAPES, SUBJECT, SUBJECT_B, SUBJECT_PHOTO_BACKGROUNDS,  # noqa: E402
                            count_objects, read_attributes, render, sample_attributes, write_subject_photos)

BACKGROUNDS = [c for c in PALETTE if c not in SUBJECT]
DEFAULT_ROWS = ["full, no prior preservation", "full, prior preservation, text encoder",
                "LoRA rank 16, prior preservation, pivotal tuning"]
DEFAULT_SEEDS = [0, 1, 2]


def pivotal_lora(rank=8):
    return ["--with_prior_preservation", "--lora_rank", str(rank), "--train_text_encoder_ti", "--initializer_concept",
            "circle"]


PIVOTAL_LORA = pivotal_lora()
ROWS = {  # name: train_dreambooth.py flags on top of the common ones
    "full, prior preservation": ["--with_prior_preservation"],
    "full, no prior preservation": [],
    "full, prior preservation, text encoder": ["--with_prior_preservation", "--train_text_encoder"],
    "LoRA rank 8, prior preservation": ["--with_prior_preservation", "--lora_rank", "8"],
    # training options, each against the row it changes
    "full, prior preservation, text encoder, EMA 0.99": ["--with_prior_preservation", "--train_text_encoder",
                                                         "--use_ema", "--ema_decay", "0.99"],
    "full, prior preservation, text encoder, Prodigy": ["--with_prior_preservation", "--train_text_encoder",
                                                        "--optimizer", "prodigy", "--learning_rate", "1.0"],
    "full, prior preservation, text encoder for the first half": ["--with_prior_preservation", "--train_text_encoder",
                                                                  "--train_text_encoder_frac", "0.5"],
    "DoRA rank 8, prior preservation": ["--with_prior_preservation", "--lora_rank", "8", "--use_dora"],
    "full, prior preservation, pivotal tuning": ["--with_prior_preservation", "--train_text_encoder_ti",
                                                 "--initializer_concept", "circle"],
    "full, prior preservation, pivotal tuning, tokens at 1e-3": ["--with_prior_preservation", "--train_text_encoder_ti",
                                                                 "--initializer_concept", "circle",
                                                                 "--text_encoder_lr", "1e-3"],
    "LoRA rank 8, prior preservation, pivotal tuning": PIVOTAL_LORA,
    # the best recipe above, one change each
    "LoRA rank 8, prior preservation, pivotal tuning, Min-SNR 5": PIVOTAL_LORA + ["--snr_gamma", "5"],
    "LoRA rank 8, prior preservation, pivotal tuning, cosine schedule": PIVOTAL_LORA + ["--lr_scheduler", "cosine"],
    "LoRA rank 8, prior preservation, pivotal tuning, EMA 0.99": PIVOTAL_LORA + ["--use_ema", "--ema_decay", "0.99"],
    "LoRA rank 8, prior preservation, pivotal tuning, prior loss weight 0.5": PIVOTAL_LORA + ["--prior_loss_weight",
                                                                                             "0.5"],
    "LoRA rank 16, prior preservation, pivotal tuning": pivotal_lora(16),
    # flow matching (the toy FLUX.1): the timestep weighting, each against the row without it
    "LoRA rank 16, prior preservation": ["--with_prior_preservation", "--lora_rank", "16"],
    "full, prior preservation, logit-normal weighting": ["--with_prior_preservation", "--weighting_scheme",
                                                         "logit_normal"],
    "full, prior preservation, mode weighting": ["--with_prior_preservation", "--weighting_scheme", "mode"],
    "LoRA rank 16, prior preservation, pivotal tuning, logit-normal weighting": pivotal_lora(16) + [
        "--weighting_scheme", "logit_normal"],
    "LoRA rank 16, pivotal tuning, no prior preservation": pivotal_lora(16)[1:],
    "LoRA rank 16, prior preservation, pivotal tuning, mode weighting": pivotal_lora(16) + ["--weighting_scheme", "mode"],
    # FLUX.1's single-stream blocks' MLP and output projections too (the default targets adapt only their attention)
    "LoRA rank 16, prior preservation, pivotal tuning, single-stream MLPs too": pivotal_lora(16) + [
        "--lora_target_modules", *families.FLUX_LORA_TARGETS, "proj_mlp", "proj_out"],
}
# The data options, each on photos made for it: name -> (photos, flags). Wide photos (48x32, the subject anywhere
# across them) in buckets or centre-cropped; busy photos (two clutter objects) with and without the subject's masks;
# two subjects (the second one's halves swapped, "zwx circle") in one run.
DATA_ROWS = {
    "wide photos, centre crop": ("wide", ["--with_prior_preservation", "--center_crop"]),
    "wide photos, aspect-ratio buckets": ("wide", ["--with_prior_preservation", "--center_crop",
                                                   "--aspect_ratio_buckets", "32,32;24,40;40,24"]),
    "busy photos, no masks": ("busy", ["--with_prior_preservation"]),
    "busy photos, masks (background weight 0.1)": ("busy-masks", ["--with_prior_preservation",
                                                                  "--mask_background_weight", "0.1"]),
    "busy photos, masks (background weight 0.02)": ("busy-masks", ["--with_prior_preservation",
                                                                   "--mask_background_weight", "0.02"]),
    "busy photos, masks (background weight 0)": ("busy-masks", ["--with_prior_preservation",
                                                                "--mask_background_weight", "0"]),
    "two subjects (sks and zwx) in one run": ("two", ["--with_prior_preservation"]),
    # masks on the usual photos: the identifier learns the subject and not the photos' backgrounds
    "full, prior preservation, text encoder, masks": ("masks", ["--with_prior_preservation", "--train_text_encoder",
                                                                "--mask_background_weight", "0"]),
    "LoRA rank 8, prior preservation, pivotal tuning, masks": ("masks", PIVOTAL_LORA + ["--mask_background_weight",
                                                                                         "0"]),
    # twice the photos (8: the subject in more places and sizes, still on white and green)
    "LoRA rank 8, prior preservation, pivotal tuning, 8 photos": ("eight", PIVOTAL_LORA),
    "LoRA rank 8, prior preservation, pivotal tuning, 8 photos, Min-SNR 5": ("eight", PIVOTAL_LORA + ["--snr_gamma",
                                                                                                   "5"]),
    # the same four photos with the last one on blue instead of green: blue is then a photos' background, and
    # "new backgrounds" is purple alone
    "LoRA rank 16, prior preservation, pivotal tuning, a photo on blue": ("blue", pivotal_lora(16)),
    # six photos, two on each of white, green and blue
    "LoRA rank 16, prior preservation, pivotal tuning, six photos, two on blue": ("six-blue", pivotal_lora(16)),
}
PHOTOS = {"wide": dict(width=48), "busy": dict(busy=True), "busy-masks": dict(busy=True, masks=True),
          "masks": dict(masks=True), "eight": dict(n=8), "blue": dict(backgrounds=("white", "green", "white", "blue")),
          "six-blue": dict(n=6, backgrounds=("white", "green", "blue"))}


def script(name, *args):
    subprocess.run([sys.executable, str(ROOT / name), *map(str, args)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sample(model, out, prompts, n, args, subject=SUBJECT):
    """infer.py on each prompt; the evaluator's reading of every image (for `subject`), per prompt."""
    out.mkdir(parents=True, exist_ok=True)
    if args.rescore and (out / "images").is_dir():  # the images of an earlier run with these settings
        return read_images(out, len(prompts), subject)
    (out / "prompts.txt").write_text("".join(p + "\n" for p in prompts))
    script("infer.py", "--model", model, "--prompts_file", out / "prompts.txt", "--num_images_per_prompt", n,
           "--seed", args.seed, "--num_inference_steps", args.num_inference_steps, "--guidance_scale",
           args.guidance_scale, "--scheduler", args.scheduler, "--output_dir", out / "images")
    return read_images(out, len(prompts), subject)


def read_images(out, num_prompts, subject=SUBJECT):
    return [[{**read_attributes(image, subject=subject), "objects": count_objects(image)}
             for image in map(Image.open, sorted((out / "images").glob(f"p{i:02d}-*.png")))] for i in range(num_prompts)]


def subject_metrics(model, out, args, token="sks", subject=SUBJECT, seen=SUBJECT_PHOTO_BACKGROUNDS):
    prompts = [f"a photo of {token} circle on a {b} background" for b in BACKGROUNDS]
    readings = sample(model, out / token if token != "sks" else out / "subject", prompts, args.images_per_prompt, args,
                      subject)
    plain = sample(model, out / "class", ["a photo of a circle"], len(BACKGROUNDS) * args.images_per_prompt, args,
                   subject)[0]
    return score(dict(zip(BACKGROUNDS, readings)), plain, seen)


def two_subject_metrics(model, out, args):
    """Both subjects' metrics (the second's prefixed b_) and the cross-talk: the share of one subject's images that
    show the other."""
    a, b = subject_metrics(model, out, args), subject_metrics(model, out, args, "zwx", SUBJECT_B)
    a_shows_b = [r["pattern"] for rs in read_images(out / "subject", len(BACKGROUNDS), SUBJECT_B) for r in rs]
    b_shows_a = [r["pattern"] for rs in read_images(out / "zwx", len(BACKGROUNDS)) for r in rs]
    return {**a, **{f"b_{k}": v for k, v in b.items()}, "a_shows_b": sum(a_shows_b) / len(a_shows_b),
            "b_shows_a": sum(b_shows_a) / len(b_shows_a)}


def score(subject, plain, seen=SUBJECT_PHOTO_BACKGROUNDS):
    """The metrics from the evaluator's readings: {background asked: readings} of the subject prompts, and the
    readings of the plain class prompt. Backgrounds no photo had ("new") apart from the photos' own (`seen`)."""
    def rates(backgrounds):
        asked = [(b, s) for b in backgrounds for s in subject[b]]
        return {"subject_fidelity": sum(s["pattern"] for _, s in asked) / len(asked),
                "similarity": sum(s["similarity"] for _, s in asked) / len(asked),
                "prompt_fidelity": sum(s["background"] == b for b, s in asked) / len(asked),
                "extra_objects": sum(s["objects"] > 1 for _, s in asked) / len(asked)}
    colours = [s["colour"] for s in plain if s["colour"]]
    shares = [colours.count(c) / len(colours) for c in set(colours)]
    entropy = sum(-q * math.log2(q) for q in shares)  # 0 for one colour (or none), log2(6) for all six alike
    new = [b for b in BACKGROUNDS if b not in seen]
    return {**rates(BACKGROUNDS), **{f"{k}_new": v for k, v in rates(new).items()},
            **{f"{k}_seen": v for k, v in rates(seen).items()},
            "drift": sum(s["pattern"] for s in plain) / len(plain),
            "class_shape": sum(s["shape"] == "circle" for s in plain) / len(plain),
            "diversity_bits": entropy, "images": sum(map(len, subject.values())) + len(plain)}


def class_images_without(priors, backgrounds, folder):
    """A probe of what the class images hold: a copy of `priors` without the images the evaluator reads on
    `backgrounds`, in `folder` (made anew). Returns how many are left."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    kept = [path for path in sorted(priors.glob("*.png"))
            if read_attributes(Image.open(path))["background"] not in backgrounds]
    for path in kept:
        shutil.copy(path, folder)
    return len(kept)


def class_images(model, out, args):
    """The class images every training seed shares (generate_priors.py), or --class_images_without's copy of them.
    Returns their folder and count."""
    common = ["--num_inference_steps", args.num_inference_steps, "--guidance_scale", args.prior_guidance_scale,
              "--scheduler", args.scheduler, "--seed", args.seed]
    script("generate_priors.py", "--model", model, "--class_prompt", "a photo of a circle", "--class_dir",
           out / "priors", "--num_class_images", args.num_class_images, "--sample_batch_size", 10, *common)
    if not args.class_images_without:
        return out / "priors", args.num_class_images
    class_dir = out / ("priors-without-" + "-".join(args.class_images_without))
    return class_dir, class_images_without(out / "priors", args.class_images_without, class_dir)


def dreambooth(model, out, args, seed, class_dir, num_class_images):
    shifted = f"-shifted-{args.shift_photos}" if args.shift_photos else ""
    photos = out / (("subject-photos-captioned" if args.captions else "subject-photos") + shifted)
    write_subject_photos(photos, captions=args.captions, shift=args.shift_photos)
    results = {"base model": subject_metrics(model, out / "base", args)} if seed == args.seeds[0] else {}
    for name, flags in {**ROWS, **{k: f for k, (_, f) in DATA_ROWS.items()}}.items():
        if name not in (args.rows or DEFAULT_ROWS):
            continue
        run = out / f"seed-{seed}" / name.replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
        kind = DATA_ROWS.get(name, (None,))[0]
        seen = tuple(dict.fromkeys(PHOTOS.get(kind, {}).get("backgrounds", SUBJECT_PHOTO_BACKGROUNDS)))
        metrics = two_subject_metrics if kind == "two" else functools.partial(subject_metrics, seen=seen)
        if args.rescore and (run / "model" / "run_config.json").is_file():
            results[name] = metrics(str(run / "model"), run, argparse.Namespace(**{**vars(args), "seed": seed}))
            continue
        shutil.rmtree(run, ignore_errors=True)
        lr = args.lora_learning_rate if "--lora_rank" in flags else args.learning_rate
        data = ["--instance_dir", photos, "--instance_prompt", "a photo of sks circle", "--class_dir", class_dir,
                "--class_prompt", "a photo of a circle"]
        if kind in PHOTOS:
            data[1] = out / f"subject-photos-{kind}{shifted}"
            write_subject_photos(data[1], captions=args.captions, shift=args.shift_photos, **PHOTOS[kind])
        elif kind == "two":
            zwx = out / f"subject-photos-zwx{shifted}"
            write_subject_photos(zwx, captions=args.captions, subject=SUBJECT_B, token="zwx", shift=args.shift_photos)
            concepts = [{"instance_prompt": f"a photo of {token} circle", "instance_data_dir": str(folder),
                         "class_prompt": "a photo of a circle", "class_data_dir": str(class_dir)}
                        for token, folder in (("sks", photos), ("zwx", zwx))]
            (out / "concepts.json").write_text(json.dumps(concepts, indent=1) + "\n")
            data = ["--concepts_list", out / "concepts.json"]
        t0 = time.time()
        script("train_dreambooth.py", "--model", model, *data, "--num_class_images", num_class_images,
               "--output_dir", run / "model", "--resolution", 32, "--train_batch_size", args.train_batch_size,
               "--max_train_steps", args.train_steps, "--learning_rate", lr, "--lr_warmup_steps", 0,
               "--checkpointing_steps", 100000, "--report_to", "none", "--seed", seed, *flags, *args.train_flags.split())
        train_seconds = time.time() - t0
        results[name] = {**metrics(str(run / "model"), run, argparse.Namespace(**{**vars(args), "seed": seed})),
                         "train_seconds": train_seconds}
    return results


def summary(runs):
    """Per row, each metric's mean over the training seeds with its range: "50% (41-59%)"."""
    rows = {}
    for results in runs:
        for name, metrics in results.items():
            rows.setdefault(name, []).append(metrics)
    return {name: {k: (sum(m[k] for m in ms) / len(ms), min(m[k] for m in ms), max(m[k] for m in ms))
                   for k in ms[0]} | {"seeds": len(ms)} for name, ms in rows.items()}


def cell(value, percent=True):
    mean, low, high = value
    fmt = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:.2f}")
    return fmt(mean) if low == high else f"{fmt(mean)} ({fmt(low)}-{fmt(high)})"


TABLE_HEAD = ("\n| run | seeds | new backgrounds: subject fidelity | similarity | asked background | photos' "
              "backgrounds: subject fidelity | similarity | asked background | drift | class prompt gives a circle | "
              "diversity (bits) | more than one object (new, photos' backgrounds) |\n" + "|---" * 12 + "|")


def table_row(name, m):
    return (f"| {name} | {m['seeds']} | {cell(m['subject_fidelity_new'])} | {cell(m['similarity_new'], False)} | "
            f"{cell(m['prompt_fidelity_new'])} | {cell(m['subject_fidelity_seen'])} | "
            f"{cell(m['similarity_seen'], False)} | {cell(m['prompt_fidelity_seen'])} | {cell(m['drift'])} | "
            f"{cell(m['class_shape'])} | {cell(m['diversity_bits'], False)} | {cell(m['extra_objects_new'])}, "
            f"{cell(m['extra_objects_seen'])} |")


TWO_HEAD = ("\n| run | seeds | sks on new backgrounds | zwx on new backgrounds | sks on the photos' backgrounds | "
            "zwx on the photos' backgrounds | sks prompts showing zwx | zwx prompts showing sks | drift (sks, zwx) |\n"
            + "|---" * 9 + "|")


def two_row(name, m):
    return (f"| {name} | {m['seeds']} | {cell(m['subject_fidelity_new'])} | {cell(m['b_subject_fidelity_new'])} | "
            f"{cell(m['subject_fidelity_seen'])} | {cell(m['b_subject_fidelity_seen'])} | {cell(m['a_shows_b'])} | "
            f"{cell(m['b_shows_a'])} | {cell(m['drift'])}, {cell(m['b_drift'])} |")


def prompt_following(model, out, args, images_per_prompt=2):
    """Accuracy of shape, colour and background over prompts drawn from the caption template."""
    rng = random.Random(args.seed)
    asked = []
    for _ in range(args.num_prompts):
        colour = rng.choice(list(PALETTE))
        asked.append((rng.choice(SHAPES), colour, rng.choice([c for c in PALETTE if c != colour])))
    readings = sample(model, out, [f"a photo of a {c} {s} on a {b} background" for s, c, b in asked],
                      images_per_prompt, args)
    pairs = [(dict(shape=shape, colour=colour, background=background), seen)
             for (shape, colour, background), images in zip(asked, readings) for seen in images]
    keys = ("shape", "colour", "background")
    return {k: sum(want[k] == seen[k] for want, seen in pairs) / len(pairs) for k in keys}, len(pairs)


def autoencoder_ceiling(model, n=100, seed=5000):
    """The VAE alone: the subject rendered on each background (n places and sizes), encoded, decoded and read back.
    No generated image can do better than its own latent space, so this bounds what any fine-tune can score.
    `model`: a model folder, or the AutoencoderKL itself (pretraining checks its VAE with this)."""
    import torch
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    vae = model if isinstance(model, AutoencoderKL) else AutoencoderKL.from_pretrained(model, subfolder="vae")
    vae, processor = vae.float().eval(), VaeImageProcessor()
    ceiling = {}
    for background in BACKGROUNDS:
        images = [render(sample_attributes(seed + i, subject=True, background=background)) for i in range(n)]
        with torch.no_grad():
            decoded = vae.decode(vae.encode(processor.preprocess(images)).latent_dist.mode()).sample
        readings = [read_attributes(image) for image in processor.postprocess(decoded)]
        ceiling[background] = {"subject_fidelity": sum(r["pattern"] for r in readings) / n,
                               "similarity": sum(r["similarity"] for r in readings) / n}
    return ceiling


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "toyworld" / "toy-sd"))
    p.add_argument("--output_dir", default="toy-eval")
    p.add_argument("--num_prompts", type=int, default=30, help="prompts for the base model's prompt following")
    p.add_argument("--images_per_prompt", type=int, default=8)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=8.0, help="sampling the base and fine-tuned models")
    p.add_argument("--prior_guidance_scale", type=float, default=4.0, help="the class images")
    p.add_argument("--scheduler", default=None, help="the sampler (default: ddim for the toy SD, flow_euler for the "
                   "toy FLUX.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_class_images", type=int, default=100)
    p.add_argument("--class_images_without", nargs="+", default=[], choices=list(PALETTE), metavar="BACKGROUND",
                   help="train on the class images the evaluator reads on other backgrounds only (a probe of what the "
                        "class images hold; the row trains on as many as are left)")
    p.add_argument("--train_steps", type=int, default=600)
    p.add_argument("--train_batch_size", type=int, default=2)
    p.add_argument("--learning_rate", type=float, default=2e-4, help="full fine-tunes")
    p.add_argument("--lora_learning_rate", type=float, default=2e-3)
    p.add_argument("--train_flags", default="", help="train_dreambooth.py flags added to every row's, e.g. "
                   "\"--lora_rank 32\" (a later flag wins; use a separate --output_dir for each setting)")
    p.add_argument("--rows", action="append", default=None, choices=list(ROWS) + list(DATA_ROWS),
                   help=f"these ablation rows (default: the first {len(DEFAULT_ROWS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS,
                   help="training seeds: each row is trained and sampled once per seed (sampled with the same "
                        "seed), and reported as the mean with the range")
    p.add_argument("--captions", action="store_true",
                   help="each subject photo captioned with its background (\"a photo of sks circle on a white "
                        "background\") instead of the bare instance prompt")
    p.add_argument("--shift_photos", type=int, default=0, metavar="K",
                   help="save photo i under photo i+K's name: the same photos met in another order, with each training "
                        "seed's LoRA start and noise unchanged (a probe of what makes a seed weak)")
    p.add_argument("--skip_dreambooth", action="store_true", help="only the base model's prompt following")
    p.add_argument("--rescore", action="store_true",
                   help="score the images an earlier run with the same settings left in --output_dir (training and "
                        "sampling are deterministic on one machine, so the numbers are the run's) instead of making them")
    args = p.parse_args()
    if args.scheduler is None:
        args.scheduler = "ddim" if families.read_model(args.model).family.objective == "ddpm" else "flow_euler"
    out = Path(args.output_dir)
    t0 = time.time()
    accuracy, n = prompt_following(args.model, out / "prompt-following", args)
    report = {"settings": vars(args), "base_model_prompt_following": accuracy, "images": n}
    print("| base model, prompts from the caption template | shape | colour | background | images |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} | {accuracy['shape']:.0%} | {accuracy['colour']:.0%} | {accuracy['background']:.0%} | {n} |")
    ceiling = report["autoencoder_ceiling"] = autoencoder_ceiling(args.model)
    print("\n| the subject through the VAE alone (100 renders each) | " + " | ".join(ceiling) + " |")
    print("|---" * (len(ceiling) + 1) + "|")
    print("| subject fidelity, similarity | " + " | ".join(f"{c['subject_fidelity']:.0%}, {c['similarity']:.2f}"
                                                       for c in ceiling.values()) + " |")
    if not args.skip_dreambooth:
        class_dir, num_class_images = class_images(args.model, out, args)
        runs = [dreambooth(args.model, out, args, seed, class_dir, num_class_images) for seed in args.seeds]
        report["dreambooth"], report["dreambooth_per_seed"] = summary(runs), runs
        print(TABLE_HEAD)
        for name, m in report["dreambooth"].items():
            print(table_row(name, m))
        if any("b_drift" in m for m in report["dreambooth"].values()):
            print(TWO_HEAD)
            for name, m in report["dreambooth"].items():
                if "b_drift" in m:
                    print(two_row(name, m))
    report["seconds"] = time.time() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['seconds'] / 60:.1f} minutes; report in {out / 'report.json'}")


if __name__ == "__main__":
    main()
