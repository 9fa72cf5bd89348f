"""Images from outside MNIST, made by the project itself: what a user's digits and a user's
non-digits look like when they are not MNIST's. The model never trains on any of them; each set
has two halves, "validation" (to choose a recipe, a score, a threshold on) and "report" (what
the evaluate stage scores and the gate judges; nothing is chosen on it).

Digits (labelled), and where each half comes from:

| set | what it is |
| --- | --- |
| `handwritten` | another dataset's handwriting: the UCI optdigits test set that scikit-learn |
| | ships (13 writers, 8x8 at 17 grey levels), shown large; validation: |
| | its first 898, report: the other 899 |
| `printed` | a digit typeset in a font training never draws (no DejaVu); validation: STIX |
| | regular and bold italic, Computer Modern roman, typewriter and bold; report: STIX bold |
| | and italic, CM sans and italic, Pillow's own Aileron |
| `lowres` | an MNIST digit scanned at 7-12 px and blown up; validation: validation-split |
| | digits, report: test digits |
| `pens` | an MNIST digit redrawn with a fine pen or a marker on grey, grainy paper; halves |
| | as `lowres` |

Non-digits, kinds that digits.data.outliers does not make:

| set | what it is |
| --- | --- |
| `shapes` | triangles, stars, frames, arrows, rings (two concentric: one ring is a zero) |
| `signs` | arrows, math operators, card suits, stars, ticks, Greek capitals and small |
| | letters, in STIX |
| `scribbles` | loops (cursive "eeee"), zigzags, tangles (self-crossing closed curves), |
| | cross-outs |
| `photos` | crops of the two photographs scikit-learn ships; validation: the left half of |
| | each photo, report: the right half |

Everything is drawn as a user would give it, dark ink on light paper, and made into an MNIST
image by digits.data.imaging.preprocess, the path a user's photo takes. Seeded: the same
(set, half, n) gives the same bytes. numpy, Pillow and files scikit-learn ships (it comes with
MLflow); scikit-learn itself is not imported."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from digits.core.errors import DigitsError
from digits.core.mnist import COLS, ROWS
from digits.data import outliers
from digits.data.imaging import BlankImage, preprocess
from digits.data.outliers import font_dir

DIGIT_SETS = ("handwritten", "printed", "lowres", "pens")
OTHER_SETS = ("shapes", "signs", "scribbles", "photos")
SETS = DIGIT_SETS + OTHER_SETS
HALVES = ("validation", "report")
# images per half (handwritten: its whole half of optdigits)
SIZES = {"printed": 300, "lowres": 400, "pens": 400, "shapes": 250, "signs": 200}
SIZES |= {"scribbles": 200, "photos": 200}
PAGE = 96
AILERON = "Pillow:Aileron"  # Pillow's own default font (load_default), not a file of matplotlib
PRINTED_FONTS = {
    "validation": (
        "STIXGeneral.ttf",
        "STIXGeneralBolIta.ttf",
        "cmr10.ttf",
        "cmtt10.ttf",
        "cmb10.ttf",
    ),
    "report": ("STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmss10.ttf", "cmti10.ttf", AILERON),
}
# (glyphs, the STIX faces that have them); nothing that reads as a digit in some hand
# (no theta, delta, sigma, rho, zeta, xi, epsilon; no up or down arrow: a one with a hat)
SIGNS = (
    ("←→⇒⇔↔∑∏∇∀∃∈∩∪⊕⊗", ("STIXGeneral.ttf", "STIXGeneralBol.ttf")),
    ("♠♣♥♦★☆✓", ("STIXGeneral.ttf",)),
    (
        "ΩΨΦΔΛΞΠΣΓαβγλμπφψωηκχ",
        ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"),
    ),
)
SHAPES = ("triangle", "star", "frame", "arrow", "rings")
SCRIBBLES = ("loops", "zigzag", "tangle", "crossout")
PHOTOS = ("china.jpg", "flower.jpg")
SEED = 35  # mixed into every draw, with the set and the half: no other module's seed


class WildError(DigitsError):
    """A wild set that cannot be made (an unknown set or half, its source files missing)."""


@dataclass(frozen=True)
class WildSet:
    name: str
    half: str
    images: np.ndarray  # (n, 784) float32 in [0, 1]
    labels: np.ndarray | None  # (n,) int64 for the digit sets; None for the non-digits

    @property
    def digits(self) -> bool:
        return self.labels is not None


def _sklearn_data() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise WildError("wild sets: scikit-learn's data files not found (it comes with MLflow)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets"


def sources() -> dict[str, Path]:
    """The files the sets are made from, besides fonts and MNIST: {name: path}."""
    base = _sklearn_data()
    files = {"optdigits": base / "data" / "digits.csv.gz"}
    files |= {photo: base / "images" / photo for photo in PHOTOS}
    for name, path in files.items():
        if not path.is_file():
            raise WildError(f"wild sets: {path} not found, expected scikit-learn's {name}")
    return files


def source_sha256() -> dict[str, str]:
    """sha256 of each source file, for the model card."""
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in sources().items()}


@functools.cache
def _optdigits() -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(sources()["optdigits"], delimiter=",", dtype=np.float32)
    return rows[:, :64].reshape(-1, 8, 8) / 16.0, rows[:, 64].astype(np.int64)


@functools.cache
def _photo(name: str) -> Image.Image:
    with Image.open(sources()[name]) as img:
        return img.convert("L")


@functools.cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == AILERON:
        font = ImageFont.load_default(size)
        assert isinstance(font, ImageFont.FreeTypeFont)  # Pillow with FreeType, as required
        return font
    return ImageFont.truetype(str(font_dir() / name), size)


def _paper(rng: np.random.Generator) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    """A light page and a dark ink level, as a photographed sheet."""
    paper, ink = int(rng.integers(200, 256)), int(rng.integers(0, 90))
    img = Image.new("L", (PAGE, PAGE), paper)
    return img, ImageDraw.Draw(img), ink


def _user(img: Image.Image) -> np.ndarray:
    return preprocess(img, "wild image")


def _from_ink(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An ink map (light on 0) -> a grey page with dark ink, as a scan of it."""
    paper = rng.uniform(0.75, 1.0)
    page = paper - ink * rng.uniform(0.6, paper)
    return Image.fromarray((np.clip(page, 0, 1) * 255).astype(np.uint8))


# --- digits -------------------------------------------------------------------------------


def _handwritten(half: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _optdigits()
    cut = len(x) // 2  # two blocks in file order (not alternate images): the first validates
    x, y = (x[:cut], y[:cut]) if half == "validation" else (x[cut:], y[cut:])
    images = []
    for ink in x:  # 8x8 shown large: the grid smoothed to 64x64, then as a user's picture
        page = Image.fromarray(((1 - ink) * 255).astype(np.uint8)).resize(
            (64, 64), Image.Resampling.BICUBIC
        )
        images.append(_user(page))
    return np.stack(images), y


def _printed(
    rng: np.random.Generator, n: int, fonts: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n, dtype=np.int64) % 10
    images = []
    for label in labels:
        img, draw, ink = _paper(rng)
        font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(40, 72)))
        bold = int(rng.integers(0, 3))  # a heavier print: the glyph's outline stroked
        draw.text((PAGE / 2, PAGE / 2), str(label), fill=ink, font=font, anchor="mm")
        if bold:
            draw.text(
                (PAGE / 2, PAGE / 2),
                str(label),
                fill=ink,
                font=font,
                anchor="mm",
                stroke_width=bold,
                stroke_fill=ink,
            )
        angle = float(rng.uniform(-8, 8))
        img = img.rotate(angle, Image.Resampling.BILINEAR, fillcolor=int(np.asarray(img)[0, 0]))
        images.append(_user(img))
    return np.stack(images), labels


def _lowres(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    images = []
    for d in digits:
        side = int(rng.integers(7, 13))
        ink = Image.fromarray(d.reshape(ROWS, COLS).astype(np.float32))
        small = ink.resize((side, side), Image.Resampling.BOX)  # the coarse scan
        big = small.resize((PAGE, PAGE), Image.Resampling.BILINEAR)  # shown large
        images.append(_user(_from_ink(np.clip(np.asarray(big), 0, 1), rng)))
    return np.stack(images)


def _pens(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    images = []
    for d in digits:
        ink = Image.fromarray(d.reshape(ROWS, COLS).astype(np.float32))
        big = np.asarray(ink.resize((PAGE, PAGE), Image.Resampling.BICUBIC))
        if rng.random() < 0.5:  # a fine pen: the stroke's core only
            stroke = (big > rng.uniform(0.6, 0.8)).astype(np.uint8) * 255
            pen = Image.fromarray(stroke)
        else:  # a marker: the stroke widened
            stroke = (big > 0.5).astype(np.uint8) * 255
            pen = Image.fromarray(stroke).filter(ImageFilter.MaxFilter(int(rng.choice([5, 7, 9]))))
        pen = pen.filter(ImageFilter.GaussianBlur(1.0))
        mark = np.asarray(pen, np.float32) / 255.0
        page = _from_ink(mark, rng)
        grain = rng.normal(0, 0.03, (PAGE, PAGE))  # grey, grainy paper
        noisy = np.clip(np.asarray(page, np.float32) / 255.0 + grain, 0, 1)
        images.append(_user(Image.fromarray((noisy * 255).astype(np.uint8))))
    return np.stack(images)


# --- non-digits ---------------------------------------------------------------------------


def _polygon_star(rng: np.random.Generator, cx: float, cy: float, r: float) -> list:
    k = int(rng.integers(5, 8))
    a0 = rng.uniform(0, 2 * np.pi)
    pts = []
    for i in range(2 * k):
        rr = r if i % 2 == 0 else r * rng.uniform(0.35, 0.5)
        a = a0 + i * np.pi / k
        pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
    return pts


def _shape(rng: np.random.Generator, kind: str) -> np.ndarray:
    img, draw, ink = _paper(rng)
    width = int(rng.integers(3, 9))
    c, r = PAGE / 2, rng.uniform(PAGE * 0.3, PAGE * 0.42)
    fill = ink if rng.random() < 0.3 and kind in ("triangle", "star") else None
    if kind == "triangle":
        a0 = rng.uniform(0, 2 * np.pi)
        angles = a0 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        pts = [(c + r * np.cos(a), c + r * np.sin(a)) for a in angles]
        draw.polygon(pts, fill=fill, outline=ink, width=width)
    elif kind == "star":
        draw.polygon(_polygon_star(rng, c, c, r), fill=fill, outline=ink, width=width)
    elif kind == "frame":  # no thinner than 1:1.5, else it is a bar
        w, h = r, r * rng.uniform(0.67, 1.0)
        if rng.random() < 0.5:
            w, h = h, w
        draw.rectangle((c - w, c - h, c + w, c + h), outline=ink, width=width)
    elif kind == "arrow":
        t = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(t), np.sin(t)])
        tail, tip = np.array([c, c]) - d * r, np.array([c, c]) + d * r
        draw.line([tuple(tail), tuple(tip)], fill=ink, width=width)
        for side in (-1, 1):  # the head's two barbs
            barb = tip - r * 0.45 * (d * np.cos(0.5) + side * np.array([-d[1], d[0]]) * np.sin(0.5))
            draw.line([tuple(tip), tuple(barb)], fill=ink, width=width)
    else:  # rings: two concentric circles
        inner = r * rng.uniform(0.35, 0.6)
        for rr in (r, inner):
            draw.ellipse((c - rr, c - rr, c + rr, c + rr), outline=ink, width=width)
    return _user(img.rotate(float(rng.uniform(-20, 20)), fillcolor=int(np.asarray(img)[0, 0])))


def _sign(rng: np.random.Generator) -> np.ndarray:
    glyphs, faces = SIGNS[rng.integers(len(SIGNS))]
    img, draw, ink = _paper(rng)
    font = _font(faces[rng.integers(len(faces))], int(rng.integers(44, 72)))
    char = glyphs[rng.integers(len(glyphs))]
    draw.text((PAGE / 2, PAGE / 2), char, fill=ink, font=font, anchor="mm")
    return _user(img.rotate(float(rng.uniform(-15, 15)), fillcolor=int(np.asarray(img)[0, 0])))


def _scribble(rng: np.random.Generator, kind: str) -> np.ndarray:
    img, draw, ink = _paper(rng)
    t = np.linspace(0, 1, 240)
    if kind == "loops":  # cursive "eeee": a line of loops
        k = int(rng.integers(3, 7))
        phase = 2 * np.pi * k * t
        x = 10 + t * (PAGE - 20) + 7 * np.cos(phase)
        y = PAGE / 2 - 12 * np.sin(phase) * rng.uniform(0.7, 1.3)
    elif kind == "zigzag":
        k = int(rng.integers(4, 9))
        x = 10 + t * (PAGE - 20)
        y = PAGE / 2 + rng.uniform(12, 30) * (2 * np.abs((t * k) % 2 - 1) - 1)
    elif kind == "tangle":  # a closed curve with high harmonics: it crosses itself
        x, y = np.full_like(t, PAGE / 2), np.full_like(t, PAGE / 2)
        for h in range(2, 6):
            ax, ay, px, py = rng.normal(0, 9, 2).tolist() + rng.uniform(0, 2 * np.pi, 2).tolist()
            x = x + ax * np.cos(2 * np.pi * h * t + px)
            y = y + ay * np.sin(2 * np.pi * h * t + py)
    else:  # crossout: strokes back and forth across a word's width
        k = int(rng.integers(5, 10))
        x = PAGE / 2 + 38 * np.sin(np.pi * k * t + rng.uniform(0, np.pi))
        y = PAGE / 2 - 14 + 28 * t + rng.normal(0, 1.0, len(t))
    pts = list(zip(np.clip(x, 3, PAGE - 3).tolist(), np.clip(y, 3, PAGE - 3).tolist(), strict=True))
    draw.line(pts, fill=ink, width=int(rng.integers(2, 7)), joint="curve")
    return _user(img.rotate(float(rng.uniform(-25, 25)), fillcolor=int(np.asarray(img)[0, 0])))


def _photo_crop(rng: np.random.Generator, half: str) -> np.ndarray:
    while True:  # a flat crop (sky, wall) is blank paper, which the other sets cover: draw again
        photo = _photo(PHOTOS[rng.integers(len(PHOTOS))])
        w, h = photo.size
        side = int(rng.integers(40, 200))
        left0 = 0 if half == "validation" else w // 2  # halves never share a pixel
        left = int(rng.integers(left0, left0 + w // 2 - side))
        top = int(rng.integers(0, h - side))
        crop = photo.crop((left, top, left + side, top + side))
        try:
            return _user(crop)
        except BlankImage:
            continue


def make(
    name: str,
    half: str,
    digits: tuple[np.ndarray, np.ndarray] | None = None,
    n: int | None = None,
) -> WildSet:
    """Set `name`, half `half`: n images (default SIZES; handwritten: its whole half). `lowres`
    and `pens` redraw `digits` (MNIST images (N, 784) with labels; the validation split's for
    the validation half, the test set's for the report half) as (images, labels)."""
    if name not in SETS:
        raise WildError(f"wild set {name!r}: unknown, expected one of {', '.join(SETS)}")
    if half not in HALVES:
        raise WildError(f"wild half {half!r}: unknown, expected one of {', '.join(HALVES)}")
    rng = np.random.default_rng([SEED, SETS.index(name), HALVES.index(half)])
    size = n if n is not None else SIZES.get(name, 0)
    if name == "handwritten":
        x, y = _handwritten(half)
        return WildSet(name, half, x[:n], y[:n])
    if name == "printed":
        return WildSet(name, half, *_printed(rng, size, PRINTED_FONTS[half]))
    if name in ("lowres", "pens"):
        if digits is None:
            raise WildError(f"wild set {name!r}: needs MNIST digits (images, labels) to redraw")
        images, labels = digits
        pick = rng.choice(len(images), size=min(size, len(images)), replace=False)
        redraw = _lowres if name == "lowres" else _pens
        return WildSet(name, half, redraw(rng, images[pick]), np.asarray(labels)[pick])
    makers: dict[str, Callable[[int], np.ndarray]] = {
        "shapes": lambda i: _shape(rng, SHAPES[i % len(SHAPES)]),
        "signs": lambda i: _sign(rng),
        "scribbles": lambda i: _scribble(rng, SCRIBBLES[i % len(SCRIBBLES)]),
        "photos": lambda i: _photo_crop(rng, half),
    }
    return WildSet(name, half, np.stack([makers[name](i) for i in range(size)]), None)


def make_all(
    half: str, digits: tuple[np.ndarray, np.ndarray] | None = None, n: int | None = None
) -> dict[str, WildSet]:
    """Every set's `half`: {name: WildSet}."""
    return {name: make(name, half, digits, n) for name in SETS}


def printed_for_training(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n typeset digits (labels 0-9 in turn) in the training fonts (digits.data.outliers'
    DejaVu faces, which no wild set uses), drawn as the `printed` set is: positives a recipe may
    add to the training digits (benchmarks/wild_recipe.py)."""
    rng = np.random.default_rng([SEED, len(SETS), seed])  # no set's stream
    return _printed(rng, n, outliers.TRAIN_FONTS)
