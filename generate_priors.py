"""Generate the class-prior images of DreamBooth's prior-preservation loss from the base model.

    accelerate launch generate_priors.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --class_prompt "a photo of dog" --class_dir priors/dog --num_class_images 200

Image i is made with its own generator seeded from (--seed, i) and saved as class_dir/00000i.png, so the set does
not depend on the batch size or on how many processes share the work, and a rerun makes only the missing indices.
train_dreambooth.py --with_prior_preservation calls the same code when its class folder is short.
"""

import argparse
from pathlib import Path

from tqdm.auto import tqdm

import dreambooth_utils as du

MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    du.add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--class_prompt", required=True, help="prompt of the class, e.g. 'a photo of dog'")
    g.add_argument("--class_dir", "--class_data_dir", dest="class_dir", required=True, help="folder the images go to")
    g.add_argument("--num_class_images", type=int, default=100, help="images the folder should hold")
    g = p.add_argument_group("sampling")
    g.add_argument("--negative_prompt", default=None)
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=7.5)
    g.add_argument("--scheduler", default=None, choices=sorted(du.SCHEDULERS), help="sampler (default: the model's own)")
    g.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    g.add_argument("--sample_batch_size", type=int, default=4, help="images per forward pass, per process")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="weights dtype (default: fp16 on a GPU, else fp32)")
    g.add_argument("--seed", type=int, default=0, help="image i uses a generator seeded from (seed, i)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    # ---- check the input before anything loads
    if args.num_class_images < 1 or args.sample_batch_size < 1 or args.num_inference_steps < 1:
        du.fail("--num_class_images, --sample_batch_size and --num_inference_steps must be at least 1")
    if Path(args.class_dir).exists() and not Path(args.class_dir).is_dir():
        du.fail(f"class folder is not a folder: {args.class_dir}")
    du.check_model_source(args.pretrained_model_name_or_path)
    missing = du.missing_prior_indices(args.class_dir, args.num_class_images)

    from accelerate import PartialState

    state = PartialState()
    if not missing:
        state.print(f"{args.class_dir} already holds {args.num_class_images} class images; nothing to do")
        return
    # ---- generate this process's share of the missing indices
    precision = args.mixed_precision or ("fp16" if state.device.type == "cuda" else "no")
    pipe = du.load_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant,
                            du.torch_dtype(precision), state.device)
    du.set_scheduler(pipe, args.scheduler)
    mine = missing[state.process_index::state.num_processes]
    desc = f"class images (process {state.process_index} of {state.num_processes})"
    with tqdm(total=len(mine), desc=desc, disable=not state.is_local_main_process) as bar:
        du.generate_prior_images(pipe, args.class_prompt, args.class_dir, mine, seed=args.seed,
                                 batch_size=args.sample_batch_size, negative_prompt=args.negative_prompt,
                                 num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                 resolution=args.resolution, progress=bar)
    state.wait_for_everyone()
    # ---- the run records itself
    if state.is_main_process:
        config = {**vars(args), "num_processes": state.num_processes, "generated_indices": len(missing)}
        du.write_json(Path(args.class_dir, MANIFEST), du.run_record(config, __file__))
        print(f"made {len(missing)} class images; {args.class_dir} now holds {args.num_class_images}")


if __name__ == "__main__":
    main()
