"""The training loop: tensors in memory, Adam, a per-batch LR schedule, validation every epoch,
and a checkpoint after every epoch so a killed run resumes exactly where it left off.

Speed comes from doing nothing per sample in Python: the whole split is one float32 tensor,
each batch is one index_select, the optimizer is fused, and metrics stay tensors until the end
of the epoch (no .item() per step)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from digits.config import AugmentParams, TrainParams
from digits.errors import DigitsError
from digits.files import atomic_path
from digits.mnist import COLS, ROWS
from digits.model import build_mlp, predict_logits


class TrainError(DigitsError):
    pass


class CheckpointError(DigitsError):
    pass


@dataclass
class TrainResult:
    model: nn.Sequential
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0
    started_at: float = 0.0  # wall clock (time.time()) when training started
    seconds: float = 0.0  # training time of this process (resumed epochs excluded)


def train(
    p: TrainParams,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
) -> TrainResult:
    """Train the network described by `p`. With `checkpoint`, state is saved there after every
    epoch, and a checkpoint found there at start is resumed if it has the same `fingerprint`."""
    started, t_start = time.time(), time.perf_counter()
    device = set_up(p)
    train_x, train_y = train_x.to(device), train_y.to(device)
    val_x, val_y = val_x.to(device), val_y.to(device)
    steps_per_epoch = math.ceil(len(train_x) / p.batch_size)
    model, opt, sched = build(p, device, total_steps=p.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    augment = make_augment(p.augment) if p.augment.enabled else None

    result = TrainResult(model, started_at=started)
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, fingerprint)
        result.history = resume(state, model, opt, sched, device)
        result.resumed_from_epoch = len(result.history)
        print(f"train: resuming from {checkpoint} after epoch {result.resumed_from_epoch}")

    for epoch in range(result.resumed_from_epoch + 1, p.epochs + 1):
        t0 = time.perf_counter()
        desc = f"epoch {epoch}/{p.epochs}"
        train_loss, train_acc = train_one_epoch(
            model, opt, sched, loss_fn, train_x, train_y, p, augment, desc, progress
        )
        val_loss, val_acc = validate(model, val_x, val_y)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        result.history.append(row)
        if progress:
            tqdm.write(
                f"epoch {epoch:3d}/{p.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}"
                f"  val loss {val_loss:.4f} acc {val_acc:.4f}  {row['seconds']:.1f}s"
            )
        if checkpoint is not None and epoch < p.epochs:
            save_checkpoint(checkpoint, fingerprint, epoch, model, opt, sched, result.history)
    model.cpu().eval()
    result.seconds = time.perf_counter() - t_start
    return result


def set_up(p: TrainParams) -> torch.device:
    """Device, seed and deterministic kernels: what makes two runs of `p` give the same bytes."""
    device = resolve_device(p.device)
    if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(p.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device: 'cuda' asked for, but no GPU is available")
    return torch.device(name)


def build(p: TrainParams, device: torch.device, total_steps: int):
    """The network, its optimizer (fused Adam: one kernel for all parameters) and schedule."""
    model = build_mlp(p.hidden_sizes, p.dropout).to(device)
    optimizer = torch.optim.AdamW if p.weight_decay else torch.optim.Adam
    opt = optimizer(
        model.parameters(),
        lr=p.lr,
        betas=p.betas,
        weight_decay=p.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    return model, opt, make_scheduler(opt, p, total_steps)


def make_scheduler(opt: torch.optim.Optimizer, p: TrainParams, total_steps: int):
    if p.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=total_steps)
    if p.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return None


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


def augment_batch(x: torch.Tensor, transform, group_size: int) -> torch.Tensor:
    if isinstance(transform, BatchWarp):  # draws per image itself: the whole batch at once
        return transform(x)
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

    Then the changes real digits carry (see digits.robustness), each to `photometric_prob` of
    the batch: stroke width or blur, a black square, fainter ink, a grey background, Gaussian
    noise. Each goes to a contiguous slice of the batch at a random offset: the batch is
    already in random order, so that is a random subset, and a slice costs no gather, no mask
    and no work on the images it leaves alone. Draws come from torch's global RNGs, which
    `set_up` seeds and checkpoints save, so runs are reproducible and resumable."""

    def __init__(self, p: AugmentParams):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        img = self.warp(x.view(-1, 1, ROWS, COLS))  # a new tensor: the changes below are in place
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

    def _slice(self, img: torch.Tensor) -> torch.Tensor:
        """`photometric_prob` of the batch: a view, at an offset drawn on the CPU (no sync)."""
        k = round(self.p.photometric_prob * len(img))
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
        coef = [
            torch.cat([cos, cos * shear - sin, shift[:, :1]], 1),  # source x
            torch.cat([sin, sin * shear + cos, shift[:, 1:]], 1),  # source y
        ]
        coef = torch.stack(coef, 1)  # (B, 2, 3)
        if p.warp_elastic > 0:
            g = p.warp_grid
            field = torch.randn(n, 2, g * g, device=dev) * (p.warp_elastic * 2 / ROWS)
            coef = torch.cat([coef, field], 2)
        basis = _grid_basis(p.warp_grid if p.warp_elastic > 0 else 0, dev)
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
        rows = torch.arange(ROWS, device=dev).view(1, ROWS, 1)
        cols = torch.arange(COLS, device=dev).view(1, 1, COLS)
        box = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        part.masked_fill_(box.unsqueeze(1), 0.0)


@functools.cache
def _grid_basis(g: int, device: torch.device) -> torch.Tensor:
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


def train_one_epoch(model, opt, sched, loss_fn, x, y, p: TrainParams, augment, desc, progress):
    """One pass over (x, y) in a fresh random order; returns (mean loss, accuracy)."""
    model.train()
    n = len(x)
    perm = torch.randperm(n, device=x.device)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    batches = perm.split(p.batch_size)
    bar = tqdm(batches, desc=desc, unit="batch", disable=None if progress else True, leave=False)
    for i, idx in enumerate(bar):
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment_batch(xb, augment, p.augment.group_size)
        logits = model(xb)
        loss = loss_fn(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == yb).sum()
        if progress and i % 50 == 0:  # reading a value syncs the device: only now and then
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss_sum.item() / n, correct.item() / n


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) on a held-out split, without label smoothing."""
    logits = predict_logits(model, x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def fingerprint(p: TrainParams, data_digest: str) -> str:
    """Identity of a training run: its params and its data. A checkpoint resumes only a run
    with the same fingerprint."""
    blob = json.dumps({"train": p.model_dump(mode="json"), "data": data_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_checkpoint(path: Path, fingerprint: str, epoch: int, model, opt, sched, history):
    cuda = next(model.parameters()).is_cuda
    state = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else {},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state() if cuda else torch.empty(0),
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, fingerprint: str) -> dict:
    """Read a checkpoint without unpickling arbitrary objects (weights_only=True refuses any
    class outside tensors and plain containers), and only for the run it was made for."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's message opens with advice (and terminal escapes); the reason is on the
        # "WeightsUnpickler error:" line, e.g. "Unsupported global: GLOBAL builtins.exec ..."
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n\n|$)", text, re.S)
        why = " ".join((m.group(1) if m else text.split(". ")[0]).split()) or type(e).__name__
        raise CheckpointError(
            f"{path}: refused to load checkpoint (not a plain tensor "
            f"checkpoint: {why}); delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: checkpoint belongs to another run (params or data "
            "differ); delete it to start over"
        )
    return state


def resume(state: dict, model, opt, sched, device: torch.device) -> list[dict]:
    """Restore model, optimizer, schedule and RNG from a checkpoint; return its history."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"])
    return [dict(h) for h in state["history"]]


def train_info(
    result: TrainResult, device: torch.device, n_train: int, n_val: int, data_sha256: str
) -> dict:
    """The training's record for the MLflow run that the evaluate stage makes: when it started,
    how long it took and how fast, on what, and on which data. Wall-clock figures, so the file
    is DVC-cached, never committed."""
    from digits import numerics

    epochs = len(result.history) - result.resumed_from_epoch  # trained by this process
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return {
        "started_at": result.started_at,
        "seconds": result.seconds,
        "samples_per_second": round(n_train * epochs / max(result.seconds, 1e-9), 1),
        "device": f"{device.type} ({name})" if name else device.type,
        "numerics": numerics.describe(),
        "data": {"sha256": data_sha256, "train_rows": n_train, "val_rows": n_val},
    }


def run(params) -> TrainResult:
    """The `train` stage: processed train/val data -> model file + per-epoch history."""
    from digits.data import file_digest, load_split
    from digits.files import HISTORY, MODEL, TRAIN_DATA, TRAIN_INFO, repo_root, write_text
    from digits.model import save_model
    from digits.reports import write_history

    p = params.train
    digest = file_digest(TRAIN_DATA)
    key = fingerprint(p, digest)
    train_x, train_y, val_x, val_y = load_split(TRAIN_DATA, "train", "val")
    # Outside the stage's outputs (DVC deletes those before a rerun) and under DVC_ROOT, so a
    # queued experiment's checkpoint outlives its temporary copy. Named by the run's identity.
    ckpt = repo_root() / ".checkpoints" / f"train-{key[:16]}.pt"
    ckpt.parent.mkdir(exist_ok=True)
    result = train(p, train_x, train_y, val_x, val_y, checkpoint=ckpt, fingerprint=key)
    save_model(result.model, MODEL, p.hidden_sizes, p.dropout)
    write_history(HISTORY, result.history)
    info = train_info(result, resolve_device(p.device), len(train_x), len(val_x), digest)
    write_text(TRAIN_INFO, json.dumps(info, indent=2) + "\n")
    ckpt.unlink(missing_ok=True)  # done: nothing left that a later run could resume by mistake
    last = result.history[-1]
    print(f"train: {MODEL} written; val accuracy {last['val_accuracy']:.4f}")
    return result
