"""Test-set metrics and figures. The test set is read here and nowhere before."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from digits.files import atomic_path, write_text

CLASSES = list(range(10))


def compute_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict:
    pred = logits.argmax(1).numpy()
    true = y.numpy()
    precision, recall, _, _ = precision_recall_fscore_support(
        true, pred, labels=CLASSES, zero_division=0
    )
    return {
        "accuracy": round(float((pred == true).mean()), 6),
        "loss": round(float(torch.nn.functional.cross_entropy(logits, y)), 6),
        "macro_f1": round(
            float(f1_score(true, pred, labels=CLASSES, average="macro", zero_division=0)), 6
        ),
        "per_class": {
            str(c): {
                "precision": round(float(precision[c]), 6),
                "recall": round(float(recall[c]), 6),
            }
            for c in CLASSES
        },
    }


def write_metrics(path: Path, metrics: dict) -> None:
    write_text(path, json.dumps(metrics, indent=2) + "\n")


def write_predictions(path: Path, y: torch.Tensor, pred: torch.Tensor) -> None:
    """One row per test image: what DVC's `confusion` plot template reads."""
    rows = "\n".join(f"{a},{p}" for a, p in zip(y.tolist(), pred.tolist()))
    write_text(path, "actual,predicted\n" + rows + "\n")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no version stamp
    plt.close(fig)
    return path


def plot_history(history: list[dict], path: Path) -> Path:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], marker=".", label=split)
        ax_acc.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker=".", label=split)
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="accuracy", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(y: torch.Tensor, pred: torch.Tensor, path: Path) -> Path:
    cm = confusion_matrix(y.numpy(), pred.numpy(), labels=CLASSES)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    # log scale so the off-diagonal errors (tens) are visible beside the diagonal (thousands)
    im = ax.imshow(cm + 1, cmap="Blues", norm=matplotlib.colors.LogNorm())
    for i in CLASSES:
        for j in CLASSES:
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    cm[i, j],
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if i == j else "black",
                )
    ax.set(
        xticks=CLASSES,
        yticks=CLASSES,
        xlabel="predicted",
        ylabel="actual",
        title="confusion matrix (test set)",
    )
    fig.colorbar(im, ax=ax, label="count + 1 (log)")
    fig.tight_layout()
    return _save(fig, path)


def plot_misclassified(
    x: torch.Tensor, y: torch.Tensor, probs: torch.Tensor, shown: int, path: Path
) -> Path:
    pred = probs.argmax(1)
    wrong = torch.nonzero(pred != y).flatten()[:shown].tolist()
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        ax.imshow(x[i].view(28, 28).numpy(), cmap="gray_r")
        ax.set_title(
            f"#{i}: {int(y[i])}→{int(pred[i])} ({float(probs[i, pred[i]]):.2f})", fontsize=8
        )
    fig.suptitle(f"misclassified test digits (first {len(wrong)}: true→predicted (p))")
    fig.tight_layout()
    return _save(fig, path)


def run(params) -> dict:
    """The `evaluate` stage: model + test set -> metrics, predictions, figures, MLflow run."""
    from digits import tracking
    from digits.data import load_split
    from digits.files import FIGURES, HISTORY, METRICS, MODEL, PREDICTIONS, TEST_DATA
    from digits.model import load_model
    from digits.train import evaluate_logits, read_history

    model = load_model(MODEL)
    test_x, test_y = load_split(TEST_DATA, "test")
    logits = evaluate_logits(model, test_x, params.evaluate.batch_size)
    probs = torch.softmax(logits, 1)
    pred = logits.argmax(1)
    metrics = compute_metrics(logits, test_y)
    history = read_history(HISTORY)
    figures = [
        plot_history(history, FIGURES / "training_curves.png"),
        plot_confusion(test_y, pred, FIGURES / "confusion_matrix.png"),
        plot_misclassified(
            test_x,
            test_y,
            probs,
            params.evaluate.misclassified_shown,
            FIGURES / "misclassified.png",
        ),
    ]
    write_predictions(PREDICTIONS, test_y, pred)
    write_metrics(METRICS, metrics)
    print(
        f"evaluate: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}, "
        f"macro F1 {metrics['macro_f1']:.4f}"
    )
    tracking.log_pipeline_run(params, metrics, history, figures, model, test_x[:2])
    return metrics
