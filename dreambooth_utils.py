"""What two or more of the scripts share: input checks, image listing, model loading, class-prior generation and
the record each run leaves. The training loop is not here: it lives in train_dreambooth.py."""

import argparse
import difflib
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTENSION = ".txt"
QUIET_EXTENSIONS = {CAPTION_EXTENSION, ".json"}  # captions and manifests sit beside images; skip them silently
# Flags whose value is a credential. The rule for every script: a secret is used, never recorded. Its value is
# redacted in sys.argv as soon as the flags are parsed (so trackers that record the command line, such as W&B, never
# see it), and in every run record (run_config.json, checkpoints, the trackers' config). Add any new credential here.
SECRET_FLAGS = frozenset({"hub_token"})
REDACTED = "***"
# Library warnings about things the suite never uses: transformers' image processors (they want torchvision) and
# bitsandbytes' 4-bit CPU kernels. Dropped by a filter on their loggers; every other warning stays.
IRRELEVANT_WARNINGS = {"transformers.utils.import_utils": "requires torchvision (not installed)",
                       "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward"}
for _logger, _text in IRRELEVANT_WARNINGS.items():
    logging.getLogger(_logger).addFilter(lambda record, text=_text: text not in record.getMessage())
warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")  # diffusers' call


# ----------------------------------------------------------------------------------------------------------------
# Errors the user can fix: one line, non-zero exit, no traceback


def fail(message):
    """Stop with one line that names the problem. SystemExit prints it to stderr and exits 1, without a traceback."""
    raise SystemExit(f"error: {message}")


def note(message):
    print(f"note: {message}", file=sys.stderr)


def first_line(error, limit=300):
    """The first telling line of an exception's message (library errors run to several, and some open with a bare
    "Error(s) in ...:"), cut to `limit` characters, or the exception's type when it has no message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    line = next((line for line in lines if not line.endswith(":")), lines[0] if lines else error.__class__.__name__)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def check_writable(path, what):
    """Fail now, before any model loads, when `path` (a folder, existing or not) cannot be written: a file in its
    place, or no permission. The probe is a temporary folder in its nearest existing ancestor, removed at once."""
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        fail(f"{what} is a file, not a folder: {path}")
    ancestor = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not ancestor.is_dir():
        fail(f"{what} {path} is inside a file: {ancestor}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-test-"))
    except OSError as e:
        fail(f"cannot write {what} {path}: {e.strerror} ({ancestor})")


def run(main):
    """Call a script's main(); a full disk (or quota) ends in one line, not a traceback: what was being written is a
    temporary file or folder, so nothing is left that looks complete."""
    import errno

    try:
        main()
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        fail(f"no space left on the device while writing {e.filename or 'the results'}: free some space and run again")


# ----------------------------------------------------------------------------------------------------------------
# Images on disk


def load_image(path):
    """An RGB image the right way up: phone photos store their rotation in EXIF, which PIL ignores unless asked."""
    with Image.open(path) as img:
        return to_rgb(ImageOps.exif_transpose(img), path)


def to_rgb(image, name):
    """8-bit RGB. Deeper images are scaled, not clipped (a 16-bit PNG would train as white, a float TIFF as black);
    transparent pixels are composited on white (PIL's convert would make them black)."""
    import numpy as np

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        top = next((t for t in ((1.0,) if image.mode == "F" else ()) + (255.0, 65535.0) if high <= t), None)
        if low < 0 or top is None:
            fail(f"cannot read image {name}: its {image.mode} values run from {low:g} to {high:g}, no range an image "
                 "has (save it as 8- or 16-bit)")
        image = Image.fromarray(np.round(values / top * 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        white.alpha_composite(image.convert("RGBA"))
        return white.convert("RGB")
    return image.convert("RGB")


def has_transparency(image):
    return image.mode in ("RGBA", "LA", "PA", "P") and image.convert("RGBA").getchannel("A").getextrema()[0] < 255


def list_images(folder, what, check=True):
    """The image files in `folder`, sorted by name so the order is the same on every filesystem.

    Non-image files are skipped with a note (caption sidecars and hidden files silently). With `check`, every image
    is decoded once, so a corrupt or truncated file is named now rather than failing a worker mid-run.
    """
    folder = Path(folder)
    if not folder.exists():
        fail(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        fail(f"{what} folder is not a folder: {folder}")
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() in QUIET_EXTENSIONS or path.is_dir() or is_mask(path):
            continue
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(path)
    if skipped:
        note(f"skipping {len(skipped)} non-image file(s) in {folder}: {', '.join(p.name for p in skipped[:5])}")
    if check:
        transparent = []
        for path in images:
            try:
                with Image.open(path) as img:
                    img.load()
                    to_rgb(img, path)
                    transparent += [path.name] if has_transparency(img) else []
            except SystemExit:
                raise
            except Exception as e:  # PIL raises several types for bad files; all mean the same thing here
                fail(f"cannot read image {path}: {e}")
        if transparent:
            note(f"{len(transparent)} image(s) in {folder} have transparent pixels, which train as white: "
                 f"{', '.join(transparent[:5])}")
    return images


MASK_SUFFIX = ".mask"  # photo.mask.png beside photo.jpg: the subject's mask (train_dreambooth.py), not a photo


def is_mask(path):
    return Path(path).stem.lower().endswith(MASK_SUFFIX) and Path(path).suffix.lower() in IMAGE_EXTENSIONS


def find_mask(photo):
    """photo.mask.png (or .jpg, ...) beside photo.jpg, or None; checked now, so a bad one is named before a model loads."""
    masks = [photo.with_name(photo.stem + MASK_SUFFIX + ext) for ext in sorted(IMAGE_EXTENSIONS)]
    mask = next((m for m in masks if m.is_file()), None)
    if mask:
        load_mask(mask, load_image(photo).size)
    return mask


def load_mask(path, size):
    """A mask as an 8-bit grey image of `size` (its photo's: the mask may have another size, not another shape)."""
    try:
        with Image.open(path) as image:
            mask = ImageOps.exif_transpose(image)
            mask.load()
    except Exception as e:  # PIL raises several types for bad files
        fail(f"cannot read mask {path}: {e}")
    if mask.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        fail(f"mask {path} is a {mask.mode} image: a mask is black and white (white = the subject), 8-bit grey or RGB")
    import numpy as np

    rgba = np.asarray(mask.convert("RGBA"))
    if rgba[..., 3].min() < 255 or (rgba[..., :3] != rgba[..., :1]).any():
        fail(f"mask {path} has {'transparent' if rgba[..., 3].min() < 255 else 'coloured'} pixels: a mask is black "
             "and white (white = the subject), grey at soft edges")
    (w, h), (pw, ph) = mask.size, size
    if abs(w * ph - h * pw) > 0.02 * max(w * ph, h * pw):
        fail(f"mask {path} is {w}x{h} and its photo {pw}x{ph}: a mask has its photo's shape (at any size)")
    if rgba[..., 0].max() < 128:
        fail(f"mask {path} has no white pixels: white marks the subject")
    return mask.convert("L").resize(size, Image.BILINEAR)


def read_dataset(name, config_name, image_column, caption_column, default_prompt):
    """A `datasets` dataset (hub id or local imagefolder) as (RGB image, caption or default_prompt, None) triples."""
    try:
        import datasets

        ds = datasets.load_dataset(name, config_name, split="train")
    except Exception as e:
        fail(f"cannot load dataset {name}: {first_line(e)}")
    for column in (image_column, caption_column):
        if column and column not in ds.column_names:
            fail(f"dataset {name} has no column '{column}' (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        fail(f"dataset {name} has no rows")
    examples = []
    for i in range(len(ds)):
        try:
            image = to_rgb(ds[i][image_column], f"{name}[{i}]")
        except Exception as e:
            fail(f"cannot read image {i} of dataset {name}: {e}")
        caption = ds[i][caption_column] if caption_column else None
        examples.append((image, caption or default_prompt, None))
    return examples


CONCEPT_KEYS = ("instance_prompt", "instance_data_dir", "class_prompt", "class_data_dir")


def read_concepts(value, with_class):
    """--concepts_list: a JSON file (or, in a --config YAML, the list itself) of subjects, each
    {instance_prompt, instance_data_dir, class_prompt, class_data_dir} as ShivamShrirao's fork reads it, plus an
    optional validation_prompt (text or list). Returns the list with validation_prompt always a list; the class keys
    are required `with_class` (prior preservation)."""
    where = "--concepts_list" if isinstance(value, list) else f"--concepts_list {value}"
    if not isinstance(value, list):
        try:
            value = json.loads(Path(value).read_text(encoding="utf-8"))
        except OSError as e:
            fail(f"cannot read {where}: {e.strerror}")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            fail(f"{where} is not JSON: {e}")
    if not isinstance(value, list) or not value:
        fail(f"{where} must be a non-empty list of subjects ({{{', '.join(CONCEPT_KEYS)}}}), not {type(value).__name__}"
             + (" (empty)" if isinstance(value, list) else ""))
    subjects = []
    for i, concept in enumerate(value):
        if not isinstance(concept, dict):
            fail(f"{where}: subject {i} is a {type(concept).__name__}, not a mapping of {', '.join(CONCEPT_KEYS)}")
        unknown = sorted(set(concept) - set(CONCEPT_KEYS) - {"validation_prompt"})
        needed = CONCEPT_KEYS if with_class else CONCEPT_KEYS[:2]
        missing = [k for k in needed if not isinstance(concept.get(k), str) or not concept[k].strip()]
        if unknown or missing:
            fail(f"{where}: subject {i} " + (f"has unknown key(s) {', '.join(map(str, unknown))}" if unknown else
                                          f"needs {', '.join(missing)}" + (" (prior preservation is on)" if with_class else "")))
        validation = concept.get("validation_prompt") or []
        validation = [validation] if isinstance(validation, str) else validation
        if not isinstance(validation, list) or not all(isinstance(v, str) for v in validation):
            fail(f"{where}: subject {i}'s validation_prompt must be text or a list of texts")
        subjects.append({**{k: concept.get(k) for k in CONCEPT_KEYS}, "validation_prompt": validation})
    prompts = {}  # a class folder holds one class's images
    for s in subjects if with_class else []:
        first = prompts.setdefault(os.path.normpath(s["class_data_dir"]), s["class_prompt"])
        if first != s["class_prompt"]:
            fail(f"{where}: class folder {s['class_data_dir']} is given two class prompts ('{first}' and "
                 f"'{s['class_prompt']}'): one folder per class")
    return subjects


def read_caption(image_path, default):
    """The caption in `photo.txt` beside `photo.jpg`, if there is one, replaces the default prompt."""
    sidecar = Path(image_path).with_suffix(CAPTION_EXTENSION)
    if sidecar.is_file():
        try:
            text = sidecar.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read caption {sidecar}: {e.reason if isinstance(e, UnicodeDecodeError) else e.strerror} "
                 "(captions are UTF-8 text)")
        if text:
            return text
    return default


# ----------------------------------------------------------------------------------------------------------------
# Models

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline():
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


@dataclass(frozen=True)
class Family:
    """What differs between the model families for loading and saving, chosen once from the model itself."""
    name: str
    pipeline: str  # the diffusers pipeline class
    text_encoders: tuple  # (subfolder, transformers class) of each text encoder, in the order prompts go through them
    tokenizers: tuple  # the subfolders of their tokenizers
    pipeline_kwargs: tuple  # (name, value) pairs from_pretrained needs so that nothing else loads
    upcast_vae: bool  # the pipeline decodes in fp32 when the VAE's config says force_upcast (SDXL's overflows in fp16)
    embedding_keys: tuple  # a token-embeddings file's key per text encoder, as AUTOMATIC1111 and ComfyUI read it
    kohya_prefixes: tuple  # (model, prefix) of a kohya-format LoRA file's keys, as kohya's sd-scripts name them

    @property
    def components(self):
        return ("unet", "vae", "scheduler", *(name for name, _ in self.text_encoders), *self.tokenizers)

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


SD = Family("sd", "StableDiffusionPipeline", (("text_encoder", "CLIPTextModel"),), ("tokenizer",),
            (("safety_checker", None), ("feature_extractor", None), ("requires_safety_checker", False)), False,
            ("emb_params",), (("unet", "lora_unet"), ("text_encoder", "lora_te")))
# SDXL: two text encoders (the second with a projection: its pooled output conditions the UNet too). No invisible
# watermark: the same seed gives the same bytes whether or not the invisible-watermark package is installed.
SDXL = Family("sdxl", "StableDiffusionXLPipeline",
              (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection")),
              ("tokenizer", "tokenizer_2"), (("add_watermarker", False),), True, ("clip_l", "clip_g"),
              (("unet", "lora_unet"), ("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")))
FAMILIES = {family.name: family for family in (SD, SDXL)}


def read_model(name_or_path, revision=None):
    """(family, native resolution) from the model's own UNet and VAE configs, before any weights load. SDXL's UNet takes
    the pooled text embedding and the size/crop time ids (addition_embed_type "text_time"); the native resolution is
    the UNet's sample size times the VAE's downsampling (512 SD 1.5, 768 SD 2.x, 1024 SDXL)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.load_config(name_or_path, subfolder="unet", revision=revision)
        vae = AutoencoderKL.load_config(name_or_path, subfolder="vae", revision=revision)
    except (OSError, ValueError) as e:
        load_error("the model config", name_or_path, e)
    family = SDXL if unet.get("addition_embed_type") == "text_time" else SD
    return family, unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


def check_model_source(name_or_path, revision=None, single_file_config=None):
    """Fail early, before anything loads, when a local model folder is missing or lacks a component of its family.
    Returns the model as the run records it: a local folder as an absolute path (a record then works from any
    directory), a string shaped like a hub id ("org/name") as it is, left to `from_pretrained`; a single .safetensors
    file (the web UIs' kind) as the diffusers folder it was converted to.
    """
    path = Path(os.path.expanduser(name_or_path))
    if path.is_file() and path.suffix == ".safetensors":
        return single_file_folder(path, single_file_config)
    if path.is_dir():
        if not (path / "unet").is_dir():
            fail(f"model folder {path} has no unet subfolder: is it a diffusers pipeline folder?")
        missing = [c for c in read_model(str(path))[0].components if not (path / c).is_dir()]
        if missing:
            fail(f"model folder {path} has no {', '.join(missing)} subfolder: is it a diffusers pipeline folder?")
        return str(path.resolve())
    if path.exists():
        fail(f"model path is a file, not a diffusers pipeline folder or a .safetensors single file: {path}")
    # "org/name" could be a hub id; a path that starts like one, or whose first part is a folder here, is a typo
    if name_or_path.startswith((".", "/", "~")) or Path(name_or_path.split("/")[0]).is_dir():
        fail(f"model folder not found: {name_or_path}")
    if not HUB_ID.match(name_or_path):
        fail(f"model not found: {name_or_path} (neither a local folder nor a hub id like 'org/name')")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, "model_index.json", revision=revision), str):
        return name_or_path  # in the cache: the library falls back to it if the Hub cannot be reached
    if hub_offline():
        fail(f"{name_or_path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it once "
             "with the network on, or give a local folder")
    if not hub_reachable():  # at once, instead of the library's retries (about 30 s) and a long message
        fail(f"cannot reach the Hugging Face Hub to download {name_or_path}: check the network, or give a local folder")
    return name_or_path


def hub_reachable(timeout=5):
    """A TCP connection to the Hub's host (skipped behind a proxy, which only the HTTP client knows how to use)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def load_error(what, name_or_path, error):
    """One line for a failure to find or download a model: when the Hub could not be reached, say so and how to work
    offline instead of the library's long message."""
    text = f"{error!r} {error.__cause__!r} {error.__context__!r}".lower()
    if not hub_offline() and not Path(name_or_path).is_dir() and any(
            k in text for k in ("connect", "timeout", "timed out", "name resolution", "network", "offline")):
        fail(f"cannot reach the Hugging Face Hub to load {what} {name_or_path}: check the network, or work offline "
             "with HF_HUB_OFFLINE=1 (models already in the cache) or a local folder")
    fail(f"cannot load {what} from {name_or_path}: {first_line(error)}")


def single_file_folder(path, config=None):
    """A single-file checkpoint as a diffusers pipeline folder: converted once by diffusers' from_single_file and kept
    in the Hugging Face cache (keyed by the file's path, size and time, and the config). `config` is a diffusers
    folder or hub id with the component configs (default: diffusers picks one for the file's architecture on the Hub)."""
    from huggingface_hub import constants
    from safetensors import safe_open

    path, stat = Path(path).resolve(), Path(path).stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{config}".encode()).hexdigest()[:16]
    folder = Path(constants.HF_HOME, "dreambooth-single-file", f"{path.stem}-{key}")
    if (folder / "model_index.json").is_file():
        return str(folder)
    try:
        with safe_open(path, "pt") as f:
            family = SDXL if any(k.startswith("conditioner.embedders.1.") for k in f.keys()) else SD
    except Exception as e:
        fail(f"cannot read the single-file model {path}: {first_line(e)}")
    note(f"converting {path.name} ({family.pipeline}) to diffusers' layout once, into {folder}")
    try:
        pipe = family.pipeline_class().from_single_file(str(path), config=config, **dict(family.pipeline_kwargs))
    except Exception as e:  # most often: no config at hand offline
        fail(f"cannot convert the single-file model {path}: {first_line(e)} (--single_file_config takes a diffusers "
             "folder or hub id of the same architecture)")
    tmp = folder.with_name(folder.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, folder)
    return str(folder)


def from_pretrained(cls, name_or_path, **kwargs):
    """`cls.from_pretrained` with a failure to find or download the model turned into one line."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        load_error(cls.__name__, name_or_path, e)


def load_vae(name_or_path, vae_path=None, revision=None, variant=None, dtype=torch.float32, upcast=False):
    """The model's own VAE, or a separate one (--pretrained_vae_model_name_or_path: a folder or hub id of an
    AutoencoderKL, e.g. an fp16-safe SDXL VAE), in `dtype`; in fp32 when `upcast` and the VAE's config says
    force_upcast, as StableDiffusionXLPipeline decodes (SDXL's own VAE overflows in fp16)."""
    from diffusers import AutoencoderKL

    source, kw = (vae_path, {}) if vae_path else (name_or_path, dict(subfolder="vae", revision=revision))
    try:
        if upcast and AutoencoderKL.load_config(source, **kw).get("force_upcast", True):
            dtype = torch.float32
    except (OSError, ValueError) as e:
        fail(f"cannot read the VAE config of {source}: {first_line(e)}")
    return from_pretrained(AutoencoderKL, source, dtype=dtype, **kw, **({} if vae_path else dict(variant=variant)))


def torch_dtype(precision):
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def check_xformers():
    """xformers only helps on CUDA; when its kernels cannot run, say so instead of silently using another kernel."""
    if not torch.cuda.is_available():
        fail("--enable_xformers_memory_efficient_attention needs a CUDA GPU and none is visible "
             "(drop the flag: PyTorch's SDPA attention is used by default)")
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:
        fail(f"--enable_xformers_memory_efficient_attention: xformers does not import here ({e})")


def enable_xformers(model):
    try:
        model.enable_xformers_memory_efficient_attention()
    except Exception as e:  # diffusers runs a test kernel: a build that does not match this torch/GPU fails here
        fail(f"--enable_xformers_memory_efficient_attention: xformers cannot run on this setup ({e})")


def load_pipeline(name_or_path, revision=None, variant=None, dtype=torch.float32, device="cpu", vae_path=None, **components):
    """The model's pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) for sampling: safety checker and
    watermark off, no progress bar. Components given as keywords (in-memory models) are used as they are, not loaded,
    and device None leaves every component where it is."""
    family = read_model(name_or_path, revision)[0]
    if vae_path and "vae" not in components:
        components["vae"] = load_vae(name_or_path, vae_path, revision, dtype=dtype)
    pipe = from_pretrained(family.pipeline_class(), name_or_path, revision=revision, variant=variant, dtype=dtype,
                           **dict(family.pipeline_kwargs), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


# Samplers by their usual short names, each built from the model's own scheduler config so that its betas and
# prediction type (epsilon or v) carry over.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name, config):
    import diffusers

    cls_name, kwargs = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **kwargs)


def set_scheduler(pipe, name):
    if name is not None:
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)


def number(kind, low=None, high=None, above=None, below=None, multiple_of=None):
    """An argparse type for a number in a range, declared with its flag: the command line and --config go through
    it alike, so a value out of range is one line before anything loads."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        for bad, says in ((value != value or value in (float("inf"), float("-inf")), "a finite number"),
                          (low is not None and value < low, f"at least {low}"),
                          (above is not None and value <= above, f"more than {above}"),
                          (high is not None and value > high, f"at most {high}"),
                          (below is not None and value >= below, f"less than {below}"),
                          (multiple_of and value % multiple_of, f"a multiple of {multiple_of}")):
            if bad:
                raise argparse.ArgumentTypeError(f"must be {says}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def boolean(text):
    """An argparse type for an on/off setting whose default is on (diffusers' --prodigy_decouple True)."""
    if str(text).lower() in ("true", "1", "yes", "on"):
        return True
    if str(text).lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# The ranges the scripts' numeric flags use
COUNT = number(int, low=1)  # steps, images, batch sizes
NATURAL = number(int, low=0)
POSITIVE = number(float, above=0)
NONNEGATIVE = number(float, low=0)
FRACTION = number(float, low=0, below=1)  # Adam's betas, dropout
SIZE = number(int, low=8, multiple_of=8)  # pixels: the VAE downsamples by 8
SEED = number(int, low=0, high=2**32 - 1025)  # numpy's limit, less room for a seed per process


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not for switches and unset values, nor where the help text already says its default."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistake in one line: the error, a close match for a mistyped flag, and a pointer to --help
    instead of the whole usage."""

    def __init__(self, doc, script):
        super().__init__(prog=os.path.basename(script), description=doc.split("\n\n")[0], formatter_class=HelpFormatter)

    def error(self, message):
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        unknown = message.split("unrecognized arguments: ")[-1].split() if "unrecognized arguments" in message else []
        hints = [f"did you mean {close[0]}?" for arg in unknown if arg.startswith("--")
                 for close in [difflib.get_close_matches(arg.split("=")[0], options, n=1)] if close]
        self.exit(2, f"error: {message}{' (' + '; '.join(hints) + ')' if hints else ''}; see {self.prog} --help\n")


def parse_args_with_config(parser, argv=None):
    """parser.parse_args with `--config run.yaml`: the file's keys (flag names without the dashes) become defaults,
    flags on the command line override them (a repeatable flag given on the command line replaces the file's list),
    and a key that is no flag is an error that names it."""
    parser.add_argument("--config", default=None, help="YAML file of flag values; flags on the command line override it")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    path = pre.parse_known_args(argv)[0].config
    if not path:
        return hide_secrets(parser.parse_args(argv), argv)
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"cannot read config file {path}: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        fail(f"config file {path} is not a mapping of flag names to values")
    actions = {opt.lstrip("-"): a for a in parser._actions for opt in a.option_strings if opt.startswith("--")}
    unknown = [str(k) for k in values if str(k).replace("-", "_") not in actions or k in ("help", "config")]
    if unknown:
        fail(f"config file {path} has unknown key(s): {', '.join(unknown)} (keys are flag names without the dashes)")
    defaults, lists = {}, {}
    for key, value in values.items():
        action = actions[key.replace("-", "_")]
        try:
            if action.nargs == 0:  # a switch such as --train_text_encoder
                if not isinstance(value, bool):
                    raise ValueError("expected true or false")
            elif getattr(action, "structured", False) and isinstance(value, list):
                pass  # --concepts_list: here the data itself (a path on the command line), checked by its reader
            elif value is not None:  # each value goes through the flag's own type, as its text would on the command line
                many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
                items = value if isinstance(value, list) and many else [value]
                for v in items:
                    if isinstance(v, (list, dict)) or not (action.type or isinstance(v, str)):
                        raise ValueError("expected text" if not action.type else "expected one value")
                items = [action.type(str(v)) if action.type else v for v in items]
                for v in items:
                    if action.choices and v not in action.choices:
                        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
                value = items if many else items[0]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            fail(f"config file {path}: bad value {value!r} for {key}: {e}")
        if isinstance(action, argparse._AppendAction):
            lists[action.dest] = value
        action.required = False
        defaults[action.dest] = value
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    for dest, from_file in lists.items():  # argparse appends command-line values to a list default: keep only those
        if len(getattr(args, dest)) > len(from_file):
            setattr(args, dest, getattr(args, dest)[len(from_file):])
    return hide_secrets(args, argv)


def redact_argv(argv):
    """The command line with the value of every SECRET_FLAGS flag replaced by REDACTED, in any spelling argparse
    accepts: `--hub_token X`, `--hub_token=X` and abbreviations such as `--hub_tok X`."""
    def secret(option):
        return len(option) > 2 and any(f"--{name}".startswith(option) for name in SECRET_FLAGS)

    out, hide_next = [], False
    for arg in argv:
        option, eq, _ = arg.partition("=")
        out.append(REDACTED if hide_next else f"{option}={REDACTED}" if eq and secret(option) else arg)
        hide_next = not hide_next and not eq and secret(arg)
    return out


def hide_secrets(args, argv=None):
    """After parsing: take secrets given on the command line out of sys.argv (W&B, for one, records sys.argv), with a
    note that the shell history still has them."""
    given = [name for name in SECRET_FLAGS if getattr(args, name, None)]
    if given and argv is None and redact_argv(sys.argv) != sys.argv:
        sys.argv[:] = redact_argv(sys.argv)
        if os.environ.get("RANK", "0") == "0":
            note(f"--{given[0]} on the command line stays in your shell history: prefer `hf auth login` or the "
                 "HF_TOKEN environment variable (this run never writes the token)")
    return args


def redact(config):
    """A copy of a config dict with the values of SECRET_FLAGS replaced by REDACTED."""
    return {k: REDACTED if k in SECRET_FLAGS and v else v for k, v in config.items()}


def add_model_args(parser, model_help="hub id or local diffusers pipeline folder of the base model, or one .safetensors "
                                      "file in the web UIs' layout"):
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", "--model", required=True, help=model_help)
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the model")
    group.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16")
    group.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="a separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16")
    group.add_argument("--single_file_config", default=None,
                       help="for a model given as one .safetensors file: a diffusers folder or hub id with its configs")
    return group


# LoRA through peft: the attention projections of the UNet and of the CLIP text encoder, as diffusers' LoRA scripts
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
EMBEDDINGS = "{name}_emb.safetensors"  # pivotal tuning's tokens, named after the run as diffusers' advanced script does
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name: load_lora_weights(folder) finds it


# Text-encoder weights in files keep the names the ecosystem reads: transformers 4's CLIP layout ("text_model.encoder.
# layers.N..."), which diffusers' LoRA files, kohya's and every web UI's key map use. important! transformers 5's
# CLIPTextModel dropped its `text_model` level (CLIPTextModelWithProjection kept it): written with the module's own
# names, ComfyUI drops every first-text-encoder layer of a LoRA without an error, only "lora key not loaded" lines.
CLIP_LEVEL = "text_model."


def file_keys(state, encoder_class):
    """A text encoder's state (keys relative to the encoder) under the files' names, whichever transformers built it."""
    if not encoder_class.startswith("CLIPText"):
        return state
    return {k if k.startswith((CLIP_LEVEL, "text_projection.")) else CLIP_LEVEL + k: v for k, v in state.items()}


def module_keys(state, module):
    """The files' names of a text encoder's state (or a file of an older version, without the level) -> the names of
    `module` as the installed transformers builds it."""
    state = file_keys(state, type(module).__name__)
    if not type(module).__name__.startswith("CLIPText") or hasattr(module, "text_model"):
        return state
    return {k.removeprefix(CLIP_LEVEL): v for k, v in state.items()}


def pivot_prompt(prompt, word, tokens):
    """Pivotal tuning: the identifier in a prompt replaced by the run's new tokens ("a photo of sks dog" -> "a photo
    of <s0><s1> dog")."""
    return re.sub(rf"\b{re.escape(word)}\b", "".join(tokens), prompt)


def load_token_embeddings(pipe, path, family, tokens):
    """A pivotal-tuning embeddings file into a pipeline: each text encoder's rows under the run's tokens, through
    diffusers' load_textual_inversion (the file is in the web UIs' format: one key per text encoder)."""
    from safetensors.torch import load_file

    state = load_file(path)
    for key, (encoder, _), tokenizer in zip(family.embedding_keys, family.text_encoders, family.tokenizers):
        pipe.load_textual_inversion(state[key], token=list(tokens), text_encoder=getattr(pipe, encoder),
                                    tokenizer=getattr(pipe, tokenizer))


def add_lora(model, config, targets):
    """Inject LoRA adapters (the run config's rank, alpha, dropout, DoRA) into a diffusers or transformers model."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=config["lora_rank"], lora_alpha=config["lora_alpha"] or config["lora_rank"],
                                 lora_dropout=config["lora_dropout"], init_lora_weights="gaussian",
                                 use_dora=bool(config.get("use_dora")), target_modules=targets))


# ----------------------------------------------------------------------------------------------------------------
# Class-prior images (used by generate_priors.py, and by train_dreambooth.py when the class folder is short)


def require(module, flag):
    """One line with the pip command when an optional package that a flag needs is not installed."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        fail(f"{flag} needs {module}: pip install {module}")


def check_wandb(flag):
    """wandb installed, and no login prompt ahead: offline mode, or a key in WANDB_API_KEY or ~/.netrc (`wandb login`)
    (W&B would otherwise stop the run to ask for one)."""
    require("wandb", flag)
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    from requests.utils import get_netrc_auth

    if get_netrc_auth(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")) is None:
        fail("--report_to wandb needs a W&B login: run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline")


def check_launch():
    """One line instead of a CUDA traceback or a silent mistake when the launch cannot work as asked."""
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    from accelerate.utils import parse_flag_from_env

    if processes_here > 1 and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        gpus = torch.cuda.device_count()
        if gpus == 0:  # accelerate would run each process alone, every one writing the same files
            fail(f"{processes_here} processes were launched on a machine without GPUs: "
                 "add --cpu to `accelerate launch` (or ACCELERATE_USE_CPU=true) to train on CPU processes")
        if processes_here > gpus:
            fail(f"the launch asks for {processes_here} processes on this machine, which has {gpus} GPU(s): "
                 "lower --num_processes (or num_processes in the accelerate config)")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            fail("the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed")


def check_deepspeed(accelerator, use_8bit_adam):
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed and use_8bit_adam and deepspeed.deepspeed_config.get("zero_optimization", {}).get(
            "offload_optimizer", {}).get("device", "none") != "none":
        fail("--use_8bit_adam does not combine with DeepSpeed's optimizer offload (DeepSpeed replaces the optimizer "
             "with its own CPU Adam): leave --use_8bit_adam out")


def partial_state():
    """accelerate's PartialState, honouring ACCELERATE_USE_CPU as Accelerator does (PartialState alone does not, and
    processes launched on a machine without GPUs would then each run alone)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def grid(images, columns=4):
    """One sheet of same-sized images, `columns` to a row (infer.py --grid, training's validation images)."""
    columns = min(columns, len(images))
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, math.ceil(len(images) / columns) * h))
    for k, image in enumerate(images):
        sheet.paste(image, ((k % columns) * w, (k // columns) * h))
    return sheet


def image_seed(seed, index):
    """The seed of image `index`: a function of (seed, index) alone, so the set does not depend on how many processes
    share the work."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


PRIOR_MANIFEST = "manifest.json"  # where versions before 2026-11-28 recorded a class folder's settings
PRIOR_TEXT = "dreambooth_prior"  # the PNG text entry of each generated class image: the settings that made it
# What makes a set of class images: the same values give the same bytes. The first five name the model and prompt.
PRIOR_SETTINGS = ("pretrained_model_name_or_path", "revision", "variant", "unet_sha256", "class_prompt",
                  "negative_prompt", "scheduler", "num_inference_steps", "guidance_scale", "resolution", "seed",
                  "precision", "sample_batch_size", "pretrained_vae_model_name_or_path")
# generate_priors.py's defaults, which train_dreambooth.py uses when it fills a class folder itself
PRIOR_DEFAULTS = {"negative_prompt": None, "scheduler": None, "num_inference_steps": 50, "guidance_scale": 7.5,
                  "sample_batch_size": 4}


def prior_image_name(index):
    return f"{index:06d}.png"


def unet_fingerprint(name_or_path, revision=None):
    """sha256 of a local model's UNet weight files, or the commit of a hub model's cached snapshot (None if it is not
    cached yet): a folder of class images made by another model, even one under the same path, is then told apart."""
    path = Path(name_or_path)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted((path / "unet").iterdir()):
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
                fail(f"unreadable class-image settings in {path} (delete it, or use another class folder)")
    path = class_dir / PRIOR_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["settings"]
    except (ValueError, KeyError, TypeError):
        fail(f"unreadable class-image manifest {path} (delete it, or use another class folder)")


def check_prior_folder(class_dir, settings, must_match):
    """Compare a class folder with the settings that made it: stop naming every field in `must_match` that differs;
    otherwise return the settings to top it up with (the folder's, so the new images belong to the same set). A
    folder of images none of which says how it was made is taken as it is (the user's own class photos)."""
    old = read_prior_manifest(class_dir)
    if old is None:
        if Path(class_dir).is_dir() and list_images(class_dir, "class image", check=False):
            note(f"{class_dir} holds no images made by generate_priors.py: its images are used as they are")
        return dict(settings)
    differ = [f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in must_match
              if old.get(k) != settings[k] and not (k == "unet_sha256" and None in (old.get(k), settings[k]))]
    if differ:
        fail(f"class folder {class_dir} was made with other settings ({'; '.join(differ)}); "
             "use another folder, or pass --overwrite to generate generate_priors.py's images again")
    return {**settings, **{k: old[k] for k in PRIOR_SETTINGS if k in old and k not in ("unet_sha256",)}}


def missing_prior_indices(class_dir, num_images):
    """Indices in [0, num_images) to generate so that the folder holds `num_images` images.

    Images already there count, whatever their names (user-supplied class photos are welcome); generated images are
    named by index, so a top-up after an interrupted run makes exactly the missing ones.
    """
    class_dir = Path(class_dir)
    existing = list_images(class_dir, "class image") if class_dir.is_dir() else []
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
    pipe = load_pipeline(settings["pretrained_model_name_or_path"], settings["revision"], settings["variant"],
                         torch_dtype(settings["precision"]), state.device, settings.get("pretrained_vae_model_name_or_path"))
    set_scheduler(pipe, settings["scheduler"])
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
                                          "versions": library_versions()}))
    negative = settings["negative_prompt"]
    for block in blocks:
        batch = list(range(block * batch_size, (block + 1) * batch_size))
        # CPU generators: the same initial noise on any device.
        generators = [torch.Generator("cpu").manual_seed(image_seed(settings["seed"], i)) for i in batch]
        images = pipe([settings["class_prompt"]] * batch_size, negative_prompt=[negative] * batch_size if negative else None,
                      num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                      height=settings["resolution"], width=settings["resolution"], generator=generators).images
        for i, image in zip(batch, images):
            if i in wanted:
                final = class_dir / prior_image_name(i)
                tmp = class_dir / f".{final.name}.tmp"
                image.save(tmp, format="PNG", pnginfo=info)
                os.replace(tmp, final)
                if progress is not None:
                    progress.update(1)


# ----------------------------------------------------------------------------------------------------------------
# The record every run leaves next to its results


def library_versions():
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "xformers", "peft", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware():
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def run_record(config, script):
    """Resolved config, command line, versions, git commit and hardware: enough to rerun the job months later.
    Secrets (SECRET_FLAGS) are redacted in the config and in the command line."""
    return {
        "script": os.path.basename(script),
        "command": shlex.join(redact_argv([sys.executable] + sys.argv)),
        "config": redact(config),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(),
    }


def save_code(folder, script):
    """The script and this module as they ran, beside the run record: research forks are seldom committed, so the git
    commit alone does not say what ran."""
    Path(folder, "code").mkdir(parents=True, exist_ok=True)
    for source in (script, __file__):
        shutil.copyfile(source, Path(folder, "code", os.path.basename(source)))


def scrub_records(*folders):
    """Redact secrets in the run records (run_config.json) of run folders and their checkpoints that an earlier
    version of this suite wrote in plain text, and say so. Returns the records it rewrote."""
    scrubbed = []
    for path in sorted({p for f in folders for p in [Path(f, "run_config.json"), *Path(f).glob("checkpoint-*/run_config.json")]}):
        try:
            record = json.loads(path.read_text())
            config = record["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        words = str(record.get("command", "")).split()
        if redact(config) != config or redact_argv(words) != words:
            write_json(path, {**record, "config": redact(config), "command": " ".join(redact_argv(words))})
            scrubbed.append(path)
    if scrubbed:
        note(f"redacted a Hub token that an older version wrote into {len(scrubbed)} run record(s) such as "
             f"{scrubbed[0]}; its logs may still hold it: revoke it at huggingface.co/settings/tokens")
    return scrubbed


def write_json(path, obj):
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints: `checkpoint-N` folders written by accelerate's save_state, renamed into place when complete

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what every accelerate back end writes for our trainer state, plus our run record; the weights in one of these
# layouts: diffusers' (export.diffusers_checkpoints: unet/, or the LoRA file), accelerate's own, DeepSpeed's, FSDP's
CHECKPOINT_FILES = ("random_states_0.pkl", "custom_checkpoint_0.pkl", "run_config.json")
CHECKPOINT_WEIGHTS = ("unet", LORA_WEIGHTS, "model.safetensors", "pytorch_model", "pytorch_model_fsdp_0")


def list_checkpoints(output_dir):
    """(step, path) of the finished checkpoints in a run folder, oldest first. Unfinished ones (`*.tmp`) don't match."""
    folder = Path(output_dir)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()] \
        if folder.is_dir() else []
    return sorted(found)


def remove_oldest(output_dir, prefix, keep):
    """Keep the newest `keep` finished `prefix-N` folders. Rotation happens after the new one is complete, so an
    interrupted save never costs the previous checkpoint (accelerate's own rotation deletes first)."""
    folders = sorted((int(p.name.split("-")[1]), p) for p in Path(output_dir).glob(f"{prefix}-*")
                     if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, folder in folders[:-keep] if keep else []:
        shutil.rmtree(folder)


def check_checkpoint(path):
    """Refuse a folder that is not a whole checkpoint, before anything loads; return the run record it carries."""
    path = Path(path)
    if not path.is_dir():
        fail(f"checkpoint not found: {path}")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if not any((path / name).exists() for name in CHECKPOINT_WEIGHTS):
        missing.append("the trained weights")
    if not missing:
        try:
            record = json.loads((path / "run_config.json").read_text())
            num_processes = record["config"]["num_processes"]
        except (ValueError, KeyError, TypeError):
            fail(f"{path} is not a complete training checkpoint (unreadable run_config.json)")
        # every process saved its own random state
        missing = [f"random_states_{i}.pkl" for i in range(num_processes) if not (path / f"random_states_{i}.pkl").is_file()]
    if missing:
        fail(f"{path} is not a complete training checkpoint (missing {', '.join(missing)})")
    # a damaged file would fail mid-load with a message that names none, or (an RNG state) be skipped by accelerate
    # with a note at INFO level, and the resume would silently not be exact
    weights = [p.relative_to(path) for p in [*path.glob("*.safetensors"), *path.glob("*/*.safetensors")]]
    for name in [*CHECKPOINT_FILES, *(f"random_states_{i}.pkl" for i in range(1, num_processes)), *weights]:
        try:
            if (path / name).stat().st_size == 0:
                raise ValueError("empty")
            if str(name).endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(path / name, "pt") as f:
                    f.keys()
            elif str(name).startswith("random_states"):
                torch.load(path / name, weights_only=False)
        except Exception as e:
            fail(f"{path / name} is damaged ({first_line(e)}): resume from another checkpoint")
    return record
