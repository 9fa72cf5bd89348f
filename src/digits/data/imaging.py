"""Any picture of a digit -> what MNIST is, so that the model sees what it was trained on.

The model was trained on MNIST, so every image is first made to look like an MNIST digit, the
way MNIST itself was made: light ink on black, the ink's bounding box scaled so its longer side
is 20 px (aspect ratio kept, antialiased), placed in a 28x28 field with its centre of mass at
the centre. `digits predict`, the drawing page (`digits app`), the outlier suite
(digits.data.outliers) and the tests all call `preprocess`, so what the page shows is exactly what
the model saw. numpy and Pillow only."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from digits.core.errors import DigitsError
from digits.core.mnist import COLS, NUM_PIXELS, ROWS

# Sane limits: a phone photo is 2-15 MB and 12-50 megapixels. Above these, refuse the file
# before decoding it (Pillow decodes lazily: the header gives the size for free).
MAX_BYTES = 25 * 1024 * 1024
MAX_PIXELS = 50_000_000
WORK_SIDE = 1024  # larger images are reduced to this longer side first (speed; ample detail)

BOX = 20  # MNIST: the digit's longer side, in pixels, inside the 28x28 field
# Measured on MNIST's training digits (index coordinates): the centre of mass is at (14.0,
# 14.0) +/- 0.3, i.e. MNIST moved whole pixels to put it at pixel 14.
CENTRE = 14
INK = 0.25  # a pixel is ink when it is this far from the background towards the darkest ink
MIN_CONTRAST = 0.1  # below this ink-to-background difference (0-1) the image is blank


SIDE_KEY = "digits.original_side"  # img.info: the longer side of the picture as stored


class ImageError(DigitsError):
    """An image that cannot be predicted; the message names it and says why."""


class BlankImage(ImageError):
    """An image with no ink on it: an answer ("not a digit"), not a failure to read it."""


def read_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Open an image file (or its bytes) within the limits, upright, decoded.

    `name` labels the image in errors (default: the path)."""
    name = name or str(source)
    size = len(source) if isinstance(source, bytes) else file_size(Path(source), name)
    if size == 0:
        raise ImageError(f"{name}: empty file, expected an image (PNG, JPEG, ...)")
    if size > MAX_BYTES:
        raise ImageError(
            f"{name}: {size / 2**20:.1f} MiB, larger than the {MAX_BYTES // 2**20} MiB limit"
        )
    too_big = f"{name}: more than the {MAX_PIXELS // 10**6} megapixel limit"
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: MAX_PIXELS is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        w, h = img.size  # from the header: nothing decoded yet
        if w * h > MAX_PIXELS:
            raise ImageError(f"{too_big} ({w}x{h} pixels)")
        if max(w, h) > WORK_SIDE:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, much faster
            scale = WORK_SIDE / max(w, h)
            img.draft("L", (math.ceil(w * scale), math.ceil(h * scale)))
        img.load()
        upright = ImageOps.exif_transpose(img)  # phone photos are stored sideways plus a tag
        upright.info[SIDE_KEY] = max(w, h)  # before the draft: for boxes in the file's pixels
        return upright
    except Image.DecompressionBombError:
        raise ImageError(too_big) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not an image (expected PNG, JPEG, or another Pillow format)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot decode the image ({e})") from None


def file_size(path: Path, name: str) -> int:
    try:
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, expected an image file")
        return path.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror})") from None


def to_gray(img: Image.Image) -> np.ndarray:
    """Grayscale float32 in [0, 1]; transparent pixels count as white paper."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    img = img.convert("L")
    if max(img.size) > WORK_SIDE:
        img.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def ink_map(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """Ink intensity in [0, 1] on a 0 background: inverted when the background is light.

    The background is the median of the border pixels (a digit rarely touches all four edges);
    subtracting it and dividing by the darkest ink's distance from it also evens out grey
    paper and faint pencil."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = (background - gray) if background > 0.5 else (gray - background)
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise BlankImage(f"{name}: no ink found (a blank image), expected a digit")
    return np.clip(ink / peak, 0.0, 1.0)


def preprocess(img: Image.Image, name: str = "image") -> np.ndarray:
    """Any image of one digit -> what MNIST is: (784,) float32 in [0, 1], light ink on 0.

    Grayscale; inverted if the background is light; then `to_mnist`."""
    return to_mnist(ink_map(to_gray(img), name))


def to_mnist(ink: np.ndarray) -> np.ndarray:
    """An ink map (light ink on 0, any size) -> (784,) float32 as MNIST was made: cropped to
    the ink's bounding box, scaled so the longer side is 20 px with antialiasing, keeping the
    aspect ratio, placed in 28x28 with the centre of mass at the centre. A map with no ink
    above INK is BlankImage."""
    rows = np.flatnonzero((ink >= INK).any(axis=1))
    cols = np.flatnonzero((ink >= INK).any(axis=0))
    if not len(rows):
        raise BlankImage("image: no ink found (a blank image), expected a digit")
    crop = np.where(ink >= INK / 2, ink, 0.0)  # drop faint noise (JPEG ringing, paper grain)
    crop = crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Pillow's resampling filters widen with the reduction factor: antialiased when shrinking
    small = Image.fromarray(crop.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    digit = np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)
    return centre(digit).reshape(NUM_PIXELS)


def centre(digit: np.ndarray) -> np.ndarray:
    """Place `digit` (at most 20x20) in a 28x28 field, its centre of mass on pixel (14, 14)
    by whole-pixel moves, as MNIST did; kept wholly inside the field."""
    h, w = digit.shape
    mass = float(digit.sum())
    if mass > 0:
        cy = float((digit.sum(axis=1) * np.arange(h)).sum()) / mass
        cx = float((digit.sum(axis=0) * np.arange(w)).sum()) / mass
    else:
        cy, cx = (h - 1) / 2, (w - 1) / 2
    top = min(max(round(CENTRE - cy), 0), ROWS - h)
    left = min(max(round(CENTRE - cx), 0), COLS - w)
    field = np.zeros((ROWS, COLS), dtype=np.float32)
    field[top : top + h, left : left + w] = digit
    return field
