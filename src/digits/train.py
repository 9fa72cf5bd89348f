"""The training loop: tensors in memory, Adam, a per-batch LR schedule, validation every epoch,
and a checkpoint after every epoch so a killed run resumes exactly where it left off.

Speed comes from doing nothing per sample in Python: the whole split is one float32 tensor,
each batch is one index_select, the optimizer is fused, and metrics stay tensors until the end
of the epoch (no .item() per step)."""

from __future__ import annotations

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
    from torchvision.transforms import v2

    ops = [v2.RandomAffine(degrees=p.degrees, translate=(p.translate, p.translate), scale=p.scale)]
    if p.elastic_alpha > 0:
        ops.append(v2.ElasticTransform(alpha=p.elastic_alpha, sigma=p.elastic_sigma))
    return v2.Compose(ops)


def augment_batch(x: torch.Tensor, transform, group_size: int) -> torch.Tensor:
    images = x.view(-1, 1, ROWS, COLS)
    out = torch.cat([transform(g) for g in images.split(group_size)])
    return out.view(len(x), -1)


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


def run(params) -> TrainResult:
    """The `train` stage: processed train/val data -> model file + per-epoch history."""
    from digits.data import file_digest, load_split
    from digits.files import HISTORY, MODEL, TRAIN_DATA, repo_root
    from digits.model import save_model
    from digits.reports import write_history

    p = params.train
    key = fingerprint(p, file_digest(TRAIN_DATA))
    train_x, train_y, val_x, val_y = load_split(TRAIN_DATA, "train", "val")
    # Outside the stage's outputs (DVC deletes those before a rerun) and under DVC_ROOT, so a
    # queued experiment's checkpoint outlives its temporary copy. Named by the run's identity.
    ckpt = repo_root() / ".checkpoints" / f"train-{key[:16]}.pt"
    ckpt.parent.mkdir(exist_ok=True)
    result = train(p, train_x, train_y, val_x, val_y, checkpoint=ckpt, fingerprint=key)
    save_model(result.model, MODEL, p.hidden_sizes, p.dropout)
    write_history(HISTORY, result.history)
    ckpt.unlink(missing_ok=True)  # done: nothing left that a later run could resume by mistake
    last = result.history[-1]
    print(f"train: {MODEL} written; val accuracy {last['val_accuracy']:.4f}")
    return result
