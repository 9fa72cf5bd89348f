"""Test-set metrics and figures. The test set is read here and nowhere before.

Figures are drawn with matplotlib's object-oriented `Figure`, which renders to a file with no
GUI backend to choose: importing this module changes no global state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from digits.files import atomic_path
from digits.metrics import compute_metrics, confusion_matrix
from digits.mnist import CLASSES, COLS, ROWS
from digits.robustness import corruption_accuracies


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


def plot_robustness(robustness: dict, clean_accuracy: float, path: Path) -> Path:
    """Accuracy on each corrupted copy of the test set (digits.robustness), clean for scale."""
    names = list(robustness["corruptions"])
    accs = [robustness["corruptions"][n] for n in names]
    fig = Figure(figsize=(7, 5), layout="tight")
    ax = fig.subplots()
    bars = ax.barh(names, accs, color="tab:blue")
    ax.bar_label(bars, labels=[f"{a:.2%}" for a in accs], padding=2, fontsize=8)
    ax.axvline(clean_accuracy, color="tab:green", ls="--", label=f"clean {clean_accuracy:.2%}")
    ax.invert_yaxis()
    ax.set(
        xlim=(0, 1.12),
        xlabel="test accuracy",
        title=f"corrupted test sets: mean {robustness['mean']:.2%}, "
        f"worst {robustness['worst']:.2%}",
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def run(params) -> dict:
    """The `evaluate` stage: model + test set -> metrics, predictions, figures, MLflow run."""
    from digits import tracking
    from digits.data import load_split
    from digits.files import FIGURES, HISTORY, METRICS, MODEL, PREDICTIONS, TEST_DATA
    from digits.model import load_model, predict_logits
    from digits.reports import read_history, write_metrics, write_predictions

    # the store first: a dead tracking server fails the stage now, not after the scoring
    tracking.connect(params.mlflow.experiment)
    model = load_model(MODEL)
    test_x, test_y = load_split(TEST_DATA, "test")
    logits = predict_logits(model, test_x, params.evaluate.batch_size)
    probs = torch.softmax(logits, 1).numpy()
    x, y, pred = test_x.numpy(), test_y.numpy(), probs.argmax(1)
    metrics = compute_metrics(probs, y)
    metrics["robustness"] = corruption_accuracies(
        lambda im: torch.softmax(predict_logits(model, im, params.evaluate.batch_size), 1),
        test_x,
        test_y,
    )
    history = read_history(HISTORY)
    figures = [
        plot_history(history, FIGURES / "training_curves.png"),
        plot_confusion(y, pred, FIGURES / "confusion_matrix.png"),
        plot_misclassified(
            x, y, probs, params.evaluate.misclassified_shown, FIGURES / "misclassified.png"
        ),
        plot_robustness(metrics["robustness"], metrics["accuracy"], FIGURES / "robustness.png"),
    ]
    write_predictions(PREDICTIONS, y.tolist(), pred.tolist())
    write_metrics(METRICS, metrics)
    print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}, "
        f"macro F1 {metrics['macro_f1']:.4f}; corrupted: mean "
        f"{metrics['robustness']['mean']:.4f}, worst {metrics['robustness']['worst']:.4f}"
    )
    tracking.log_pipeline_run(params, metrics, history, figures, model, test_x[:2], pred == y)
    return metrics
