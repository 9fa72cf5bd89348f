"""A registered version's score on the test set, cached in the registry (the version tag
`gate.score`), so the gate judges without loading models it has seen before.

The evaluate stage writes the record of the version it registers: it has just scored the same
weights on the same test set, so the gate need not load the model again (loading one through
pyfunc cost the gate 5 s of its 12). The gate writes the record of any version it had to score
itself (a champion from before this cache, or whose record no longer matches).

A record is used only while its key matches what would be scored now:
- `model_sha256`: the model's files as the registry serves them (downloaded, then hashed), so a
  changed artifact is scored again;
- `test_sha256`: the processed test set's file;
- `scorer_sha256`: the scoring code (SCORER_MODULES: the scorer that composes the record, the
  metrics and their records, calibration, the outlier suite), so a changed definition of
  accuracy, loss or FPR95, or a change in what a score holds, scores everything again.
The corruption accuracies ride along with their own key, the sha256 of scoring/robustness.py
and model/augment.py (whose `square_mask` the occlusion uses).
A record whose accuracy disagrees with its own per-image results is not trusted either.

Only numpy, the standard library and the records (digits.core.metrics) at import (MLflow
inside `download_model`): the gate imports this without torch."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from digits.core.files import file_digest
from digits.core.metrics import Evaluation

CACHE_TAG = "gate.score"
CACHE_FORMAT = 1  # of the record in CACHE_TAG: bump when what a score means changes


@dataclass(kw_only=True)
class Score:
    version: str
    evaluation: Evaluation  # robustness in it only when the record has current ones
    correct: np.ndarray  # bool per test image: the prediction was right
    model_sha256: str
    cached: bool = False  # read from the record, not computed in this process
    by: str = "gate"  # who computed it: "evaluate" (the stage that registered it) or "gate"

    @property
    def accuracy(self) -> float:
        return self.evaluation.accuracy


def files_sha256(folder: Path) -> str:
    """sha256 over a model folder: every file's path and bytes, in sorted order. What is
    hashed is exactly what pyfunc loads and scores."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(file_digest(path)))
    return h.hexdigest()


def download_model(name: str, version: str, dst: str) -> Path:
    """The version's model files, as the registry serves them, in a folder under `dst`: what
    `files_sha256` keys a record by, for the stage that writes it and the gate that reads it."""
    import mlflow.artifacts

    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=dst)
    )


# the code a score's numbers come from: the scorer that composes the record, the metrics and
# the records, the calibration error, the outlier suite and its measures (read as text:
# importing them would load Pillow and matplotlib's fonts)
PACKAGE = Path(__file__).parent.parent  # src/digits: the paths below are relative to it
SCORER_MODULES = (
    "scoring/scorer.py",
    "core/metrics.py",
    "model/calibration.py",
    "model/ood.py",
    "data/outliers.py",
    "data/imaging.py",
)


def _code_sha256(*module_files: str) -> str:
    h = hashlib.sha256(f"format {CACHE_FORMAT}\0".encode())
    for name in module_files:
        h.update((PACKAGE / name).read_bytes())
    return h.hexdigest()


def scorer_sha256() -> str:
    """The scoring code's identity: a cached score is reused only if accuracy, loss, recall,
    calibration error and the outlier figures are still computed by the same code."""
    return _code_sha256(*SCORER_MODULES)


def robustness_sha256() -> str:
    """The corruption suite's identity (its files, read as text: importing them loads torchvision;
    the occlusion's square comes from the augmentation's `square_mask`)."""
    return _code_sha256("scoring/robustness.py", "model/augment.py")


def encode_correct(correct: np.ndarray) -> str:
    # one bit per image, deflated: 10,000 images of a 98% model take about 300 characters
    return base64.b64encode(zlib.compress(np.packbits(correct).tobytes(), 9)).decode()


def decode_correct(text: str, n: int) -> np.ndarray:
    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8)
    return np.unpackbits(bits)[:n].astype(bool)


def cache_record(score: Score, test_sha256: str) -> str:
    rec = {
        "format": CACHE_FORMAT,
        "model_sha256": score.model_sha256,
        "test_sha256": test_sha256,
        "scorer_sha256": scorer_sha256(),
        "n": len(score.correct),
        "metrics": score.evaluation.to_dict(robustness=False),
        "correct": encode_correct(score.correct),
        "by": score.by,
    }
    if score.evaluation.robustness is not None:
        rec["robustness"] = asdict(score.evaluation.robustness)
        rec["robustness_sha256"] = robustness_sha256()
    return json.dumps(rec, sort_keys=True)


def from_cache(
    text: str | None, version: str, model_sha256: str, test_sha256: str, n: int
) -> Score | None:
    """The Score in a cache record whose key matches, else None."""
    try:
        rec = json.loads(text or "")
        key = (rec["format"], rec["model_sha256"], rec["test_sha256"], rec["scorer_sha256"])
        if key != (CACHE_FORMAT, model_sha256, test_sha256, scorer_sha256()) or rec["n"] != n:
            return None
        correct = decode_correct(rec["correct"], n)
        # corruption accuracies from other code than today's are left out (scored again if due)
        current = rec.get("robustness_sha256") == robustness_sha256()
        robustness = rec.get("robustness") if current else None
        evaluation = Evaluation.from_dict(rec["metrics"], robustness)
        # a record that contradicts itself is not trusted
        if len(correct) != n or round(float(correct.mean()), 6) != evaluation.accuracy:
            return None
        return Score(
            version=version,
            evaluation=evaluation,
            correct=correct,
            model_sha256=model_sha256,
            cached=True,
            by=rec.get("by", "gate"),
        )
    except (ValueError, KeyError, TypeError, AttributeError, zlib.error):
        return None
