"""Batch augmentation for training: what the trainer applies to each batch before the forward
pass, when `train.augment.enabled` is on.

Two methods (`train.augment.method`):
- "warp" (`BatchWarp`): every image its own rotation, shear, zoom, shift and elastic field, all
  applied by one `grid_sample` per batch, then the photometric changes real digits carry (stroke
  width or blur, a black square, fainter ink, a grey background, noise), each to a share of
  the batch;
- "groups": torchvision's transforms.v2 (RandomAffine, ElasticTransform), one random draw per
  group of `group_size` images (v2 draws once per call).

Random draws come from torch's global RNG, which the trainer seeds and its checkpoints save, so
augmented runs are reproducible and resumable."""

from __future__ import annotations

import functools

import torch
from torch import nn

from digits.core.config import AugmentParams
from digits.core.mnist import COLS, ROWS


def make_augment(p: AugmentParams):
    """transforms.v2 on (B, 1, 28, 28) tensors. v2 draws one random transform per call, so
    `augment_batch` calls it once per group of `group_size` images to vary it within a batch."""
    if p.method == "warp":
        return BatchWarp(p)
    from torchvision.transforms import v2

    shear = p.shear or None  # None: no shear drawn, so a config without it keeps its bytes
    affine = v2.RandomAffine(
        degrees=p.degrees, translate=(p.translate, p.translate), scale=p.scale, shear=shear
    )
    ops = [affine]
    if p.elastic_alpha > 0:
        ops.append(v2.ElasticTransform(alpha=p.elastic_alpha, sigma=p.elastic_sigma))
    return v2.Compose(ops)


def augment_batch(
    x: torch.Tensor, transform, group_size: int, *, owned: bool = False
) -> torch.Tensor:
    """`x` (B, 784) augmented. `owned`: the caller hands `x` over, and "warp" may change it in
    place instead of copying it first (the same values either way)."""
    if isinstance(transform, BatchWarp):  # draws per image itself: the whole batch at once
        return transform(x, owned=owned)
    images = x.view(-1, 1, ROWS, COLS)
    out = torch.cat([transform(g) for g in images.split(group_size)])
    return out.view(len(x), -1)


class BatchWarp:
    """augment.method "warp": a fresh random transform for every image, in a handful of batch
    ops. v2's transforms draw one transform per call, so varying them meant one call per small
    group, and ElasticTransform blurs a full-size noise field per call: most of the accurate
    profile's time. Here every image gets its own rotation, shear, zoom, shift and elastic
    field (drawn at warp_grid x warp_grid and upsampled bicubically: smooth by construction,
    no blur), all applied by one `grid_sample`.

    Then the changes real digits carry (see digits.scoring.robustness), each to `photometric_prob`
    of the batch: stroke width or blur, a black square, fainter ink, a grey background, Gaussian
    noise. Each goes to a contiguous slice of the batch at a random offset: the batch is
    already in random order, so that is a random subset, and a slice costs no gather, no mask
    and no work on the images it leaves alone. Draws come from torch's global RNGs, which
    `set_up` seeds and checkpoints save, so runs are reproducible and resumable."""

    def __init__(self, p: AugmentParams):
        self.p = p

    def __call__(self, x: torch.Tensor, *, owned: bool = False) -> torch.Tensor:
        """`x` augmented; `x` itself is left alone unless `owned` (then it may be the result)."""
        p = self.p
        img = x.view(-1, 1, ROWS, COLS)
        if p.warp_share >= 1:
            img = self.warp(img)  # a new tensor: the changes below are in place
        else:  # the warp is most of the cost: a share of the batch, a slice at a random offset
            img = img if owned else img.clone()
            part = self._slice(img, p.warp_share)
            part.copy_(self.warp(part))
        if p.strokes:
            self.strokes(self._slice(img))
        if p.erase:
            self.erase(self._slice(img))
        if p.contrast:
            part = self._slice(img)
            part.mul_(1 - self._uniform(len(part), 0, p.contrast, img.device, 1, 1, 1))
        if p.brightness:
            part = self._slice(img)
            part.add_(self._uniform(len(part), 0, p.brightness, img.device, 1, 1, 1))
            part.clamp_(max=1.0)
        if p.noise_std:
            part = self._slice(img)
            std = self._uniform(len(part), 0, p.noise_std, img.device, 1, 1, 1)
            part.add_(std * torch.randn_like(part)).clamp_(0.0, 1.0)
        return img.reshape(len(x), -1)

    def _slice(self, img: torch.Tensor, share: float | None = None) -> torch.Tensor:
        """`share` (default `photometric_prob`) of the batch: a view, at an offset drawn on the
        CPU (no sync)."""
        k = round((self.p.photometric_prob if share is None else share) * len(img))
        start = int(torch.randint(len(img) - k + 1, ()))
        return img[start : start + k]

    @staticmethod
    def _uniform(n: int, lo: float, hi: float, device, *shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, device=device) * (hi - lo) + lo

    def warp(self, img: torch.Tensor) -> torch.Tensor:
        p, n, dev = self.p, len(img), img.device
        angle = self._uniform(n, -p.degrees, p.degrees, dev, 1).deg2rad()
        shear = self._uniform(n, -p.shear, p.shear, dev, 1).deg2rad().tan()
        zoom = self._uniform(n, *p.scale, dev, 1)
        shift = self._uniform(n, -p.translate, p.translate, dev, 2) * 2  # grid spans [-1, 1]
        cos, sin = angle.cos() / zoom, angle.sin() / zoom
        # Source coordinates of every output pixel: rotation @ x-shear, divided by the zoom,
        # plus the shift, plus the elastic field. All of it is linear in per-image
        # coefficients, so the whole grid is one matrix product with a fixed basis (x, y, 1,
        # then the upsampled control points): affine_grid and interpolate are each as slow
        # as a training step on 1-channel 28x28 batches.
        rows = [
            torch.cat([cos, cos * shear - sin, shift[:, :1]], 1),  # source x
            torch.cat([sin, sin * shear + cos, shift[:, 1:]], 1),  # source y
        ]
        coef = torch.stack(rows, 1)  # (B, 2, 3)
        if p.warp_elastic > 0:
            g = p.warp_grid
            field = torch.randn(n, 2, g * g, device=dev) * (p.warp_elastic * 2 / ROWS)
            coef = torch.cat([coef, field], 2)
        basis = grid_basis(p.warp_grid if p.warp_elastic > 0 else 0, dev)
        grid = (coef.view(n * 2, -1) @ basis).view(n, 2, ROWS, COLS)  # x and y planes
        grid = grid.permute(0, 2, 3, 1)  # grid_sample's (B, H, W, 2), as a view
        return nn.functional.grid_sample(img, grid, padding_mode="zeros", align_corners=False)

    def strokes(self, part: torch.Tensor) -> None:
        """In place: a third each thicker (3x3 dilation), thinner (3x3 erosion) and blurred
        (Gaussian, sigma 1), blended with the original by a random weight so that every width
        in between occurs."""
        ops = (
            lambda im: _filter3(im, torch.maximum, 0.0),
            lambda im: _filter3(im, torch.minimum, 1.0),
            _blur,
        )
        for op, chunk in zip(ops, part.chunk(3), strict=False):
            weight = torch.rand(len(chunk), 1, 1, 1, device=chunk.device)
            chunk.lerp_(op(chunk), weight)

    def erase(self, part: torch.Tensor) -> None:
        """In place: a black square, erase/2 to erase pixels a side, over the digit's box."""
        n, dev, s = len(part), part.device, self.p.erase
        side = torch.randint(max(1, s // 2), s + 1, (n, 1, 1), device=dev)
        top = (torch.rand(n, 1, 1, device=dev) * (25 - side)).long() + 2
        left = (torch.rand(n, 1, 1, device=dev) * (25 - side)).long() + 2
        part.masked_fill_(square_mask(top, left, side), 0.0)


def square_mask(top: torch.Tensor, left: torch.Tensor, side: torch.Tensor | int) -> torch.Tensor:
    """(N, 1, 28, 28) bool, True inside each image's square of `side` pixels whose top-left
    pixel is (top, left); top, left (and side, unless one int) are (N, 1, 1) integer tensors.
    The erase change here, and the occlusion corruption the robustness suite scores."""
    rows = torch.arange(ROWS, device=top.device).view(1, ROWS, 1)
    cols = torch.arange(COLS, device=top.device).view(1, 1, COLS)
    box = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return box.unsqueeze(1)


@functools.cache
def grid_basis(g: int, device: torch.device) -> torch.Tensor:
    """(3 + g*g, 784): x, y and 1 at every pixel centre in grid_sample's [-1, 1] coordinates,
    then (g > 0) the bicubic upsampling of a g x g field to 28 x 28, one row per control point."""
    xs = (torch.arange(COLS, device=device) * 2 + 1) / COLS - 1
    ys = (torch.arange(ROWS, device=device) * 2 + 1) / ROWS - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    rows = [x.flatten(), y.flatten(), torch.ones(ROWS * COLS, device=device)]
    basis = torch.stack(rows)
    if g:
        points = torch.eye(g * g, device=device).view(g * g, 1, g, g)
        up = nn.functional.interpolate(points, (ROWS, COLS), mode="bicubic", align_corners=True)
        basis = torch.cat([basis, up.view(g * g, ROWS * COLS)])
    return basis


def _filter3(img: torch.Tensor, op, pad: float) -> torch.Tensor:
    """3x3 grey-level dilation (op=maximum) or erosion (minimum) as shifted slices: separable,
    and several times faster than max_pool2d on 1-channel images."""
    p = nn.functional.pad(img, (1, 1, 1, 1), value=pad)
    r = op(op(p[..., :-2, :], p[..., 1:-1, :]), p[..., 2:, :])
    return op(op(r[..., :-2], r[..., 1:-1]), r[..., 2:])


@functools.cache
def _blur_matrix(sigma: float, device: torch.device) -> torch.Tensor:
    """(28, 28): a 1-D Gaussian blur (5 taps, zeros beyond the border) as a band matrix."""
    i = torch.arange(ROWS, dtype=torch.float32, device=device)
    d = i[:, None] - i[None, :]
    w = torch.exp(-(d**2) / (2 * sigma**2)) * (d.abs() <= 2)
    return w / w[ROWS // 2].sum()


def _blur(img: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable 5x5 Gaussian blur: two small matrix products (B @ img @ B, B symmetric)."""
    b = _blur_matrix(sigma, img.device)
    return ((img @ b).transpose(-1, -2) @ b).transpose(-1, -2)
