"""A procedural image world small enough to train a Stable Diffusion on a CPU, and an evaluator that reads its
attributes back from an image.

Every image is one object (a circle, square or triangle in one of six colours, of some size, somewhere) on a plain
background of another colour, with a templated caption: "a photo of a red circle on a blue background", the colour or
the background sometimes left out ("a photo of a circle"). Rendering is a pure function of the attributes, and the
attributes a pure function of a seed. The DreamBooth subject is an object the UNet and the text encoder never see in
pretraining: a circle with a red top half and a yellow bottom half ("sks circle").

The evaluator works on any RGB image of the world's size, rendered or generated: background = the colour of the
border, object = the pixels far from it, colour = the nearest palette colour, shape = how much of its bounding box
the object fills, pattern = the subject's look: 3/4 of the object's top half in the subject's top colour and 3/4 of
its bottom half in its bottom colour. Similarity, a score in [0, 1] beside that yes/no: the subject drawn at the
object's place and size (the disc inscribed in its bounding box, top half red, bottom half yellow), and the share of
pixels, over the union of the object and that disc, where the object has the disc's colour: the subject scores about
1, a one-colour red or yellow circle about 1/2, the halves swapped about 0 (measured on rendered images: see the tests).
"""

import random
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 190), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
SUBJECT = ("red", "yellow")  # the subject's two halves: top, bottom
SUBJECT_B = ("yellow", "red")  # a second subject for runs of two (--concepts_list): the halves swapped, "zwx circle"


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    background: str
    size: int  # bounding-box side in pixels
    x: int  # top-left corner
    y: int
    pattern: tuple = ()  # (top colour, bottom colour) for the subject; empty for plain objects

    def caption(self, token="sks", colour=True, background=True):
        """The templated caption; colour=False / background=False leave those words out, as real captions leave
        out details ("a photo of a circle")."""
        noun = f"{token} {self.shape}" if self.pattern else f"a {self.colour} {self.shape}" if colour else f"a {self.shape}"
        return f"a photo of {noun}" + (f" on a {self.background} background" if background else "")


def sample_attributes(seed, shape=None, colour=None, background=None, subject=False):
    """Attributes drawn from `seed`; any of shape, colour, background can be fixed. The subject is always a circle."""
    rng = random.Random(seed)
    shape = "circle" if subject else shape or rng.choice(SHAPES)
    colour = SUBJECT[0] if subject else colour or rng.choice(list(PALETTE))
    forbidden = set(SUBJECT) if subject else {colour}
    background = background or rng.choice([c for c in PALETTE if c not in forbidden])
    size = rng.randint(12, 20)
    x, y = rng.randint(1, SIZE - size - 1), rng.randint(1, SIZE - size - 1)
    return Attributes(shape, colour, background, size, x, y, SUBJECT if subject else ())


def render(a, width=SIZE):
    image = Image.new("RGB", (width, SIZE), PALETTE[a.background])
    draw = ImageDraw.Draw(image)
    box = (a.x, a.y, a.x + a.size - 1, a.y + a.size - 1)
    if a.shape == "circle":
        draw.ellipse(box, fill=PALETTE[a.colour])
        if a.pattern:  # the bottom half in the second colour (PIL's angles run clockwise from 3 o'clock)
            draw.pieslice(box, 0, 180, fill=PALETTE[a.pattern[1]])
    elif a.shape == "square":
        draw.rectangle(box, fill=PALETTE[a.colour])
    else:
        draw.polygon([(a.x + (a.size - 1) / 2, a.y), (a.x, a.y + a.size - 1), (a.x + a.size - 1, a.y + a.size - 1)],
                     fill=PALETTE[a.colour])
    return image


def nearest_colour(rgb):
    names = list(PALETTE)
    distances = [np.linalg.norm(np.asarray(rgb, float) - PALETTE[n]) for n in names]
    return names[int(np.argmin(distances))]


def read_attributes(image, object_distance=80.0, pattern_share=0.75, subject=SUBJECT):
    """{"shape", "colour", "background", "pattern", "similarity"} read from an image (None where there is no
    object; similarity 0). `subject`: whose pattern and similarity (the same rule for SUBJECT_B, colours swapped)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=float)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = nearest_colour(np.median(border, axis=0))
    mask = np.linalg.norm(pixels - PALETTE[background], axis=-1) > object_distance
    if mask.sum() < 12:
        return {"shape": None, "colour": None, "background": background, "pattern": False, "similarity": 0.0}
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"
    names = np.array([nearest_colour(p) for p in pixels[mask]])
    values, counts = np.unique(names, return_counts=True)
    middle = (ys.min() + ys.max()) / 2  # the subject: 3/4 of the top half SUBJECT[0], 3/4 of the bottom SUBJECT[1]
    pattern = (np.mean(names[ys < middle] == subject[0]) >= pattern_share
               and np.mean(names[ys > middle] == subject[1]) >= pattern_share)
    grid = np.full((SIZE, SIZE), "", dtype=object)
    grid[mask] = names
    return {"shape": shape, "colour": str(values[np.argmax(counts)]), "background": background,
            "pattern": bool(pattern), "similarity": subject_similarity(mask, grid, ys, xs, subject)}


def subject_similarity(mask, names, ys, xs, subject=SUBJECT):
    """The object (mask, with each pixel's palette colour name) against the subject drawn in its bounding box."""
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    ry, rx = (ys.max() - ys.min() + 1) / 2, (xs.max() - xs.min() + 1) / 2
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    ideal = np.where(yy < cy, subject[0], subject[1])
    return float((mask & disc & (names == ideal)).sum() / (mask | disc).sum())


def count_objects(image, object_distance=80.0, min_pixels=4):
    """How many separate objects an image shows: 8-connected groups of at least `min_pixels` pixels far from the
    background colour (read as read_attributes reads it). Rendered: 1 for the subject or any plain object, 3 for a
    busy photo (the subject and two clutter squares); a generated image with more than one has something beside the
    object asked for (the busy photos' clutter leaking into the token, for one)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=float)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    far = np.linalg.norm(pixels - PALETTE[nearest_colour(np.median(border, axis=0))], axis=-1) > object_distance
    seen, groups = np.zeros_like(far), 0
    for start in zip(*np.nonzero(far)):
        if seen[start]:
            continue
        stack, size = [start], 0
        seen[start] = True
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in range(max(0, y - 1), min(SIZE, y + 2)):
                for nx in range(max(0, x - 1), min(SIZE, x + 2)):
                    if far[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        groups += size >= min_pixels
    return int(groups)


def expected(a):
    """What read_attributes should say about an image rendered from `a`."""
    return {"shape": a.shape, "colour": a.colour, "background": a.background, "pattern": bool(a.pattern)}


def reading(image):
    """read_attributes without the similarity score, to compare with expected()."""
    return {k: v for k, v in read_attributes(image).items() if k != "similarity"}


SUBJECT_PHOTO_BACKGROUNDS = ("white", "green")  # the subject is never shown on blue or purple: new contexts to ask for


def write_subject_photos(folder, n=4, seed=1000, captions=False, width=SIZE, busy=False, masks=False, subject=SUBJECT,
                         token="sks", backgrounds=SUBJECT_PHOTO_BACKGROUNDS, shift=0):
    """The DreamBooth instance photos: the subject in n places and sizes, on a white or a green background (by
    default; `backgrounds` below); with captions, each photo's caption beside it names its background ("a photo of sks
    circle on a white background").
    Photos as they come, for the data options: `width` > SIZE makes wide photos with the subject anywhere across
    them (a centre crop cuts some of it away); `busy` adds two small objects of other colours in the free corners;
    `masks` writes photo.mask.png (the subject's disc) beside each photo. `subject`/`token`: SUBJECT_B as "zwx".
    `backgrounds`: photo i's background is backgrounds[i % len(backgrounds)] (places and sizes stay the same).
    `shift`: photo i is saved under the name of photo (i + shift) % n: the same photos in another order."""
    from dataclasses import replace
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        background = backgrounds[i % len(backgrounds)]
        attributes = replace(sample_attributes(seed + i, subject=True, background=background), colour=subject[0],
                             pattern=subject)
        rng = random.Random(seed + i + 7919)
        if width > SIZE:
            attributes = replace(attributes, x=rng.randint(1, width - attributes.size - 1))
        if busy:  # the subject smaller, in one half; two clutter objects in the other half's corners
            size = rng.randint(12, 15)
            left = rng.random() < 0.5
            attributes = replace(attributes, size=size, y=rng.randint(1, SIZE - size - 1),
                                 x=rng.randint(1, 3) if left else width - size - rng.randint(1, 3))
        image = render(attributes, width)
        if busy:
            draw = ImageDraw.Draw(image)
            others = [c for c in ("blue", "purple", "white", "green") if c != background]
            x0 = width - 10 if left else 2
            for y0, colour in ((2, others[i % 3]), (SIZE - 10, others[(i + 1) % 3])):
                draw.rectangle((x0, y0, x0 + 7, y0 + 7), fill=PALETTE[colour])
        name = f"{token}-{(i + shift) % n}"
        image.save(Path(folder, f"{name}.png"))
        if masks:
            mask = Image.new("L", image.size, 0)
            a = attributes
            ImageDraw.Draw(mask).ellipse((a.x, a.y, a.x + a.size - 1, a.y + a.size - 1), fill=255)
            mask.save(Path(folder, f"{name}.mask.png"))
        if captions:
            Path(folder, f"{name}.txt").write_text(attributes.caption(token) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The toy world from the shell: write the subject's photos (the "
                                     "DreamBooth instance images), or read images back with the evaluator.")
    commands = parser.add_subparsers(dest="command", required=True)
    photos = commands.add_parser("photos", help="write the subject's photos to a folder")
    photos.add_argument("output_dir", help="folder the photos go to")
    photos.add_argument("--num_images", type=int, default=4, help="how many photos")
    read = commands.add_parser("read", help="print what the evaluator sees in each image")
    read.add_argument("images", nargs="+", help="image files of the world's size (others, such as grids, are skipped)")
    read.add_argument("--background", choices=list(PALETTE), help="the background the prompt asked for: also count "
                      "the images that have it")
    args = parser.parse_args()
    if args.command == "photos":
        write_subject_photos(args.output_dir, args.num_images)
        print(f"wrote {args.num_images} photos of the subject to {args.output_dir}")
    else:
        images = {}
        for path in args.images:
            try:
                with Image.open(path) as img:
                    images[path] = img.convert("RGB")
            except (OSError, ValueError) as e:  # a folder, a missing file or not an image
                raise SystemExit(f"error: cannot read image {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
        skipped = [p for p, img in images.items() if img.size != (SIZE, SIZE)]
        if skipped:
            print(f"note: skipping {len(skipped)} image(s) not of the world's {SIZE}x{SIZE} size (grids?): "
                  f"{', '.join(map(str, skipped[:3]))}", file=sys.stderr)
        paths = [p for p in images if p not in skipped]
        if not paths:
            raise SystemExit(f"error: none of the {len(images)} image(s) is a {SIZE}x{SIZE} image of the world")
        seen = [read_attributes(images[path]) for path in paths]
        for path, s in zip(paths, seen):
            thing = ("the subject (red top, yellow bottom)" if s["pattern"] else f"a {s['colour']} {s['shape']}"
                     if s["shape"] else "no object")
            print(f"{path}: {thing} on a {s['background']} background, similarity to the subject {s['similarity']:.2f}")
        similarity = sum(s["similarity"] for s in seen) / len(seen)
        on_it = sum(s["background"] == args.background for s in seen)
        asked = f", the asked {args.background} background in {on_it} of {len(seen)}" if args.background else ""
        print(f"the subject's pattern is in {sum(s['pattern'] for s in seen)} of {len(seen)} images, mean similarity "
              f"to the subject {similarity:.2f}{asked}")
