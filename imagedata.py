"""The data, shared by the scripts: images on disk (listing, EXIF, colour modes), masks beside photos, captions,
datasets, several subjects; and for training the crops, flips and aspect-ratio buckets, the DreamBooth dataset that
pairs each photo with a class image, and the latent and prompt caches."""

import argparse
import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm

import cli
import model_calls


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_EXTENSION = ".txt"
QUIET_EXTENSIONS = {CAPTION_EXTENSION, ".json"}  # captions and manifests sit beside images; skip them silently


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
            cli.fail(f"cannot read image {name}: its {image.mode} values run from {low:g} to {high:g}, no range an image "
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

    Non-image files (and anything not a regular file: a named pipe) are skipped with a note (caption sidecars and
    hidden files silently). With `check`, every image
    is decoded once, so a corrupt or truncated file is named now rather than failing a worker mid-run.
    """
    folder = Path(folder)
    if not folder.exists():
        cli.fail(f"{what} folder not found: {folder}")
    if not folder.is_dir():
        cli.fail(f"{what} folder is not a folder: {folder}")
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() in QUIET_EXTENSIONS or path.is_dir() or is_mask(path):
            continue
        # a named pipe or device named like an image would block the start for ever when opened: only regular files
        (images if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() else skipped).append(path)
    if skipped:
        cli.note(f"skipping {len(skipped)} non-image file(s) in {folder}: {', '.join(p.name for p in skipped[:5])}")
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
                cli.fail(f"cannot read image {path}: {e}")
        if transparent:
            cli.note(f"{len(transparent)} image(s) in {folder} have transparent pixels, which train as white: "
                 f"{', '.join(transparent[:5])}")
    return images


MASK_SUFFIX = ".mask"  # photo.mask.png beside photo.jpg: the subject's mask (train_dreambooth.py), not a photo


def is_mask(path):
    return Path(path).stem.lower().endswith(MASK_SUFFIX) and Path(path).suffix.lower() in IMAGE_EXTENSIONS


def mask_of(path):
    """The photo stem a mask file belongs to ("dog" for dog.mask.png, dog.MASK.PNG), or None for other files."""
    return Path(path).stem[:-len(MASK_SUFFIX)] if is_mask(path) else None


def find_mask(photo):
    """photo.mask.png (or .jpg, ..., in any case: photo.MASK.PNG) beside photo.jpg, or None; checked now, so a bad
    one is named before a model loads."""
    masks = sorted(m for m in photo.parent.iterdir() if mask_of(m) == photo.stem and m.is_file())
    if masks:
        load_mask(masks[0], load_image(photo).size, photo)
    return masks[0] if masks else None


def note_unused_masks(folder, images, photos=True):
    """Masks that weigh nothing, named at start-up: in a photo folder those without a photo of their name (a typo, a
    renamed photo); in a class folder all of them (masks weigh the subject photos' loss only)."""
    stems = {p.stem for p in images}
    unused = [m.name for m in sorted(Path(folder).iterdir()) if mask_of(m) is not None
              and (not photos or mask_of(m) not in stems)]
    if unused:
        cli.note(f"{len(unused)} mask(s) in {folder} " + ("have no photo of their name (photo.mask.png goes beside "
                 "photo.jpg)" if photos else "are in a class folder (masks weigh the subject photos only)")
                 + f", not used: {', '.join(unused[:5])}")


def note_cropped_out_masks(photos, size, center_crop):
    """A photo whose centre crop (at --resolution, without buckets) leaves none of its mask's white in view: with the
    background weighted 0 that photo teaches nothing, whatever it shows."""
    if not center_crop:
        return
    lost = [p.name for p, _, mask in photos if isinstance(p, Path) and mask is not None
            for image in [load_image(p)]
            if preprocess(image, size, True, False, None, mask=load_mask(mask, image.size))[2].max() < 0.5]
    if lost:
        cli.note(f"the centre crop leaves none of the subject (the mask's white) in view in {len(lost)} photo(s): "
                 f"{', '.join(lost[:5])}; their loss is only the background's (--mask_background_weight)")


def load_mask(path, size, photo=None):
    """A mask as an 8-bit grey image of `size` (its photo's: the mask may have another size, not another shape)."""
    try:
        with Image.open(path) as image:
            turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            mask = ImageOps.exif_transpose(image)
            mask.load()
    except Exception as e:  # PIL raises several types for bad files
        cli.fail(f"cannot read mask {path}: {e}")
    if mask.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        cli.fail(f"mask {path} is a {mask.mode} image: a mask is black and white (white = the subject), 8-bit grey or RGB")
    import numpy as np

    rgba = np.asarray(mask.convert("RGBA"))
    if rgba[..., 3].min() < 255 or (rgba[..., :3] != rgba[..., :1]).any():
        cli.fail(f"mask {path} has {'transparent' if rgba[..., 3].min() < 255 else 'coloured'} pixels: a mask is black "
             "and white (white = the subject), grey at soft edges")
    (w, h), (pw, ph) = mask.size, size
    if abs(w * ph - h * pw) > 0.02 * max(w * ph, h * pw):
        with Image.open(photo) if photo else contextlib.nullcontext() as shown:
            photo_turned = shown is not None and shown.getexif().get(0x0112, 1) in (5, 6, 7, 8) and not turned
        cli.fail(f"mask {path} is {w}x{h} and its photo {pw}x{ph}: a mask has its photo's shape (at any size)"
                 + (f"; {photo} is shown turned by its EXIF orientation: make the mask from the photo as shown, "
                    "upright" if photo_turned else ""))
    if rgba[..., 0].max() < 128:
        cli.fail(f"mask {path} has no white pixels: white marks the subject")
    return mask.convert("L").resize(size, Image.BILINEAR)


def read_dataset(name, config_name, image_column, caption_column, default_prompt):
    """A `datasets` dataset (hub id or local imagefolder) as (RGB image, caption or default_prompt, None) triples."""
    try:
        import datasets

        ds = datasets.load_dataset(name, config_name, split="train")
    except Exception as e:
        cli.fail(f"cannot load dataset {name}: {cli.first_line(e)}")
    for column in (image_column, caption_column):
        if column and column not in ds.column_names:
            cli.fail(f"dataset {name} has no column '{column}' (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        cli.fail(f"dataset {name} has no rows")
    examples = []
    for i in range(len(ds)):
        try:
            image = to_rgb(ds[i][image_column], f"{name}[{i}]")
        except Exception as e:
            cli.fail(f"cannot read image {i} of dataset {name}: {e}")
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
            cli.fail(f"cannot read {where}: {e.strerror}")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            cli.fail(f"{where} is not JSON: {e}")
    if not isinstance(value, list) or not value:
        cli.fail(f"{where} must be a non-empty list of subjects ({{{', '.join(CONCEPT_KEYS)}}}), not {type(value).__name__}"
             + (" (empty)" if isinstance(value, list) else ""))
    subjects = []
    for i, concept in enumerate(value):
        if not isinstance(concept, dict):
            cli.fail(f"{where}: subject {i} is a {type(concept).__name__}, not a mapping of {', '.join(CONCEPT_KEYS)}")
        unknown = sorted(set(concept) - set(CONCEPT_KEYS) - {"validation_prompt"})
        needed = CONCEPT_KEYS if with_class else CONCEPT_KEYS[:2]
        missing = [k for k in needed if not isinstance(concept.get(k), str) or not concept[k].strip()]
        if unknown or missing:
            cli.fail(f"{where}: subject {i} " + (f"has unknown key(s) {', '.join(map(str, unknown))}" if unknown else
                                          f"needs {', '.join(missing)}" + (" (prior preservation is on)" if with_class else "")))
        validation = concept.get("validation_prompt") or []
        validation = [validation] if isinstance(validation, str) else validation
        if not isinstance(validation, list) or not all(isinstance(v, str) for v in validation):
            cli.fail(f"{where}: subject {i}'s validation_prompt must be text or a list of texts")
        subjects.append({**{k: concept.get(k) for k in CONCEPT_KEYS}, "validation_prompt": validation})
    if not with_class and any(s[k] for s in subjects for k in CONCEPT_KEYS[2:]):
        cli.note(f"{where}: the subjects' class_prompt/class_data_dir have no effect without --with_prior_preservation: "
                 "ignored")
    if with_class:
        check_class_folders(subjects, f"{where}: ")
    return subjects


def check_class_folders(subjects, where=""):
    """Class folders are outputs (missing class images are generated into them): never a subject's photo folder,
    where the class images would be made among the photos and the photos read as class images; and one folder per
    class prompt, however the folder is spelled (relative, absolute, through a link)."""
    photos = {os.path.realpath(s["instance_data_dir"]): s["instance_data_dir"] for s in subjects
              if s.get("instance_data_dir")}
    prompts = {}
    for s in subjects:
        folder = os.path.realpath(s["class_data_dir"])
        if folder in photos:
            cli.fail(f"{where}class folder {s['class_data_dir']} is the photo folder {photos[folder]}: class images "
                     "are generated into it; give them a folder of their own")
        first = prompts.setdefault(folder, s["class_prompt"])
        if first != s["class_prompt"]:
            cli.fail(f"{where}class folder {s['class_data_dir']} is given two class prompts ('{first}' and "
                     f"'{s['class_prompt']}'): one folder per class")


def note_data_plan(subjects, photos, resolution, steps, batch_size):
    """The data plan as a whole, in a note each where it will not do what it looks like: photos blown up far past
    their size, one photo folder under two identifiers, subjects the run's steps never reach."""
    sizes = [(p.name, *load_image(p).size) for subject in photos for p, _, _ in subject if isinstance(p, Path)]
    small = [s for s in sizes if resolution / min(s[1:]) > 2]
    if small:
        cli.note(f"{len(small)} photo(s) are upscaled more than twice to the training size {resolution} (the "
                 f"smallest: {min(small, key=lambda s: min(s[1:]))[0]}, {min(min(s[1:]) for s in small)} px on its "
                 "short side): they train blurry; larger photos or a lower --resolution keep them sharp")
    folders = {}
    for subject in subjects:
        if subject["instance_data_dir"]:
            folders.setdefault(os.path.realpath(subject["instance_data_dir"]), []).append(subject["instance_prompt"])
    for folder, prompts in folders.items():
        if len(set(prompts)) > 1:
            cli.note(f"the photos of {folder} are taught under {len(set(prompts))} prompts ({'; '.join(prompts)}): "
                     "one subject under two identifiers")
    if len(photos) > 1 and steps * batch_size < len(photos):
        cli.note(f"{steps} step(s) of {batch_size} photo(s) reach at most {steps * batch_size} of the {len(photos)} "
                 "subjects: the others are never trained; give more --max_train_steps")


def read_caption(image_path, default):
    """The caption in `photo.txt` beside `photo.jpg`, if there is one, replaces the default prompt."""
    sidecar = Path(image_path).with_suffix(CAPTION_EXTENSION)
    if sidecar.is_file():
        try:
            text = sidecar.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            cli.fail(f"cannot read caption {sidecar}: {e.reason if isinstance(e, UnicodeDecodeError) else e.strerror} "
                 "(captions are UTF-8 text)")
        if text:
            return text
    return default


# ----------------------------------------------------------------------------------------------------------------
# Grids and seeds


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


# ----------------------------------------------------------------------------------------------------------------
# Training data: crops and flips, buckets, the dataset, caches


def preprocess(image, size, center_crop, random_flip, generator, flip=False, mask=None):
    """Resize to cover `size` (height, width) keeping the aspect ratio, crop the rest (centre or random), maybe flip;
    a mask (grey, the photo's size) the same way. Returns a CHW tensor in [-1, 1], SDXL's micro-conditioning of the
    image: (original height, original width, crop top, crop left, height, width), the crop in the resized image and
    mirrored with the flip, as diffusers' SDXL scripts compute it, and the mask (1HW in [0, 1]) or None."""
    (h, w), (w0, h0) = size, image.size
    scale = max(h / h0, w / w0)
    resized = (max(w, round(w0 * scale)), max(h, round(h0 * scale)))
    if center_crop:
        left, top = (resized[0] - w) // 2, (resized[1] - h) // 2
    else:
        left = int(torch.randint(0, resized[0] - w + 1, (1,), generator=generator))
        top = int(torch.randint(0, resized[1] - h + 1, (1,), generator=generator))
    flip = flip or random_flip and torch.rand((), generator=generator) < 0.5
    arrays = []
    for im in (image,) if mask is None else (image, mask):
        im = im.resize(resized, Image.BILINEAR).crop((left, top, left + w, top + h))
        arrays.append(np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im, dtype=np.float32))
    pixels = torch.from_numpy(arrays[0] / 127.5 - 1.0).permute(2, 0, 1)
    mask = None if mask is None else torch.from_numpy(arrays[1] / 255.0)[None]
    left = resized[0] - w - left if flip else left
    return pixels, torch.tensor([h0, w0, top, left, h, w], dtype=torch.float32), mask


def bucket_sizes(value, resolution):
    """The (height, width) buckets: the listed ones, or for 'auto' the square and about resolution^2 pixels each in
    multiples of 64, no side more than twice the other (kohya's scheme: 1024 gives 896x1152, 832x1216, 768x1344...)."""
    if value != "auto":
        try:
            sizes = sorted({tuple(int(v) for v in pair.split(",")) for pair in value.replace(" ", "").strip(";").split(";")})
        except ValueError:
            sizes = [()]
        if not all(len(hw) == 2 and min(hw) >= 8 and hw[0] % 8 == hw[1] % 8 == 0 for hw in sizes):
            raise argparse.ArgumentTypeError(f"expected 'height,width;height,width;...' in multiples of 8, got {value!r}")
        return sizes
    step, area = 64, resolution * resolution
    sizes = {(resolution, resolution)}
    for w in range(step, 2 * resolution + 1, step):
        h = area // w // step * step
        if h >= step and max(w, h) <= 2 * min(w, h):
            sizes |= {(h, w), (w, h)}
    return sorted(sizes)


def nearest_bucket(sizes, width, height):
    """The bucket whose aspect ratio is nearest the image's (in log ratio; the first of a tie)."""
    return min(sizes, key=lambda hw: abs(math.log(hw[1] / hw[0]) - math.log(width / height)))


class BucketBatchSampler:
    """--aspect_ratio_buckets: batches of items whose photo has the same bucket (the class image of an item is fitted
    to it, so the pair shares a UNet batch). An epoch shuffles each bucket's items, then the batches, seeded by (seed,
    dataset epoch): a resume replays it. A bucket's last batch may be short; `batch_size = None` tells accelerate's
    sharding that batches vary in size, so each process gets whole batches."""

    batch_size, drop_last = None, False

    def __init__(self, dataset, batch_size, seed):
        self.dataset, self.per_batch, self.seed = dataset, batch_size, seed
        self.groups = {}
        for i in range(len(dataset)):
            self.groups.setdefault(dataset.size_of(i), []).append(i)

    def __len__(self):
        return sum(math.ceil(len(items) / self.per_batch) for items in self.groups.values())

    def __iter__(self):
        generator = torch.Generator().manual_seed(image_seed(self.seed, f"buckets:{self.dataset.epoch}"))
        batches = []
        for _, items in sorted(self.groups.items()):
            order = [items[k] for k in torch.randperm(len(items), generator=generator).tolist()]
            batches += [order[k:k + self.per_batch] for k in range(0, len(order), self.per_batch)]
        yield from (batches[k] for k in torch.randperm(len(batches), generator=generator).tolist())


class DreamBoothDataset(Dataset):
    """Item i is subject s = i mod S (each of S subjects gets the same share of an epoch, however many photos it has):
    its photo k and class image k (k = i // S, modulo their counts; one subject: photo i and class image i, as
    diffusers pairs them), at the photo's size (its bucket, or --resolution square; the class image fitted to it). An
    epoch is S times the largest set. Crops and flips come from a generator seeded by (seed, epoch, i), whatever the
    workers. An image comes with its time ids (SDXL's size and crop) and its mask or None, a prompt as token ids (an
    instance prompt empty with probability caption_dropout, drawn from (seed, epoch, i) as well). With
    caches (--cache_latents, --pre_compute_text_embeddings) an item holds cached latents and embeddings instead."""

    def __init__(self, subjects, tokenizers, size, center_crop, random_flip, seed, buckets=None, tokenize=None,
                 caption_dropout=0.0):
        """subjects: [(photos: [(image, prompt, mask)], class images: [path], class prompt)]."""
        self.subjects, self.tokenizers, self.center_crop, self.random_flip = subjects, tokenizers, center_crop, random_flip
        self.tokenize_with, self.caption_dropout = tokenize or model_calls.tokenize_padded, caption_dropout
        self.seed, self.epoch = seed, 0
        self.sizes = [[nearest_bucket(buckets, *(im if isinstance(im, Image.Image) else load_image(im)).size)
                       if buckets else (size, size) for im, _, _ in photos] for photos, _, _ in subjects]
        self.latents = self.embeddings = None  # filled by cache_latents / cache_embeddings

    def __len__(self):
        return len(self.subjects) * max(max(len(photos), len(classes)) for photos, classes, _ in self.subjects)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def locate(self, i):
        """(subject, photo index, class image index or None) of item i."""
        s, k = i % len(self.subjects), i // len(self.subjects)
        photos, classes, _ = self.subjects[s]
        return s, k % len(photos), k % len(classes) if classes else None

    def size_of(self, i):
        s, p, _ = self.locate(i)
        return self.sizes[s][p]

    def tokenize(self, prompt):
        """The family's tokenization (model_calls.py: token ids per tokenizer padded to its length; ids and attention
        mask for a language-model encoder)."""
        return self.tokenize_with(self.tokenizers, prompt)

    def image(self, key, image, mask, size, generator):
        if self.latents is not None:  # the crop was made when caching: the one random draw is the flip, as in preprocess
            return self.latents[(*key, size, bool(self.random_flip and torch.rand((), generator=generator) < 0.5))]
        try:  # read again every epoch: the files may have changed since the start-up checks
            image = image if isinstance(image, Image.Image) else load_image(image)
            mask = mask and load_mask(mask, image.size)
        except (OSError, ValueError, SystemExit) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix("error: ")
            raise cli.InputError(f"cannot read {key[0]} image {mask if isinstance(e, SystemExit) else image} during "
                                 f"training ({reason}): it changed or went away since the start; put it back and run "
                                 "again (--resume_from_checkpoint latest continues from the last checkpoint)") from None
        return preprocess(image, size, self.center_crop, self.random_flip, generator, mask=mask)

    def text(self, prompt):
        return self.embeddings[prompt] if self.embeddings is not None else self.tokenize(prompt)

    def __getitem__(self, i):
        generator = torch.Generator().manual_seed(image_seed(self.seed, f"{self.epoch}:{i}"))
        s, p, c = self.locate(i)
        (photos, classes, class_prompt), size = self.subjects[s], self.sizes[s][p]
        image, prompt, mask = photos[p]
        if self.caption_dropout:  # its own generator: the crops and flips stay those of a run without dropout
            drop = torch.Generator().manual_seed(image_seed(self.seed, f"caption:{self.epoch}:{i}"))
            prompt = "" if torch.rand((), generator=drop) < self.caption_dropout else prompt
        examples = [(self.image(("instance", s, p), image, mask, size, generator), self.text(prompt))]
        if classes:
            examples.append((self.image(("class", s, c), classes[c], None, size, generator), self.text(class_prompt)))
        return examples


def collate(items):
    """Instance examples first, then class examples, in one batch: one forward pass serves both losses. `texts` is
    token ids per tokenizer or, pre-computed, (prompt embeddings, pooled embeddings); `masks` when a photo of the batch has one."""
    examples = [item[k] for k in range(len(items[0])) for item in items]
    (images, time_ids, masks), texts = zip(*[e[0] for e in examples]), list(zip(*[e[1] for e in examples]))
    batch = {"images": torch.stack(images).contiguous(), "time_ids": torch.stack(time_ids),
             "texts": tuple(torch.stack(t) for t in texts)}
    if any(m is not None for m in masks):  # the other images white, at the size in their time ids: the plain loss
        batch["masks"] = torch.stack([torch.ones(1, *map(int, t[4:])) if m is None else m for m, t in zip(masks, time_ids)])
    return batch


@torch.no_grad()
def cache_latents(dataset, encode_images, vae, device, progress=True):
    """--cache_latents: the VAE's latent distribution (its parameters: mean and log-variance; `encode_images`: the
    family's encoder) of every training image at every size it is used at, centre-cropped or with a random crop drawn
    once (a class image takes its photos' buckets), encoded once, one image at a time, both flips when --random_flip,
    with its time ids and mask. A step then samples from it with the training random state, as
    vae.encode(...).latent_dist.sample() would."""
    flips = (False, True) if dataset.random_flip else (False,)
    sources = {}
    for i in range(len(dataset)):
        (s, p, c), size = dataset.locate(i), dataset.size_of(i)
        photos, classes, _ = dataset.subjects[s]
        sources[("instance", s, p), size] = photos[p][0], photos[p][2]
        if c is not None:
            sources[("class", s, c), size] = classes[c], None
    cache = {}
    for (key, size), (image, mask) in tqdm(sources.items(), desc="caching latents", disable=not progress):
        image = image if isinstance(image, Image.Image) else load_image(image)
        mask = mask and load_mask(mask, image.size)
        for flip in flips:  # a random crop is drawn once per image and size, the same for both flips
            crop = torch.Generator().manual_seed(image_seed(dataset.seed, f"crop:{key}:{size}"))
            pixels, time_ids, m = preprocess(image, size, dataset.center_crop, False, crop, flip, mask)
            latents = encode_images(vae, pixels[None].to(device)).parameters[0].cpu()
            cache[(*key, size, flip)] = latents, time_ids, m
    dataset.latents = cache


@torch.no_grad()
def cache_embeddings(dataset, prompts, encode_prompt, text_encoders, device):
    """--pre_compute_text_embeddings: the frozen text encoders' output (prompt and pooled embeddings) for every
    prompt, encoded once."""
    dataset.embeddings = {p: tuple(t[0].cpu() for t in encode_prompt(text_encoders, [i[None].to(device) for i in dataset.tokenize(p)]))
                          for p in dict.fromkeys(prompts)}


def data_summary(subjects, mask_background_weight, photos, config):
    """The banner's account of the data: photos (per subject), masks, buckets (photos in each), class images."""
    parts = [f"{config['num_instance_images']} instance images"]
    if len(photos) > 1:
        parts[0] += " (" + ", ".join(f"{len(p)} of '{s['instance_prompt']}'" for s, p in zip(subjects, photos)) + ")"
    if config["masks"]:
        parts.append(f"{len(config['masks'])} with masks (background weight {mask_background_weight})")
    if config["buckets"]:
        parts.append("buckets " + ", ".join(f"{size}: {n}" for size, n in config["buckets"].items()))
    return ", ".join(parts + [f"{config['num_class_images_used']} class images"])
