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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from digits.core.files import write_text

if TYPE_CHECKING:
    from digits.model.inference import Classifier

WILD_METRICS = Path("reports/wild.json")


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


def run(store: Any, run_id: str, classifier: Classifier, test: tuple[np.ndarray, np.ndarray]):
    """The evaluate stage's one call: measure, write reports/wild.json, log to the run."""
    m = measure(classifier, test)
    write(m)
    log(store, run_id, m)
    d, n = m["digits"], m["non_digits"]
    print(
        f"evaluate: outside MNIST: digits read {d['read']:.4f}, refused {d['refused']:.4f}, "
        f"misread {d['misread']:.4f} (worst set read {d['worst_read']:.4f}); non-digits refused "
        f"{n['refused']:.4f}; AUROC {m['auroc']:.4f}"
    )
    return m
