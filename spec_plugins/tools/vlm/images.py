"""Synthetic images whose content is known from how they were drawn.

Each image comes with the facts that drew it and a short caption derived from them, so the
vision tower can be aligned without any dataset, and benchmark questions have answers the
image decides. Kinds: one shape, two shapes, a rendered word, a bar chart. A seed fixes the
image: training and benchmarks draw from disjoint seed ranges (``TRAIN_SEEDS``,
``HELD_OUT_SEEDS``).
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
    "yellow": (240, 210, 30), "orange": (245, 140, 20), "purple": (140, 50, 180),
    "black": (15, 15, 15), "white": (245, 245, 245), "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
          "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}
WORDS = ("cat", "tree", "house", "river", "moon", "book", "apple", "train", "stone", "bird",
         "cloud", "ship", "lamp", "road", "fish", "star", "door", "hill", "rain", "key")
KINDS = ("shape", "two shapes", "word", "chart")
# Disjoint seed ranges: the alignment never sees a benchmark's image.
TRAIN_SEEDS = range(0, 1_000_000)
HELD_OUT_SEEDS = range(1_000_000, 2_000_000)


@dataclass(frozen=True)
class Drawn:
    image: Image.Image
    kind: str
    caption: str       # what the alignment teaches the tower to say
    facts: dict        # what was drawn (benchmark questions are asked about these)


def data_uri(image: Image.Image) -> str:
    """The image as an OpenAI ``image_url`` data URI (PNG)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def _two_colours(rng: random.Random) -> tuple[str, str]:
    fg, bg = rng.sample(sorted(COLOURS), 2)
    return fg, bg


def draw(seed: int, size: int = 224, kind: str | None = None) -> Drawn:
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    fg, bg = _two_colours(rng)
    img = Image.new("RGB", (size, size), COLOURS[bg])
    d = ImageDraw.Draw(img)
    if kind == "shape":
        shape, place = rng.choice(SHAPES), rng.choice(sorted(PLACES))
        big = rng.random() < 0.5
        px, py = PLACES[place]
        _shape(d, shape, px * size, py * size, size * (0.2 if big else 0.11), COLOURS[fg])
        facts = {"shape": shape, "colour": fg, "background": bg, "place": place,
                 "size": "big" if big else "small"}
        caption = f"a {facts['size']} {fg} {shape} at the {place} on a {bg} background"
    elif kind == "two shapes":
        (s1, s2), c2 = rng.sample(SHAPES, 2), rng.choice([c for c in COLOURS if c not in (fg, bg)])
        _shape(d, s1, 0.27 * size, 0.5 * size, 0.17 * size, COLOURS[fg])
        _shape(d, s2, 0.73 * size, 0.5 * size, 0.17 * size, COLOURS[c2])
        facts = {"left": f"{fg} {s1}", "right": f"{c2} {s2}", "background": bg}
        caption = f"a {fg} {s1} on the left and a {c2} {s2} on the right, on a {bg} background"
    elif kind == "word":
        word = rng.choice(WORDS)
        font = ImageFont.load_default(size=int(size * 0.28))
        left, top, right, bottom = d.textbbox((0, 0), word, font=font)
        d.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), word,
               fill=COLOURS[fg], font=font)
        facts = {"word": word, "colour": fg, "background": bg}
        caption = f"the word {word} written in {fg} on a {bg} background"
    elif kind == "chart":
        n = rng.randint(3, 5)
        heights = rng.sample(range(1, 10), n)
        w = size / (n + 1)
        for i, h in enumerate(heights):
            x0 = w * (i + 0.5)
            d.rectangle((x0 + 0.1 * w, size * (0.9 - 0.08 * h), x0 + 0.9 * w, size * 0.9),
                        fill=COLOURS[fg])
        tallest = heights.index(max(heights)) + 1
        facts = {"bars": n, "colour": fg, "background": bg, "tallest": tallest,
                 "heights": heights}
        caption = f"a bar chart of {n} {fg} bars on a {bg} background, bar {tallest} is tallest"
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return Drawn(img, kind, caption, facts)


# Questions a benchmark asks about an image (answers depend on what was drawn).
QUESTIONS = {
    "shape": ("Describe the image in detail.", "What shape is in the picture, and what colour is it?",
              "Where in the picture is the shape? Explain.", "Write a short story about this picture."),
    "two shapes": ("Describe the image in detail.", "Which shapes are on the left and on the right?",
                   "Compare the two shapes in the picture.", "Write a short poem about this picture."),
    "word": ("What word is written in the image? Use it in a sentence.", "Describe the image.",
             "Write a short story about the word in the picture."),
    "chart": ("Describe this chart.", "How many bars does the chart have, and which is tallest?",
              "Explain what this chart could be showing."),
}
