"""The report files that stages hand to each other and that git keeps: the per-epoch history
(train writes, evaluate reads), the test metrics and the per-image predictions (evaluate
writes; DVC shows them). One module reads and writes each format, so they cannot drift apart.

Numbers are written with fixed rounding and no wall-clock times: the same run gives the same
bytes, which is what lets CI compare them with the committed files."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from digits.files import write_text

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"]


def write_history(path: Path, history: list[dict]) -> None:
    lines = [",".join(HISTORY_FIELDS)]
    for row in history:
        lines.append(
            ",".join(
                f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k])
                for k in HISTORY_FIELDS
            )
        )
    write_text(path, "\n".join(lines) + "\n")


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def write_metrics(path: Path, metrics: dict) -> None:
    write_text(path, json.dumps(metrics, indent=2) + "\n")


def read_metrics(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_predictions(path: Path, actual: Sequence[int], predicted: Sequence[int]) -> None:
    """One row per test image: what DVC's `confusion` plot template reads."""
    rows = "\n".join(f"{a},{p}" for a, p in zip(actual, predicted, strict=True))
    write_text(path, "actual,predicted\n" + rows + "\n")
