"""What the pipeline's stages record for monitoring and learn from corrections: the evaluate
stage's hooks (a version's reference; its accuracy on the feedback hold-out), and the feedback
set as train, evaluate and the gate read it. Kept here, beside what uses them, so each stage
calls it in a line or two.

The feedback set (`feedback/examples.npz`, written by `digits feedback export`) is a DVC-tracked
dataset: git commits `feedback/examples.npz.dvc` (its hash), DVC's cache and remote hold the
file. The stages depend on the folder `feedback/` (the file is absent until the first export, and
a missing dependency would stop `dvc repro`), so DVC's lock records its hash and `dvc repro`
reruns the stages that read it when a new export is committed. No file: an empty set.
Its hold-out share is fixed by each example's content hash (`feedback.holdout_share`): an
example is held out or not whatever else the set holds, and a held-out one is never trained on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digits.core.errors import DigitsError
from digits.monitor import reference

FEEDBACK_DATA = Path("feedback/examples.npz")
FEEDBACK_REPORT = Path("reports/feedback.json")
# the hold-out a version was judged on, in the run that registered it: the gate's reference
# for the next version (digits.monitor.gatecheck), with the labels as they were then
HOLDOUT_DIR, HOLDOUT_FILE = "feedback", "holdout.npz"


class FeedbackDataError(DigitsError):
    pass


@dataclass(frozen=True)
class FeedbackSet:
    x: np.ndarray  # (N, 784) uint8
    y: np.ndarray  # (N,) int64, -1: not a digit
    sha256: np.ndarray  # (N,) the images' hashes, sorted

    def held_out(self, share: float) -> np.ndarray:
        """Which examples are held out: the first 32 bits of the hash below share * 2**32."""
        top = np.array([int(s[:8], 16) for s in self.sha256], np.float64)
        return top < share * 2.0**32

    def part(self, mask: np.ndarray) -> FeedbackSet:
        return FeedbackSet(self.x[mask], self.y[mask], self.sha256[mask])

    def __len__(self) -> int:
        return len(self.y)


def save_feedback(data: FeedbackSet, path: Path) -> None:
    """`data` as digits feedback export writes a set (x, y, sha256)."""
    with open(path, "wb") as fh:
        np.savez(fh, x=data.x, y=data.y, sha256=data.sha256)


def load_feedback(path: Path = FEEDBACK_DATA) -> FeedbackSet:
    """The feedback set; an empty one where the file is absent."""
    if not path.is_file():
        return FeedbackSet(np.zeros((0, 784), np.uint8), np.zeros(0, np.int64), np.zeros(0, "U64"))
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y, sha = f["x"], f["y"], f["sha256"]
    except (OSError, ValueError, KeyError) as e:
        raise FeedbackDataError(f"{path}: not a feedback set written by digits feedback export "
                                f"({e})") from None  # fmt: skip
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 784 or len(y) != len(x) != len(sha):
        raise FeedbackDataError(f"{path}: x {x.dtype}{x.shape}, y {y.shape}: expected uint8 "
                                "(N, 784) images and N labels")  # fmt: skip
    if len(y) and (y.min() < -1 or y.max() > 9):
        raise FeedbackDataError(f"{path}: labels outside -1..9")
    return FeedbackSet(x, y.astype(np.int64), sha)


def record_reference(store, run_id: str) -> dict:
    """The evaluate stage's hook: the version's reference on the validation split, written to
    reports/reference.json (a DVC output) and logged into the run that registers the version
    (`reference/reference.json`), where `digits monitor` finds it."""
    from digits.core.files import MODEL, TRAIN_DATA, atomic_path
    from digits.model.inference import Classifier

    with np.load(TRAIN_DATA, allow_pickle=False) as f:
        val = f["val_x"]
    ref = reference.of_classifier(Classifier.from_file(MODEL), val.reshape(len(val), -1))
    reference.FILE.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(reference.FILE) as tmp:
        tmp.write_text(reference.dumps(ref))
    with store.writing() as client:
        client.log_artifact(run_id, str(reference.FILE), reference.ARTIFACT)
    return ref


def holdout_correct(classifier, data: FeedbackSet) -> np.ndarray:
    """Per held-out example, whether the model's answer is its label ("not a digit": refused)."""
    if not len(data):
        return np.zeros(0, bool)
    said = classifier.answers(data.x.astype(np.float32) / np.float32(255))
    return np.asarray(said.digit == data.y, bool)


def record_feedback(store, run_id: str, share: float) -> dict:
    """The evaluate stage's hook: the model's accuracy on the feedback hold-out, written to
    reports/feedback.json (its own file: metrics.json keeps its keys when there is no feedback)
    and, when there is a hold-out, logged as `feedback/accuracy` and `feedback/holdout_size`,
    and the hold-out itself as the run's artifact `feedback/holdout.npz`."""
    from digits.core.files import MODEL, atomic_path
    from digits.model.inference import Classifier

    data = load_feedback()
    held = data.held_out(share)
    correct = np.zeros(0, bool)
    if held.any():  # no model loaded for nothing
        correct = holdout_correct(Classifier.from_file(MODEL), data.part(held))
    summary = {
        "examples": len(data),
        "holdout_size": int(held.sum()),
        "accuracy": round(float(np.mean(correct)), 6) if len(correct) else None,
    }
    FEEDBACK_REPORT.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(FEEDBACK_REPORT) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    if len(correct):
        import tempfile

        with store.writing() as client, tempfile.TemporaryDirectory() as tmp:
            client.log_metric(run_id, "feedback/accuracy", summary["accuracy"])
            client.log_metric(run_id, "feedback/holdout_size", summary["holdout_size"])
            save_feedback(data.part(held), Path(tmp) / HOLDOUT_FILE)
            client.log_artifact(run_id, str(Path(tmp) / HOLDOUT_FILE), HOLDOUT_DIR)
    return summary
