"""A procedural image world small enough to train a Stable Diffusion on a CPU, and an evaluator that reads its
attributes back from an image (issue 10).

Every image is one object (a circle, square or triangle in one of six colours, of some size, somewhere) on a plain
background of another colour, with a templated caption: "a photo of a red circle on a blue background". Rendering is
a pure function of the attributes, and the attributes a pure function of a seed. The DreamBooth subject is an object
pretraining never shows: a circle whose top half and bottom half have two different colours ("sks circle").

The evaluator works on any RGB image of the world's size, rendered or generated: background = the colour of the
border, object = the pixels far from it, colour = the nearest palette colour, shape = how much of its bounding box
the object fills, pattern = two palette colours each covering a large share of the object.
"""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 190), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
SUBJECT = ("red", "yellow")  # the subject's two halves: top, bottom


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    background: str
    size: int  # bounding-box side in pixels
    x: int  # top-left corner
    y: int
    pattern: tuple = ()  # (top colour, bottom colour) for the subject; empty for plain objects

    def caption(self, token="sks"):
        if self.pattern:
            return f"a photo of {token} {self.shape} on a {self.background} background"
        return f"a photo of a {self.colour} {self.shape} on a {self.background} background"


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


def render(a):
    image = Image.new("RGB", (SIZE, SIZE), PALETTE[a.background])
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


def read_attributes(image, object_distance=80.0, pattern_share=0.25):
    """{"shape", "colour", "background", "pattern"} read from an image (None where there is no object)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=float)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = nearest_colour(np.median(border, axis=0))
    mask = np.linalg.norm(pixels - PALETTE[background], axis=-1) > object_distance
    if mask.sum() < 12:
        return {"shape": None, "colour": None, "background": background, "pattern": False}
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "triangle" if fill < 0.65 else "circle" if fill < 0.9 else "square"
    names = [nearest_colour(p) for p in pixels[mask]]
    counts = sorted(((names.count(n), n) for n in set(names)), reverse=True)
    pattern = len(counts) > 1 and counts[1][0] >= pattern_share * len(names)
    return {"shape": shape, "colour": counts[0][1], "background": background, "pattern": bool(pattern)}


def expected(a):
    """What read_attributes should say about an image rendered from `a`."""
    return {"shape": a.shape, "colour": a.colour, "background": a.background, "pattern": bool(a.pattern)}
