"""The report files that stages hand to each other and that git keeps: the per-epoch history
(train writes, evaluate reads), the test metrics and the per-image predictions (evaluate
writes; DVC shows them). One module reads and writes each format, so they cannot drift apart.

Numbers are written with fixed rounding and no wall-clock times: the same run gives the same
bytes, which is what lets CI compare them with the committed files. (When and how fast a run
trained belongs to its MLflow run, not to a file DVC tracks: see digits.tracking.runs.)"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from digits.core.errors import DigitsError
from digits.core.files import write_text
from digits.core.metrics import Evaluation


class ReportError(DigitsError):
    pass


@dataclass(frozen=True, kw_only=True)
class Epoch:
    """One row of the training history."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float = 0.0  # wall clock: logged to MLflow, never written to the history file

    def metrics(self) -> dict[str, float]:
        """The row as MLflow metrics (step = epoch; the wall clock as `epoch_seconds`)."""
        out = {f.name: float(getattr(self, f.name)) for f in fields(self)}
        out["epoch_seconds"] = out.pop("seconds")
        del out["epoch"]
        return out

    def as_dict(self) -> dict:
        return asdict(self)


HISTORY_FIELDS = [f.name for f in fields(Epoch) if f.name != "seconds"]


def write_history(path: Path, history: Sequence[Epoch]) -> None:
    lines = [",".join(HISTORY_FIELDS)]
    for row in history:
        values = [getattr(row, k) for k in HISTORY_FIELDS]
        lines.append(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values))
    write_text(path, "\n".join(lines) + "\n")


def read_history(path: Path) -> list[Epoch]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [
            Epoch(
                epoch=int(row["epoch"]),
                train_loss=float(row["train_loss"]),
                train_accuracy=float(row["train_accuracy"]),
                val_loss=float(row["val_loss"]),
                val_accuracy=float(row["val_accuracy"]),
                lr=float(row["lr"]),
            )
            for row in rows
        ]
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; the train stage writes it") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ReportError(f"{path}: not a training history ({e})") from None


def write_metrics(path: Path, evaluation: Evaluation) -> None:
    write_text(path, evaluation.to_json())


def write_predictions(path: Path, actual: Sequence[int], predicted: Sequence[int]) -> None:
    """One row per test image: what DVC's `confusion` plot template reads."""
    rows = "\n".join(f"{a},{p}" for a, p in zip(actual, predicted, strict=True))
    write_text(path, "actual,predicted\n" + rows + "\n")
