"""Images that hold no digit, generated from a seed: the non-digits the trainer shows the network
so that it learns to say "not a digit" (outlier exposure, Hendrycks et al. 2019), and the
evaluate stage's out-of-distribution suite, which measures how often it does.

| kind | what it is |
| --- | --- |
| `letters` | a letter (A-Z, a-z, but for O o I l i: digits in some hands) in a font |
| `symbols` | + = % & @ # $ ? * < > ~ ^ ( ) [ ] { } and the like, in a font (no dash, |
| | dot or stroke, which the MNIST look would blow up into a digit's bar) |
| `scribbles` | a scrawl: a random walk of 12-20 short strokes of random width |
| `hatching` | 3-7 crossing straight strokes |
| `blobs` | a filled ellipse or a fat polygon |
| `noise` | Gaussian, uniform or sparse salt noise over a squarish patch |
| `textures` | stripes, a checkerboard or a grid |
| `blank` | nothing, or nearly nothing: a speck or a faint smudge |
| `inverted` | an MNIST digit with ink and paper swapped |

Everything that has a shape is drawn on a page and then made into an MNIST image the way
`digits predict` makes a user's picture into one (digits.data.imaging): what the network sees of a
letter here is what it sees of a photographed letter. The two sets never share a font or a
seed: training draws its glyphs in the DejaVu faces, the suite in the STIX and Computer Modern
faces (both shipped inside matplotlib, so every machine renders the same bytes); training
inverts training digits, the suite test digits. numpy and Pillow only."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from digits.core.mnist import COLS, NUM_PIXELS, ROWS
from digits.data.imaging import BlankImage, to_mnist

KINDS = (
    "letters",
    "symbols",
    "scribbles",
    "hatching",
    "blobs",
    "noise",
    "textures",
    "blank",
    "inverted",
)
LETTERS = list("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz")  # not O o I l i
SYMBOLS = [*"+=%&@#$?*<>~^()[]{}:;", "×", "÷", "±", "§", "¶", "€", "£", "∞", "≠", "√"]
TRAIN_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
)
SUITE_FONTS = (
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
)
PAGE = 96  # side of the page glyphs and strokes are drawn on, before the MNIST look
SEEDS = {"train": 1, "suite": 2}  # the two sets' seeds, mixed into every draw


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / name), size)


def _page() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("L", (PAGE, PAGE), 0)  # ink is light on 0, as in digits.data.imaging's maps
    return img, ImageDraw.Draw(img)


def _mnist(img: Image.Image) -> np.ndarray:
    ink = np.asarray(img, dtype=np.float32) / 255.0
    try:
        return to_mnist(ink)
    except BlankImage:
        return np.zeros(NUM_PIXELS, np.float32)


def _glyph(chars: list[str], fonts: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
    img, draw = _page()
    font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(40, 72)))
    draw.text(
        (PAGE / 2, PAGE / 2), chars[rng.integers(len(chars))], fill=255, font=font, anchor="mm"
    )
    angle = float(rng.uniform(-15, 15))
    return _mnist(img.rotate(angle, resample=Image.Resampling.BILINEAR))


def _points(rng: np.random.Generator, n: int) -> list[tuple[float, float]]:
    return [tuple(p) for p in rng.uniform(PAGE * 0.15, PAGE * 0.85, size=(n, 2))]


def _scribble(rng: np.random.Generator) -> np.ndarray:
    img, draw = _page()
    steps = int(rng.integers(12, 21))
    start = rng.uniform(PAGE * 0.3, PAGE * 0.7, size=2)
    walk = np.clip(start + np.cumsum(rng.normal(0, PAGE * 0.14, size=(steps, 2)), 0), 5, PAGE - 5)
    draw.line([tuple(p) for p in walk], fill=255, width=int(rng.integers(3, 10)), joint="curve")
    return _mnist(img)


def _hatching(rng: np.random.Generator) -> np.ndarray:
    img, draw = _page()
    width = int(rng.integers(3, 9))
    for _ in range(int(rng.integers(3, 8))):
        draw.line(_points(rng, 2), fill=255, width=width)
    return _mnist(img)


def _blob(rng: np.random.Generator) -> np.ndarray:
    img, draw = _page()
    fill = int(rng.integers(150, 256))
    cx, cy = rng.uniform(PAGE * 0.4, PAGE * 0.6, size=2)
    rx, ry = rng.uniform(PAGE * 0.15, PAGE * 0.35, size=2)  # no thinner than 1:2.3: not a bar
    if rng.random() < 0.5:
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
    else:  # a convex polygon: corners at sorted angles round the centre
        k = int(rng.integers(4, 8))
        angles = (
            rng.uniform(0, 2 * np.pi) + np.arange(k) * 2 * np.pi / k + rng.uniform(-0.3, 0.3, k)
        )
        corners = [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles]
        draw.polygon(corners, fill=fill)
    return _mnist(img)


def _noise(rng: np.random.Generator) -> np.ndarray:
    h, w = (int(v) for v in rng.integers(PAGE // 2, PAGE, size=2))  # squarish: not a bar
    choice = rng.integers(3)
    if choice == 0:
        patch = rng.normal(0.5, rng.uniform(0.1, 0.4), size=(h, w))
    elif choice == 1:
        patch = rng.uniform(0, 1, size=(h, w))
    else:
        patch = (rng.random((h, w)) < rng.uniform(0.05, 0.3)).astype(float)
    img, _ = _page()
    page = np.asarray(img, dtype=np.float32) / 255.0
    top, left = (int(rng.integers(0, PAGE - s + 1)) for s in (h, w))
    page[top : top + h, left : left + w] = np.clip(patch, 0, 1)
    return _mnist(Image.fromarray((page * 255).astype(np.uint8)))


def _texture(rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:PAGE, 0:PAGE].astype(np.float32)
    period = rng.uniform(6, 24)
    choice = rng.integers(3)
    if choice == 0:  # stripes at an angle
        t = rng.uniform(0, np.pi)
        field = np.sin(2 * np.pi * (x * np.cos(t) + y * np.sin(t)) / period) > 0
    elif choice == 1:  # checkerboard
        field = ((x // (period / 2)) + (y // (period / 2))) % 2 == 0
    else:  # grid lines
        field = ((x % period) < period / 4) | ((y % period) < period / 4)
    return _mnist(Image.fromarray((field * 255).astype(np.uint8)))


def _blank(rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((ROWS, COLS), np.float32)
    choice = rng.integers(3)
    if choice == 1:  # a speck, as the model gets it (28x28, not scaled up)
        r, c = (int(v) for v in rng.integers(4, 24, size=2))
        out[r : r + 2, c : c + 2] = rng.uniform(0.3, 1.0)
    elif choice == 2:  # a faint smudge
        out += rng.uniform(0.0, 0.15) * (rng.random((ROWS, COLS)) < 0.3)
    return out.reshape(NUM_PIXELS)


def generate(
    kind: str, n: int, split: str, digits: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """n images of `kind` for `split` ("train" or "suite"): (n, 784) float32 in [0, 1]. The same
    (kind, n, split, seed) gives the same bytes. "inverted" inverts rows of `digits`."""
    rng = np.random.default_rng([SEEDS[split], seed, KINDS.index(kind)])
    fonts = TRAIN_FONTS if split == "train" else SUITE_FONTS
    if kind == "inverted":
        if digits is None or not len(digits):
            raise ValueError("outliers.generate: 'inverted' needs digits to invert")
        picked = np.asarray(digits, np.float32)[rng.integers(len(digits), size=n)]
        return (1.0 - picked).astype(np.float32)
    makers: dict[str, Callable[[], np.ndarray]] = {
        "letters": lambda: _glyph(LETTERS, fonts, rng),
        "symbols": lambda: _glyph(SYMBOLS, fonts, rng),
        "scribbles": lambda: _scribble(rng),
        "hatching": lambda: _hatching(rng),
        "blobs": lambda: _blob(rng),
        "noise": lambda: _noise(rng),
        "textures": lambda: _texture(rng),
        "blank": lambda: _blank(rng),
    }
    return np.stack([makers[kind]() for _ in range(n)]).astype(np.float32)


def outlier_set(
    split: str, per_kind: int, digits: np.ndarray, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every kind, `per_kind` images each: {kind: (per_kind, 784)}."""
    return {kind: generate(kind, per_kind, split, digits, seed) for kind in KINDS}
