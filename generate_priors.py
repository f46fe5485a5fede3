"""Generate the class-prior images of DreamBooth's prior-preservation loss from the base model (SD 1.x/2.x or SDXL).

    accelerate launch generate_priors.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --class_prompt "a photo of dog" --class_dir priors/dog --num_class_images 200
    accelerate launch generate_priors.py --pretrained_model_name_or_path ... --concepts_list concepts.json  # every subject

Image i is made with its own generator seeded from (--seed, i), always in batch i // --sample_batch_size, and saved as
class_dir/00000i.png: the files are the same bytes however many processes share the work, and a rerun makes only the
missing indices. Each image records what made it (model, UNet hash, prompt, sampler settings, versions) in its PNG
text, so the folder holds nothing but images (trainers that open every file in it, diffusers' scripts among them,
read it too); a rerun with other settings is refused unless --overwrite. train_dreambooth.py --with_prior_preservation calls the
same code when its class folder is short.
"""

from pathlib import Path

import dreambooth_utils as du

# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    return du.parse_args_with_config(build_parser(), argv)


def build_parser():
    p = du.ArgumentParser(__doc__, __file__)
    du.add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--class_prompt", default=None, help="prompt of the class, e.g. 'a photo of dog'")
    g.add_argument("--class_dir", "--class_data_dir", dest="class_dir", default=None, help="folder the images go to")
    g.add_argument("--concepts_list", default=None,
                   help="instead: train_dreambooth.py's JSON list of subjects; fills each one's class_data_dir with its "
                        "class_prompt").structured = True
    g.add_argument("--num_class_images", type=du.COUNT, default=100, help="images the folder should hold")
    g = p.add_argument_group("sampling")
    g.add_argument("--negative_prompt", default=du.PRIOR_DEFAULTS["negative_prompt"], help="negative prompt")
    g.add_argument("--num_inference_steps", type=du.COUNT, default=du.PRIOR_DEFAULTS["num_inference_steps"],
                   help="sampling steps per image")
    g.add_argument("--guidance_scale", type=du.NONNEGATIVE, default=du.PRIOR_DEFAULTS["guidance_scale"],
                   help="classifier-free guidance scale")
    g.add_argument("--scheduler", default=None, choices=sorted(du.SCHEDULERS), help="sampler (default: the model's own)")
    g.add_argument("--resolution", type=du.SIZE, default=None, help="image size (default: the model's)")
    g.add_argument("--sample_batch_size", type=du.COUNT, default=du.PRIOR_DEFAULTS["sample_batch_size"],
                   help="images per forward pass, per process")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="weights dtype (default: fp16 on a GPU, else fp32)")
    g.add_argument("--seed", type=du.NATURAL, default=0, help="image i uses a generator seeded from (seed, i)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the generated images of a folder that other settings made")
    return p


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # ---- check the input before anything loads
    if args.concepts_list and (args.class_prompt or args.class_dir):
        du.fail("--concepts_list names each subject's class_prompt and class_data_dir: leave out --class_prompt/--class_dir")
    if not args.concepts_list and not (args.class_prompt and args.class_dir):
        du.fail("give --class_prompt (e.g. 'a photo of dog') and --class_dir, or --concepts_list")
    if not args.concepts_list and not args.class_prompt.strip():
        du.fail("--class_prompt is empty (e.g. 'a photo of dog')")
    subjects = du.read_concepts(args.concepts_list, True) if args.concepts_list else [
        {"class_prompt": args.class_prompt, "class_data_dir": args.class_dir}]
    for subject in subjects:
        du.check_writable(Path(subject["class_data_dir"]), "class folder")
    args.pretrained_model_name_or_path = du.check_model_source(args.pretrained_model_name_or_path, args.revision,
                                                               args.single_file_config)
    du.check_launch()

    state = du.partial_state()
    precision = args.mixed_precision or ("fp16" if state.device.type == "cuda" else "fp32")
    unet_sha256 = du.unet_fingerprint(args.pretrained_model_name_or_path, args.revision)
    folders = []  # (class folder, settings), every folder checked before any image is made
    for subject in subjects:
        class_dir = Path(subject["class_data_dir"])
        settings = {**{k: v for k, v in vars(args).items() if k in du.PRIOR_SETTINGS}, "precision": precision,
                    "class_prompt": subject["class_prompt"], "unet_sha256": unet_sha256}
        if not args.overwrite:  # the batch size changes rounding, not the images: a top-up keeps the folder's own
            settings = du.check_prior_folder(class_dir, settings, [k for k in du.PRIOR_SETTINGS if k != "sample_batch_size"])
        folders.append((class_dir, settings))
    for class_dir, settings in folders:
        if args.overwrite:
            old = du.read_prior_manifest(class_dir)
            if old and any(old.get(k) != settings[k] for k in du.PRIOR_SETTINGS) and state.is_main_process:
                for image in class_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # ours; the user's images stay
                    image.unlink()
                (class_dir / du.PRIOR_MANIFEST).unlink(missing_ok=True)  # an older version's record of them
            state.wait_for_everyone()
        missing = du.missing_prior_indices(class_dir, args.num_class_images)
        if not missing:
            state.print(f"{class_dir} already holds {args.num_class_images} class images; nothing to do")
            continue
        # ---- this process's share of the batches, each image with the settings that made it
        du.make_prior_images(state, class_dir, missing, settings)
        state.print(f"made {len(missing)} class images; {class_dir} now holds {args.num_class_images}")


if __name__ == "__main__":
    du.run(main)
