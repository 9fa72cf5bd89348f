"""Photos of whole numbers made from MNIST digits, for measuring how well `digits predict` reads
them (tests/test_segment.py, benchmarks/read_numbers.py): a line of 2 to 8 digits on a page,
each scaled on its own (size jitter), raised or lowered a little (baseline jitter), at varied
gaps, in dark ink on off-white paper, saved as PNG or JPEG. Seeded: the same arguments give
the same bytes. numpy and Pillow only."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def strip(
    digits: np.ndarray, rng: np.random.Generator, fmt: str = "PNG", scale: float | None = None
) -> bytes:
    """The digits (k, 784) uint8 MNIST images, light ink on black) side by side as a photo."""
    scale = scale or float(rng.uniform(1.5, 3.5))
    side = round(28 * scale)
    tiles = []
    for d in digits:
        s = max(8, round(side * rng.uniform(0.85, 1.15)))  # size jitter
        ink = Image.fromarray(255 - np.asarray(d, np.uint8).reshape(28, 28))
        tiles.append(ink.resize((s, s), Image.Resampling.BICUBIC))
    gaps = [round(side * rng.uniform(-0.1, 0.4)) for _ in tiles[1:]]  # tiles' own margins too
    margin = side
    width = sum(t.width for t in tiles) + sum(gaps) + 2 * margin
    page = np.full((2 * side + 2 * margin, width), 255, np.uint8)
    x = margin
    for i, tile in enumerate(tiles):
        top = margin + side // 2 + round(side * rng.uniform(-0.12, 0.12))  # baseline jitter
        region = page[top : top + tile.height, x : x + tile.width]
        np.minimum(region, np.asarray(tile), out=region)  # dark ink wins where tiles overlap
        x += tile.width + (gaps[i] if i < len(gaps) else 0)
    paper = page.astype(np.float32)[..., None] / 255  # 1 = paper, 0 = ink
    pen, white = np.array([25, 30, 80]), np.array([244, 240, 230])
    rgb = pen + (white - pen) * paper
    rgb += rng.normal(0, 3, rgb.shape)  # paper grain
    img = Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()
