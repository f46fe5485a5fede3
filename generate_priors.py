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

import gc
import hashlib
import json
import os
from pathlib import Path

import torch
from PIL import Image

import cli
import families
import loading
import imagedata
import runs

# ----------------------------------------------------------------------------------------------------------------
# Class-prior images (made here, and by train_dreambooth.py when a class folder is short)


PRIOR_MANIFEST = "manifest.json"  # where versions before 2026-11-28 recorded a class folder's settings
PRIOR_TEXT = "dreambooth_prior"  # the PNG text entry of each generated class image: the settings that made it
# What makes a set of class images: the same values give the same bytes. The first five name the model and prompt.
PRIOR_SETTINGS = ("pretrained_model_name_or_path", "revision", "variant", "unet_sha256", "class_prompt",
                  "negative_prompt", "scheduler", "num_inference_steps", "guidance_scale", "resolution", "seed",
                  "precision", "sample_batch_size", "pretrained_vae_model_name_or_path")
# generate_priors.py's defaults, which train_dreambooth.py uses when it fills a class folder itself; the sampler's
# steps and guidance are the model family's where it has its own (sampler_defaults)
PRIOR_DEFAULTS = {"negative_prompt": None, "scheduler": None, "num_inference_steps": 50, "guidance_scale": 7.5,
                  "sample_batch_size": 4}
PRIOR_SAMPLER = ("negative_prompt", "scheduler", "num_inference_steps", "guidance_scale")


def sampler_defaults(model):
    """PRIOR_DEFAULTS with the family's own sampler settings (`model`: families.read_model's): FLUX.1 dev 28 steps at
    its embedded guidance 3.5, schnell 4 steps without guidance, SD 3.5 28 steps at 7.0."""
    own = families.sampling_defaults(model)
    return {**PRIOR_DEFAULTS, **({"num_inference_steps": own["validation_inference_steps"],
                                  "guidance_scale": own["validation_guidance_scale"]} if own else {})}


def prior_image_name(index):
    return f"{index:06d}.png"


def denoiser_fingerprint(name_or_path, revision=None):
    """sha256 of a local model's denoiser weight files, or the commit of a hub model's cached snapshot (None if it is
    not cached yet): a folder of class images made by another model, even one under the same path, is then told apart.
    Recorded in each image as "unet_sha256", the key earlier versions wrote, whatever the family's denoiser."""
    path = Path(name_or_path)
    if path.is_dir():
        digest = hashlib.sha256()
        folder = next((path / d for d in families.DENOISERS if (path / d).is_dir()), path / families.DENOISERS[0])
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".bin"):
                with open(f, "rb") as stream:
                    while chunk := stream.read(1 << 24):
                        digest.update(chunk)
        return digest.hexdigest()
    try:
        from huggingface_hub import snapshot_download

        return "commit " + Path(snapshot_download(name_or_path, revision=revision, local_files_only=True)).name
    except Exception:
        return None


def read_prior_manifest(class_dir):
    """The settings that made a class folder: from its first generated image (each carries them in the PNG text
    entry PRIOR_TEXT, so the folder holds nothing but images and trainers that open every file in it as an image,
    diffusers' scripts among them, read it too), or from an older version's manifest.json. None: the user's own."""
    class_dir = Path(class_dir)
    for path in sorted(class_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png")) if class_dir.is_dir() else []:
        try:
            with Image.open(path) as image:
                text = image.text.get(PRIOR_TEXT)
        except OSError:
            continue  # list_images names a damaged image
        if text is not None:
            try:
                return json.loads(text)["settings"]
            except (ValueError, KeyError, TypeError):
                cli.fail(f"unreadable class-image settings in {path} (delete it, or use another class folder)")
    path = class_dir / PRIOR_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["settings"]
    except (ValueError, KeyError, TypeError):
        cli.fail(f"unreadable class-image manifest {path} (delete it, or use another class folder)")


def check_prior_folder(class_dir, settings, must_match):
    """Compare a class folder with the settings that made it: stop naming every field in `must_match` that differs;
    otherwise return the settings to top it up with (the folder's, so the new images belong to the same set). A
    folder of images none of which says how it was made is taken as it is (the user's own class photos)."""
    old = read_prior_manifest(class_dir)
    if old is None:
        if Path(class_dir).is_dir() and imagedata.list_images(class_dir, "class image", check=False):
            cli.note(f"{class_dir} holds no images made by generate_priors.py: its images are used as they are")
        return dict(settings)
    differ = [f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in must_match
              if old.get(k) != settings[k] and not (k == "unet_sha256" and None in (old.get(k), settings[k]))]
    if differ:
        cli.fail(f"class folder {class_dir} was made with other settings ({'; '.join(differ)}); "
             "use another folder, or make them again with generate_priors.py --overwrite")
    return {**settings, **{k: old[k] for k in PRIOR_SETTINGS if k in old and k not in ("unet_sha256",)}}


def missing_prior_indices(class_dir, num_images):
    """Indices in [0, num_images) to generate so that the folder holds `num_images` images.

    Images already there count, whatever their names (user-supplied class photos are welcome); generated images are
    named by index, so a top-up after an interrupted run makes exactly the missing ones.
    """
    class_dir = Path(class_dir)
    existing = imagedata.list_images(class_dir, "class image") if class_dir.is_dir() else []
    need = num_images - len(existing)
    if need <= 0:
        return []
    free = [i for i in range(num_images) if not (class_dir / prior_image_name(i)).exists()]
    return free[:need]


def prior_blocks(indices, batch_size, process_index=0, num_processes=1):
    """This process's share of the batches to run. Image i is always made in batch i // batch_size, whole, at the same
    position: a batched forward pass rounds differently with other neighbours, so this is what makes the files
    byte-identical for any number of processes and for a top-up."""
    blocks = sorted({i // batch_size for i in indices})
    return blocks[process_index::num_processes]


def make_prior_images(state, class_dir, missing, settings):
    """What generate_priors.py and train_dreambooth.py both do to fill a class folder: this process's share of the
    batches, each image carrying the settings and library versions that made it. `state` is accelerate's
    PartialState or Accelerator."""
    from tqdm.auto import tqdm

    if state.is_main_process:
        Path(class_dir).mkdir(parents=True, exist_ok=True)
    pipe = loading.load_pipeline(settings["pretrained_model_name_or_path"], settings["revision"], settings["variant"],
                         loading.torch_dtype(settings["precision"]), state.device, settings.get("pretrained_vae_model_name_or_path"))
    loading.set_scheduler(pipe, settings["scheduler"])
    blocks = prior_blocks(missing, settings["sample_batch_size"], state.process_index, state.num_processes)
    mine = [i for i in missing if i // settings["sample_batch_size"] in set(blocks)]
    desc = f"class images (process {state.process_index} of {state.num_processes})"
    with tqdm(total=len(mine), desc=desc, disable=not state.is_local_main_process) as bar:
        generate_prior_images(pipe, class_dir, mine, blocks, settings, progress=bar)
    state.wait_for_everyone()


def generate_prior_images(pipe, class_dir, indices, blocks, settings, progress=None):
    """Run each batch of `blocks` and write its images that are in `indices` to class_dir/i.png, each under a
    temporary name and renamed, so a killed run never leaves a truncated image with a real image's name."""
    from PIL.PngImagePlugin import PngInfo

    class_dir, batch_size, wanted = Path(class_dir), settings["sample_batch_size"], set(indices)
    class_dir.mkdir(parents=True, exist_ok=True)
    info = PngInfo()  # the same for every process and every top-up: the bytes stay a function of the settings
    info.add_text(PRIOR_TEXT, json.dumps({"settings": {k: settings.get(k) for k in PRIOR_SETTINGS},
                                          "versions": runs.library_versions()}))
    family = families.family_of(pipe)  # the scale where the family's pipeline reads it, T5's prompt length
    guidance = {**families.guidance_arguments(family, getattr(pipe, family.denoiser).config, settings["guidance_scale"],
                                              settings["negative_prompt"], batch_size),
                **families.sampling_sequence_length(family, pipe)}
    size = settings["resolution"] or settings.get("model_resolution")  # FluxPipeline's own default is 1024's
    for block in blocks:
        batch = list(range(block * batch_size, (block + 1) * batch_size))
        # CPU generators: the same initial noise on any device.
        generators = [torch.Generator("cpu").manual_seed(imagedata.image_seed(settings["seed"], i)) for i in batch]
        images = pipe(prompt=[settings["class_prompt"]] * batch_size, **guidance,
                      num_inference_steps=settings["num_inference_steps"],
                      height=size, width=size, generator=generators).images
        for i, image in zip(batch, images):
            if i in wanted:
                final = class_dir / prior_image_name(i)
                tmp = class_dir / f".{final.name}.tmp"
                image.save(tmp, format="PNG", pnginfo=info)
                os.replace(tmp, final)
                if progress is not None:
                    progress.update(1)


# ----------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    return cli.parse_args_with_config(build_parser(), argv)


def build_parser():
    p = cli.ArgumentParser(__doc__, __file__)
    cli.add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--class_prompt", default=None, help="prompt of the class, e.g. 'a photo of dog'")
    g.add_argument("--class_dir", "--class_data_dir", dest="class_dir", default=None, help="folder the images go to")
    g.add_argument("--concepts_list", default=None,
                   help="instead: train_dreambooth.py's JSON list of subjects; fills each one's class_data_dir with its "
                        "class_prompt").structured = True
    g.add_argument("--num_class_images", type=cli.COUNT, default=100, help="images the folder should hold")
    g = p.add_argument_group("sampling")
    g.add_argument("--negative_prompt", default=PRIOR_DEFAULTS["negative_prompt"], help="negative prompt")
    g.add_argument("--num_inference_steps", type=cli.COUNT, default=None,
                   help="sampling steps per image (default: 50; 28 FLUX.1 dev and SD 3.5, 4 FLUX.1 schnell)")
    g.add_argument("--guidance_scale", type=cli.NONNEGATIVE, default=None,
                   help="guidance scale (default: 7.5; FLUX.1 dev's embedded guidance 3.5, none for schnell, 7.0 SD 3.5)")
    g.add_argument("--scheduler", default=None, choices=sorted(loading.SCHEDULERS), help="sampler (default: the model's own)")
    g.add_argument("--resolution", type=cli.SIZE, default=None, help="image size (default: the model's)")
    g.add_argument("--sample_batch_size", type=cli.COUNT, default=PRIOR_DEFAULTS["sample_batch_size"],
                   help="images per forward pass, per process")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="weights dtype (default: fp16 on a GPU, else fp32)")
    g.add_argument("--seed", type=cli.NATURAL, default=0, help="image i uses a generator seeded from (seed, i)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the generated images of a folder that other settings made")
    return p


# ----------------------------------------------------------------------------------------------------------------
# The class images of a training run: train_dreambooth.py makes the missing ones with this script's code


def training_class_images(args, accelerator, subject):
    """train_dreambooth.py: a subject's class images (none without prior preservation), its folder topped up to
    --num_class_images by this script's code, sharded across processes by batch. A folder made by another model or
    prompt is refused; one that this script made is topped up with its own sampler settings, so the new images join
    the set."""
    if not args.with_prior_preservation:
        return []
    class_dir = subject["class_data_dir"]
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    model = families.read_model(args.pretrained_model_name_or_path, args.revision)
    settings = {**sampler_defaults(model),
                **{k: getattr(args, k) for k in PRIOR_SETTINGS
                   if hasattr(args, k) and k not in PRIOR_SAMPLER},  # --guidance_scale is training's
                "class_prompt": subject["class_prompt"], "precision": "fp32" if precision == "no" else precision,
                "unet_sha256": denoiser_fingerprint(args.pretrained_model_name_or_path, args.revision)}
    settings = check_prior_folder(class_dir, settings, PRIOR_SETTINGS[:5])
    missing = missing_prior_indices(class_dir, args.num_class_images)
    if missing:
        accelerator.print(f"generating {len(missing)} class images in {class_dir} ({settings['precision']})")
        make_prior_images(accelerator, class_dir, missing, settings)
        gc.collect()  # the sampling pipeline is gone: give its memory back before the models load
        torch.cuda.empty_cache()  # a no-op without CUDA
    paths = imagedata.list_images(class_dir, "class image", check=False)[: args.num_class_images]
    if not paths:
        cli.fail(f"no images in class folder {class_dir}")
    return paths


def main(argv=None):
    args = parse_args(argv)
    # ---- check the input before anything loads
    if args.concepts_list and (args.class_prompt or args.class_dir):
        cli.fail("--concepts_list names each subject's class_prompt and class_data_dir: leave out --class_prompt/--class_dir")
    if not args.concepts_list and not (args.class_prompt and args.class_dir):
        cli.fail("give --class_prompt (e.g. 'a photo of dog') and --class_dir, or --concepts_list")
    if not args.concepts_list and not args.class_prompt.strip():
        cli.fail("--class_prompt is empty (e.g. 'a photo of dog')")
    subjects = imagedata.read_concepts(args.concepts_list, True) if args.concepts_list else [
        {"class_prompt": args.class_prompt, "class_data_dir": args.class_dir}]
    for subject in subjects:
        cli.check_writable(Path(subject["class_data_dir"]), "class folder")
    args.pretrained_model_name_or_path = loading.check_model_source(args.pretrained_model_name_or_path, args.revision,
                                                               args.single_file_config)
    cli.check_launch()
    model = families.read_model(args.pretrained_model_name_or_path, args.revision)
    for key, value in sampler_defaults(model).items():
        if key in PRIOR_SAMPLER and getattr(args, key) is None:
            setattr(args, key, value)
    loading.check_sampler(args.scheduler, model.family)

    state = cli.partial_state()
    precision = args.mixed_precision or ("fp16" if state.device.type == "cuda" else "fp32")
    unet_sha256 = denoiser_fingerprint(args.pretrained_model_name_or_path, args.revision)
    folders = []  # (class folder, settings), every folder checked before any image is made
    for subject in subjects:
        class_dir = Path(subject["class_data_dir"])
        settings = {**{k: v for k, v in vars(args).items() if k in PRIOR_SETTINGS}, "precision": precision,
                    "class_prompt": subject["class_prompt"], "unet_sha256": unet_sha256,
                    "model_resolution": model.resolution}  # not recorded: the size when --resolution is not given
        if not args.overwrite:  # the batch size changes rounding, not the images: a top-up keeps the folder's own
            settings = check_prior_folder(class_dir, settings, [k for k in PRIOR_SETTINGS if k != "sample_batch_size"])
        folders.append((class_dir, settings))
    for class_dir, settings in folders:
        if args.overwrite:
            old = read_prior_manifest(class_dir)
            if old and any(old.get(k) != settings[k] for k in PRIOR_SETTINGS) and state.is_main_process:
                for image in class_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):  # ours; the user's images stay
                    image.unlink()
                (class_dir / PRIOR_MANIFEST).unlink(missing_ok=True)  # an older version's record of them
            state.wait_for_everyone()
        missing = missing_prior_indices(class_dir, args.num_class_images)
        if not missing:
            state.print(f"{class_dir} already holds {args.num_class_images} class images; nothing to do")
            continue
        # ---- this process's share of the batches, each image with the settings that made it
        make_prior_images(state, class_dir, missing, settings)
        state.print(f"made {len(missing)} class images; {class_dir} now holds {args.num_class_images}")


if __name__ == "__main__":
    cli.run(main)
