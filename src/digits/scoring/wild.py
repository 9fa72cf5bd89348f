"""What the evaluate stage measures outside MNIST: the report halves of digits.data.wild's sets
(digits from other writers, fonts, scanners and pens; shapes, signs, scribbles, photo crops),
scored by the model as users run it (digits.model.inference) at the threshold in its file.

The figures go to `reports/wild.json` (a DVC metrics file of its own, so reports/metrics.json
keeps its bytes), to the evaluate run in MLflow as `wild/...`, and into the model card
(digits.scoring.card). The gate judges the worst digit set's read and refused shares and the
non-digits refused (`gates.min_wild_read`, `max_wild_refused`, `min_wild_refused_non_digits`).
The validation halves are for choosing (benchmarks/wild_recipe.py); nothing is chosen here."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digits.core.errors import DigitsError
from digits.core.files import write_text

if TYPE_CHECKING:
    from digits.model.inference import Classifier

WILD_METRICS = Path("reports/wild.json")


class WildReportError(DigitsError):
    """reports/wild.json missing or not what evaluate writes, while a gate needs it."""


@dataclass(frozen=True, kw_only=True)
class WildFigures:
    """What the gate reads of reports/wild.json (digits.gate.policy's `wild` section)."""

    worst_read: float  # the digit set read right least
    worst_read_set: str
    worst_refused: float  # the digit set refused most
    worst_refused_set: str
    digits_read: float  # all wild digits pooled
    non_digits_refused: float
    non_digits: int
    auroc: float

    @classmethod
    def from_dict(cls, m: dict) -> WildFigures:
        d, n = m["digits"], m["non_digits"]
        sets = d["sets"]
        return cls(
            worst_read=d["worst_read"],
            worst_read_set=min(sets, key=lambda k: sets[k]["read"]),
            worst_refused=d["worst_refused"],
            worst_refused_set=max(sets, key=lambda k: sets[k]["refused"]),
            digits_read=d["read"],
            non_digits_refused=n["refused"],
            non_digits=n["images"],
            auroc=m["auroc"],
        )


def read(path: Path = WILD_METRICS) -> WildFigures:
    """The gate's view of the figures evaluate wrote for this model file."""
    try:
        return WildFigures.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise WildReportError(
            f"{path}: not found; the evaluate stage writes it (dvc repro evaluate)"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise WildReportError(
            f"{path}: not the figures evaluate writes ({type(e).__name__}: {e})"
        ) from None


def measure(classifier: Classifier, test: tuple[np.ndarray, np.ndarray]) -> dict:
    """The report halves scored: digits.model.ood.measure_wild's figures, plus the sources'
    hashes. `test` = the test images and labels (`lowres` and `pens` redraw test digits)."""
    from digits.data import wild
    from digits.model import ood

    digits, others = {}, {}
    for name, s in wild.make_all("report", test).items():
        probs = classifier.probabilities(s.images)
        if s.labels is not None:
            digits[name] = (probs, s.labels)
        else:
            others[name] = probs
    return ood.measure_wild(digits, others, classifier.threshold)


def flat(m: dict) -> dict[str, float]:
    """The figures as MLflow metrics: `wild/auroc`, `wild/digits/read`, `wild/<set>/read`, ..."""
    out = {"wild/auroc": m["auroc"]}
    for group in ("digits", "non_digits"):
        g = m[group]
        out |= {f"wild/{group}/{k}": v for k, v in g.items() if not isinstance(v, dict)}
        for name, figures in g["sets"].items():
            out |= {f"wild/{name}/{k}": v for k, v in figures.items()}
    return {k: float(v) for k, v in out.items()}


def write(m: dict, path: Path = WILD_METRICS) -> None:
    write_text(path, json.dumps(m, indent=2) + "\n")


def log(store: Any, run_id: str, m: dict) -> None:
    """The figures into the evaluate run (one batch)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(k, v, now, 0) for k, v in sorted(flat(m).items())]
    with store.writing() as client:
        client.log_batch(run_id, metrics=rows)


def run(store: Any, run_id: str, test: tuple[np.ndarray, np.ndarray]) -> dict:
    """The evaluate stage's one call: the model file measured on the report halves,
    reports/wild.json written, the figures logged into the run."""
    from digits.core.files import MODEL
    from digits.model.inference import Classifier

    m = measure(Classifier.from_file(MODEL), test)
    write(m)
    log(store, run_id, m)
    d, n = m["digits"], m["non_digits"]
    print(
        f"evaluate: outside MNIST: digits read {d['read']:.4f}, refused {d['refused']:.4f}, "
        f"misread {d['misread']:.4f} (worst set read {d['worst_read']:.4f}); non-digits refused "
        f"{n['refused']:.4f}; AUROC {m['auroc']:.4f}"
    )
    return m
