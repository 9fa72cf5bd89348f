"""What a 28x28 piece looks like, in a few numbers a drift test can compare: computed from the
784 uint8 pixels exactly as the prediction log stores them, so that a version's reference (its
validation images) and a window of the log are measured the same way.

Per image: ink (mean intensity), area (share of pixels over half intensity), the ink's centroid
(row, column) and spread, a stroke-width proxy (inked pixels per boundary pixel: thick strokes
have few boundary pixels for their area), the ink's bounding box (height, width), and where the
ink is on a 4x4 grid of 7x7 blocks (16 numbers: a fixed low-dimensional projection of the
pixels; fixed, not PCA, so that the reference needs no stored basis and every version is
measured on the same axes). All vectorised over the batch."""

from __future__ import annotations

import numpy as np

SIDE = 28
PIXELS = SIDE * SIDE
GRID = 4  # blocks per side of the coarse ink grid
NAMES: tuple[str, ...] = (
    "ink",
    "area",
    "centroid_row",
    "centroid_col",
    "spread",
    "stroke_width",
    "height",
    "width",
    *(f"block_{r}{c}" for r in range(GRID) for c in range(GRID)),
)


def as_images(pixels: np.ndarray) -> np.ndarray:
    """(N, 784) or (N, 28, 28) uint8 -> (N, 28, 28) uint8 (no copy where possible)."""
    x = np.asarray(pixels)
    if x.dtype != np.uint8 or x.size % PIXELS or (x.ndim == 3 and x.shape[1:] != (SIDE, SIDE)):
        raise ValueError(f"pixels {x.dtype}{x.shape}: expected uint8 (N, 784) or (N, 28, 28)")
    return x.reshape(-1, SIDE, SIDE)


def features(pixels: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """(N, len(NAMES)) float64 for (N, 784) uint8 images; chunked to bound memory."""
    x = as_images(pixels)
    parts = [_features(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, len(NAMES)))


def _features(x: np.ndarray) -> np.ndarray:
    # integer sums: exact, so a reference is the same on every machine, and fast
    n = len(x)
    rows, cols = x.sum(2, dtype=np.int32), x.sum(1, dtype=np.int32)
    total = rows.sum(1, dtype=np.int64).astype(np.float64)
    safe = np.where(total > 0, total, 1.0)
    idx = np.arange(SIDE, dtype=np.float64)
    cr, cc = rows @ idx / safe, cols @ idx / safe
    second = (rows @ idx**2 + cols @ idx**2) / safe - cr**2 - cc**2
    spread = np.sqrt(np.maximum(second, 0.0))
    on: np.ndarray = np.asarray(x > 127)
    area = np.count_nonzero(on.reshape(n, -1), axis=1)
    # boundary: inked pixels with at least one 4-neighbour uninked (outside the image counts)
    padded = np.pad(on, ((0, 0), (1, 1), (1, 1)))
    inner = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    boundary = np.count_nonzero((on & ~inner).reshape(n, -1), axis=1)
    stroke = area / np.maximum(boundary, 1)
    any_r: np.ndarray = np.asarray(x.max(axis=2) > 127)
    any_c: np.ndarray = np.asarray(x.max(axis=1) > 127)
    height = np.where(any_r.any(1), SIDE - any_r[:, ::-1].argmax(1) - any_r.argmax(1), 0)
    width = np.where(any_c.any(1), SIDE - any_c[:, ::-1].argmax(1) - any_c.argmax(1), 0)
    b = SIDE // GRID
    bands = x.reshape(n, GRID, b, SIDE).sum(2, dtype=np.int32)  # one axis at a time: faster
    blocks = bands.reshape(n, GRID, GRID, b).sum(3).reshape(n, -1)
    head = np.stack(
        [total / (255 * PIXELS), area / PIXELS, cr, cc, spread, stroke, height, width], axis=1
    ).astype(np.float64)
    return np.concatenate([head, blocks / (255.0 * b * b)], axis=1)
