"""The training loop: tensors in memory, Adam, a per-batch LR schedule, validation every epoch,
and a checkpoint after every epoch so a killed run resumes exactly where it left off.

Speed comes from doing nothing per sample in Python: the whole split is one float32 tensor,
each batch is one index_select, the optimizer is fused, metrics stay tensors until the end of
the epoch (no .item() per step), and the matrix products run in digits.core.blas (see numerics)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from digits.core.config import Params, TrainParams
from digits.core.errors import DigitsError
from digits.core.reports import Epoch
from digits.model.augment import make_augment
from digits.model.batches import epoch_batches, prefetch
from digits.model.checkpoint import Checkpoint, capture, fingerprint, restore
from digits.model.network import build_mlp, predict_logits


class TrainError(DigitsError):
    pass


@dataclass(kw_only=True)
class TrainResult:
    model: nn.Sequential
    history: list[Epoch]
    resumed_from_epoch: int = 0
    seconds: float = 0.0  # training time of this process (resumed epochs excluded)
    samples_per_second: float = 0.0  # of this process's epochs


def train(
    p: TrainParams,
    data: Sequence[torch.Tensor],
    *,
    outliers: torch.Tensor | None = None,
    checkpoint: Checkpoint | None = None,
    on_epoch: Callable[[Epoch], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train the network `p` describes on data = (train_x, train_y, val_x, val_y), and, with
    `p.outliers` on, the non-digits in `outliers` (N, 784). With a `checkpoint`, a saved state
    is resumed and the state saved after every epoch but the last; then `on_epoch` gets the
    epoch's row (the live MLflow run logs it)."""
    device = set_up(p)
    x, y, val_x, val_y = (t.to(device) for t in data)
    if p.outliers.enabled and outliers is None:
        raise TrainError("train.outliers.enabled: outlier exposure needs the outliers to show")
    pool = outliers.to(device) if p.outliers.enabled and outliers is not None else None
    steps_per_epoch = math.ceil(len(x) / p.batch_size)
    model, opt, sched = build(p, device, total_steps=p.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    augment = make_augment(p.augment) if p.augment.enabled else None
    history: list[Epoch] = []
    resume = checkpoint.load() if checkpoint is not None else None
    if resume is not None and checkpoint is not None:
        restore(resume, model, opt, sched, device)
        history = [Epoch(**row) for row in resume.history]
        print(f"train: resuming from {checkpoint.path} after epoch {len(history)}")
    first, t_start = len(history), time.perf_counter()

    for epoch in range(first + 1, p.epochs + 1):
        t0 = time.perf_counter()
        bar = f"epoch {epoch}/{p.epochs}" if progress else None
        train_loss, train_acc = train_one_epoch(
            model, opt, sched, loss_fn, x, y, p, augment=augment, outliers=pool, bar=bar
        )
        val_loss, val_acc = validate(model, val_x, val_y)
        row = Epoch(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_acc,
            val_loss=val_loss,
            val_accuracy=val_acc,
            lr=opt.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0,
        )
        history.append(row)
        if checkpoint is not None and epoch < p.epochs:
            checkpoint.save(capture(epoch, [h.as_dict() for h in history], model, opt, sched))
        if on_epoch is not None:
            on_epoch(row)
        if progress:
            tqdm.write(
                f"epoch {epoch:3d}/{p.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}"
                f"  val loss {val_loss:.4f} acc {val_acc:.4f}  {row.seconds:.1f}s"
            )
    seconds = time.perf_counter() - t_start
    samples = len(x) * (len(history) - first)
    return TrainResult(
        model=model.cpu().eval(),
        history=history,
        resumed_from_epoch=first,
        seconds=seconds,
        samples_per_second=round(samples / max(seconds, 1e-9), 1),
    )


def set_up(p: TrainParams) -> torch.device:
    """Device, seed and deterministic kernels: what makes two runs of `p` give the same bytes."""
    device = resolve_device(p.device)
    torch.manual_seed(p.seed)
    if device.type == "cuda":
        # CUDA has kernels that race (atomics), and cuBLAS is deterministic only with a fixed
        # workspace. The CPU kernels this loop runs are deterministic at a pinned thread count
        # already, and the switch imports torch's compiler stack (1.5 s of every train stage).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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


def train_one_epoch(
    model, opt, sched, loss_fn, x, y, p: TrainParams, *, augment=None, outliers=None, bar=None
) -> tuple[float, float]:
    """One pass over (x, y) in a fresh random order; returns the digits' (mean loss, accuracy).
    With `outliers`, each batch also gets `p.outliers.share` of its size in non-digits drawn
    from them (augmented like the digits), whose loss is the cross-entropy to the uniform
    distribution, "no digit more than another" (outlier exposure, Hendrycks et al. 2019).
    On the CPU the batches are made in a background thread (digits.model.batches: same bytes)."""
    model.train()
    n = len(x)
    made = epoch_batches(x, y, p, augment=augment, outliers=outliers)
    if x.device.type == "cpu" and not p.dropout:  # dropout would draw in this thread too
        made = prefetch(made)
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    steps = math.ceil(n / p.batch_size)
    batches = tqdm(made, total=steps, desc=bar, unit="batch", disable=not bar or None)
    for i, (xb, yb) in enumerate(batches):
        b = len(yb)  # the rows after the digits' are outliers
        out = model(xb)
        logits = out[:b]
        digit_loss = loss_fn(logits, yb)
        loss = digit_loss
        if len(out) > b:
            loss = loss - p.outliers.weight * torch.log_softmax(out[b:], 1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += digit_loss.detach() * b
        correct += (logits.detach().argmax(1) == yb).sum()
        if bar and i % 50 == 0:  # reading a value syncs the device: only now and then
            batches.set_postfix(loss=f"{loss.item():.4f}")
    return loss_sum.item() / n, correct.item() / n


def validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy) on a held-out split, without label smoothing."""
    logits = predict_logits(model, x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def outlier_pool(p: TrainParams, train_x: torch.Tensor) -> torch.Tensor:
    """The non-digits outlier exposure draws from: `p.outliers.per_kind` of every kind in
    digits.data.outliers' training set (its fonts and seed, never the suite's; its inverted digits
    are training digits)."""
    import numpy as np

    from digits.data import outliers

    sets = outliers.outlier_set("train", p.outliers.per_kind, train_x.numpy(), seed=p.seed)
    return torch.from_numpy(np.concatenate(list(sets.values())))


def calibrate(model: nn.Module, val_x: torch.Tensor, val_y: torch.Tensor, refuse: float) -> dict:
    """The model file's calibration, chosen on the validation split: the temperature that
    minimises the validation NLL (digits.model.calibration), then the refusal threshold below which
    `refuse` of the validation digits' calibrated best probabilities fall (digits.model.ood)."""
    from digits.model import calibration, ood
    from digits.model.inference import calibrated

    logits = predict_logits(model, val_x).numpy()
    temperature = calibration.fit_temperature(logits, val_y.numpy())
    threshold = ood.threshold_for(ood.score(calibrated(logits, temperature)), refuse)
    return {"temperature": temperature, "threshold": threshold, "score": "max_probability"}


def run(params: Params) -> TrainResult:
    """The `train` stage: processed train/val data -> model file + per-epoch history, with the
    MLflow run open (and updated every epoch) while it trains."""
    from digits.core.files import HISTORY, MODEL, TRAIN_DATA, repo_root
    from digits.core.reports import write_history
    from digits.data.preprocess import file_digest, load_split
    from digits.model.network import save_model
    from digits.tracking import runs as tracking

    p = params.train
    digest = file_digest(TRAIN_DATA)
    data = load_split(TRAIN_DATA, "train", "val")
    refused = None
    if p.feedback.weight:  # approved corrections; off by default, and then nothing changes
        data, refused, fed = add_feedback(data, p.feedback.weight, params.feedback.holdout_share)
        digest += fed
    key = fingerprint(p, digest)
    # Outside the stage's outputs (DVC deletes those before a rerun) and under DVC_ROOT, so a
    # queued experiment's checkpoint outlives its temporary copy. Named by the run's identity.
    ckpt = Checkpoint(repo_root() / ".checkpoints" / f"train-{key[:16]}.safetensors", key)
    state = ckpt.load()
    splits = tracking.TrainingData(sha256=digest, train_rows=len(data[0]), val_rows=len(data[2]))
    pool = outlier_pool(p, data[0]) if p.outliers.enabled else None
    if pool is not None and refused is not None and len(refused):
        pool = torch.cat([pool, refused])  # corrections saying "not a digit"
    with tracking.training_run(params, splits, resume_run=state.run_id if state else "") as live:
        ckpt.run_id = live.run_id
        if state is not None:
            live.log_epochs([Epoch(**row) for row in state.history])  # any the kill cut off
        result = train(p, data, outliers=pool, checkpoint=ckpt, on_epoch=live.log_epoch)
        calibration = calibrate(result.model, data[2], data[3], p.refuse_val_share)
        save_model(result.model, MODEL, p.hidden_sizes, p.dropout, calibration)
        write_history(HISTORY, result.history)
        live.trained(
            result,
            device=resolve_device(p.device),
            model_sha256=file_digest(MODEL),
            calibration=calibration,
        )
    ckpt.remove()  # done: nothing left that a later run could resume by mistake
    last = result.history[-1]
    print(f"train: {MODEL} written; val accuracy {last.val_accuracy:.4f}")
    return result


def add_feedback(data: list, weight: int, holdout_share: float) -> tuple[list, torch.Tensor, str]:
    """The training data with `weight` copies of each approved correction that is not held out
    (digits.monitor.stage), the "not a digit" ones apart (for the outlier pool), and the
    feedback file's sha256 (it keys the checkpoint)."""
    from digits.data.preprocess import file_digest
    from digits.monitor.stage import FEEDBACK_DATA, load_feedback

    fb = load_feedback()
    fb = fb.part(~fb.held_out(holdout_share))
    digit = fb.y >= 0
    images = lambda a: torch.from_numpy(a).float().div_(255.0)  # noqa: E731
    x = images(fb.x[digit]).repeat(weight, 1)
    y = torch.from_numpy(fb.y[digit]).long().repeat(weight)
    train_x, train_y, val_x, val_y = data
    fed = [torch.cat([train_x, x]), torch.cat([train_y, y]), val_x, val_y]
    sha = file_digest(FEEDBACK_DATA) if FEEDBACK_DATA.is_file() else ""
    return fed, images(fb.x[~digit]), sha
