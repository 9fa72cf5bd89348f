"""The evaluate stage's figures, drawn with matplotlib's object-oriented `Figure`, which renders
to a file with no GUI backend to choose: importing this module changes no global state. PNGs
are written without a version stamp, so the same numbers give the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from digits.core.files import atomic_path
from digits.core.metrics import Calibration, Refusal, Robustness, confusion_matrix
from digits.core.mnist import CLASSES, COLS, ROWS
from digits.core.reports import Epoch


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version stamp
    return path


def plot_history(history: list[Epoch], path: Path) -> Path:
    epochs = [h.epoch for h in history]
    fig = Figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split in ("train", "val"):
        ax_loss.plot(
            epochs, [getattr(h, f"{split}_loss") for h in history], marker=".", label=split
        )
        ax_acc.plot(
            epochs, [getattr(h, f"{split}_accuracy") for h in history], marker=".", label=split
        )
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="accuracy", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusion(y: np.ndarray, pred: np.ndarray, path: Path) -> Path:
    cm = confusion_matrix(y, pred)
    fig = Figure(figsize=(6.5, 5.5), layout="tight")
    ax = fig.subplots()
    # log scale so the off-diagonal errors (tens) are visible beside the diagonal (thousands)
    im = ax.imshow(cm + 1, cmap="Blues", norm=LogNorm())
    for i in CLASSES:
        for j in CLASSES:
            if cm[i, j]:
                color = "white" if i == j else "black"
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7, color=color)
    ax.set(
        xticks=CLASSES,
        yticks=CLASSES,
        xlabel="predicted",
        ylabel="actual",
        title="confusion matrix (test set)",
    )
    fig.colorbar(im, ax=ax, label="count + 1 (log)")
    return _save(fig, path)


def plot_misclassified(
    x: np.ndarray, y: np.ndarray, probs: np.ndarray, shown: int, path: Path
) -> Path:
    """The first `shown` misclassified test digits, as one mosaic image (one axes, not one per
    digit: drawing 36 axes took seconds), each labelled true -> predicted (probability)."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)[:shown]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    cell = ROWS + 12  # room for the label above each digit
    mosaic = np.zeros((rows * cell, cols * (COLS + 4)))
    fig = Figure(figsize=(cols * 1.6, rows * 1.8), layout="tight")
    ax = fig.subplots()
    for k, i in enumerate(wrong):
        r, c = divmod(k, cols)
        top, left = r * cell + 10, c * (COLS + 4) + 2
        mosaic[top : top + ROWS, left : left + COLS] = x[i].reshape(ROWS, COLS)
        label = f"#{i}: {y[i]}→{pred[i]} ({probs[i, pred[i]]:.2f})"
        ax.text(left + COLS / 2, top - 2, label, ha="center", va="bottom", fontsize=7)
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(f"misclassified test digits (first {len(wrong)}: true→predicted (p))")
    return _save(fig, path)


def plot_robustness(robustness: Robustness, clean_accuracy: float, path: Path) -> Path:
    """Accuracy on each corrupted copy of the test set (digits.scoring.robustness), clean for
    scale."""
    names = list(robustness.corruptions)
    accs = [robustness.corruptions[n] for n in names]
    fig = Figure(figsize=(7, 5), layout="tight")
    ax = fig.subplots()
    bars = ax.barh(names, accs, color="tab:blue")
    ax.bar_label(bars, labels=[f"{a:.2%}" for a in accs], padding=2, fontsize=8)
    ax.axvline(clean_accuracy, color="tab:green", ls="--", label=f"clean {clean_accuracy:.2%}")
    ax.invert_yaxis()
    ax.set(
        xlim=(0, 1.12),
        xlabel="test accuracy",
        title=f"corrupted test sets: mean {robustness.mean:.2%}, worst {robustness.worst:.2%}",
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_reliability(
    before: list[dict], after: list[dict], summary: Calibration, path: Path
) -> Path:
    """Reliability diagram (digits.model.calibration.reliability): accuracy against confidence per
    bin, before and after temperature scaling; on the diagonal a model is calibrated."""
    fig = Figure(figsize=(6, 5.5), layout="tight")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="calibrated")
    for rows, label, style in (
        (before, f"T = 1: ECE {summary.ece_before:.2%}", "o:"),
        (after, f"T = {summary.temperature:.3g}: ECE {summary.ece:.2%}", "s-"),
    ):
        used = [r for r in rows if r["count"]]
        ax.plot([r["confidence"] for r in used], [r["accuracy"] for r in used], style, label=label)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (the largest probability)",
        ylabel="accuracy",
        title="reliability on the test set (15 bins)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_ood(
    digit_probs: np.ndarray, suite: dict[str, np.ndarray], ood: Refusal, path: Path
) -> Path:
    """How confident the model is on test digits and on each kind of non-digit, with the
    refusal threshold: everything left of it is "not a digit"."""
    fig = Figure(figsize=(8, 5), layout="tight")
    ax = fig.subplots()
    bins = np.linspace(0, 1, 41).tolist()
    ax.hist(digit_probs.max(1), bins=bins, density=True, alpha=0.5, label="test digits")
    for kind, probs in suite.items():
        ax.hist(probs.max(1), bins=bins, density=True, histtype="step", label=kind)
    ax.axvline(ood.threshold, color="black", ls="--", label=f"threshold {ood.threshold:.3f}")
    ax.set(
        yscale="log",
        xlabel="confidence (the largest calibrated probability)",
        ylabel="density",
        title=f"not a digit: AUROC {ood.auroc:.4f}, FPR95 {ood.fpr95:.2%}, "
        f"test digits refused {ood.refused_digits:.2%}",
    )
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    return _save(fig, path)
