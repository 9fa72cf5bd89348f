"""Corrupted copies of the test set, in the spirit of MNIST-C (Mu and Gilmer, 2019): how a model
holds up against the noise, blur, pose and stroke changes that real scanned or photographed
digits carry and the clean test set does not.

Each corruption is applied at one fixed severity. Random choices (noise, signs, directions,
positions) come from a `torch.Generator` seeded from the corruption's name and `seed`, so the
same (name, seed) gives the same bytes on every run and the corruptions are independent of one
another and of torch's global RNG.

| corruption | what it does (severity) |
| --- | --- |
| `gaussian_noise` | adds N(0, 0.3²) to every pixel, clipped to [0, 1] |
| `impulse_noise` | salt and pepper: 10% of pixels set to 1 or 0 (half each) |
| `blur` | Gaussian blur, sigma 1.0 (5x5 kernel) |
| `rotate` | rotation by 20°, clockwise or counter-clockwise (bilinear) |
| `shear` | shear of 20° along x or y, either sign (bilinear) |
| `scale` | zoom by 0.8 or 1.2 about the centre (bilinear) |
| `translate` | shift by 3 pixels left, right, up or down |
| `thick` | thicker strokes: grey-level dilation by a 3x3 square (max_pool: 2 pixels wider) |
| `thin` | thinner strokes: grey-level erosion by a 2x2 square (one pixel off every stroke) |
| `contrast` | `adjust_contrast` factor 0.3: ink and background 70% closer to the image mean |
| `brightness` | +0.3 on every pixel, clipped to 1 (the background turns grey) |
| `occlusion` | a black 6x6 square at a random place in the central 20x20 box |

`corruption_accuracies` scores a model on all of them: the mean and the worst accuracy are the
headline numbers (the `min_corruption_accuracy` gate reads the worst)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

from digits.core.errors import DigitsError
from digits.core.metrics import DIGITS, Robustness
from digits.core.mnist import COLS, NUM_PIXELS, ROWS
from digits.model.augment import square_mask

BILINEAR = F.InterpolationMode.BILINEAR


class RobustnessError(DigitsError):
    pass


def _generator(name: str, seed: int) -> torch.Generator:
    # sha256, not hash(): Python salts str hashes per process, and runs must agree
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _per_group(x: torch.Tensor, options: list, fn: Callable, g: torch.Generator) -> torch.Tensor:
    """Give each image one of `options` at random and apply `fn(images, option)` to each group:
    v2's functional ops take one set of parameters per call, so this varies them per image."""
    pick = torch.randint(len(options), (len(x),), generator=g)
    out = torch.empty_like(x)
    for k, option in enumerate(options):
        idx = (pick == k).nonzero().squeeze(1)
        if len(idx):
            out[idx] = fn(x[idx], option)
    return out


def gaussian_noise(x, g):
    return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp_(0, 1)


def impulse_noise(x, g):
    u = torch.rand(x.shape, generator=g)
    return torch.where(u < 0.05, 0.0, torch.where(u > 0.95, 1.0, x))


def blur(x, g):
    return F.gaussian_blur(x, kernel_size=[5, 5], sigma=[1.0, 1.0])


def rotate(x, g):
    return _per_group(x, [-20.0, 20.0], lambda im, a: F.rotate(im, a, BILINEAR), g)


def shear(x, g):
    shears = [[20.0, 0.0], [-20.0, 0.0], [0.0, 20.0], [0.0, -20.0]]

    def fn(im, s):
        return F.affine(im, angle=0.0, translate=[0, 0], scale=1.0, shear=s, interpolation=BILINEAR)

    return _per_group(x, shears, fn, g)


def scale(x, g):
    def fn(im, s):
        return F.affine(
            im, angle=0.0, translate=[0, 0], scale=s, shear=[0.0], interpolation=BILINEAR
        )

    return _per_group(x, [0.8, 1.2], fn, g)


def translate(x, g):
    shifts = [[3, 0], [-3, 0], [0, 3], [0, -3]]

    def fn(im, t):
        return F.affine(im, angle=0.0, translate=t, scale=1.0, shear=[0.0])

    return _per_group(x, shifts, fn, g)


def thick(x, g):
    return nnf.max_pool2d(x, 3, stride=1, padding=1)


def thin(x, g):
    # one pixel thinner: a 3x3 square (or even a cross) erases the faint strokes of some digits
    # outright; after a 2x2 square every test digit keeps a stroke of at least 0.34 grey
    return -nnf.max_pool2d(nnf.pad(-x, (0, 1, 0, 1), value=-1.0), 2, stride=1)


def contrast(x, g):
    return F.adjust_contrast(x, 0.3)


def brightness(x, g):
    return (x + 0.3).clamp_(max=1.0)


def occlusion(x, g, size: int = 6):
    lo, hi = 4, 24 - size  # top-left corner such that the square stays in the central box
    top = torch.randint(lo, hi + 1, (len(x), 1, 1), generator=g)
    left = torch.randint(lo, hi + 1, (len(x), 1, 1), generator=g)
    return x.masked_fill(square_mask(top, left, size), 0.0)


CORRUPTIONS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        impulse_noise,
        blur,
        rotate,
        shear,
        scale,
        translate,
        thick,
        thin,
        contrast,
        brightness,
        occlusion,
    )
}


def corrupt(name: str, x, seed: int = 0):
    """A corrupted copy of `x`: (N, 784) float32 in [0, 1], numpy or torch; returns the same kind
    and shape. The same (name, x, seed) gives the same bytes."""
    if name not in CORRUPTIONS:
        raise RobustnessError(f"corruption {name!r}: unknown, expected one of {list(CORRUPTIONS)}")
    is_numpy = isinstance(x, np.ndarray)
    t = torch.as_tensor(x, dtype=torch.float32)
    if t.ndim != 2 or t.shape[1] != NUM_PIXELS:
        raise RobustnessError(f"corrupt: images of shape {tuple(t.shape)}, expected (N, 784)")
    with torch.no_grad():
        out = CORRUPTIONS[name](t.reshape(-1, 1, ROWS, COLS), _generator(name, seed))
    out = out.reshape(len(t), NUM_PIXELS).contiguous()
    return out.numpy() if is_numpy else out


def corruption_accuracies(predict_probs: Callable, x, y, seed: int = 0) -> Robustness:
    """Accuracy of `predict_probs` ((N, 784) -> (N, 10) probabilities) on every corruption of
    (x, y); `x` is passed on in the kind it came (numpy for an MLflow pyfunc model)."""
    labels = np.asarray(y, dtype=np.int64)
    accs = {}
    for name in CORRUPTIONS:
        probs = np.asarray(predict_probs(corrupt(name, x, seed)))
        accs[name] = round(float((probs.argmax(1) == labels).mean()), DIGITS)
    return Robustness(
        mean=round(float(np.mean(list(accs.values()))), DIGITS),
        worst=min(accs.values()),
        corruptions=accs,
    )
