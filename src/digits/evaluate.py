"""Test-set metrics and figures. The test set is read here and nowhere before.

Figures are drawn with matplotlib's object-oriented `Figure`, which renders to a file with no
GUI backend to choose: importing this module changes no global state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix

from digits.files import atomic_path
from digits.metrics import compute_metrics
from digits.mnist import CLASSES, COLS, ROWS


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version stamp
    return path


def plot_history(history: list[dict], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker=".", label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker=".", label=split)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="accuracy", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusion(y: np.ndarray, pred: np.ndarray, path: Path) -> Path:
    cm = confusion_matrix(y, pred, labels=list(CLASSES))
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
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)[:shown].tolist()
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig = Figure(figsize=(cols * 1.6, rows * 1.8), layout="tight")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(x[i].reshape(ROWS, COLS), cmap="gray_r")
        ax.set_title(f"#{i}: {y[i]}→{pred[i]} ({probs[i, pred[i]]:.2f})", fontsize=8)
    fig.suptitle(f"misclassified test digits (first {len(wrong)}: true→predicted (p))")
    return _save(fig, path)


def run(params) -> dict:
    """The `evaluate` stage: model + test set -> metrics, predictions, figures, MLflow run."""
    from digits import tracking
    from digits.data import load_split
    from digits.files import FIGURES, HISTORY, METRICS, MODEL, PREDICTIONS, TEST_DATA
    from digits.model import load_model, predict_logits
    from digits.reports import read_history, write_metrics, write_predictions

    model = load_model(MODEL)
    test_x, test_y = load_split(TEST_DATA, "test")
    logits = predict_logits(model, test_x, params.evaluate.batch_size)
    probs = torch.softmax(logits, 1).numpy()
    x, y, pred = test_x.numpy(), test_y.numpy(), probs.argmax(1)
    metrics = compute_metrics(probs, y)
    history = read_history(HISTORY)
    figures = [
        plot_history(history, FIGURES / "training_curves.png"),
        plot_confusion(y, pred, FIGURES / "confusion_matrix.png"),
        plot_misclassified(
            x, y, probs, params.evaluate.misclassified_shown, FIGURES / "misclassified.png"
        ),
    ]
    write_predictions(PREDICTIONS, y.tolist(), pred.tolist())
    write_metrics(METRICS, metrics)
    print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}, "
        f"macro F1 {metrics['macro_f1']:.4f}"
    )
    tracking.log_pipeline_run(params, metrics, history, figures, model, test_x[:2])
    return metrics
