"""`digits predict`: a user's image files -> digits, with the model from the MLflow registry.

Each image is first made to look like an MNIST digit (digits.data.imaging), then run through the
model as the registered version serves it (digits.model.inference).

This module is imported by the CLI's handler only. Torch is never imported (digits.model.inference
runs the model in numpy), and MLflow only where the store cannot be asked directly
(digits.tracking.resolve) or a version's weights must be downloaded."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from digits.core.errors import DigitsError
from digits.core.mnist import NUM_CLASSES
from digits.data.imaging import ImageError, read_image
from digits.data.segment import Piece, read_pieces
from digits.model.inference import Answers


def champion_uri(params_file: str | Path = "params.yaml") -> str:
    """`models:/<name>@champion`, the name from params.yaml's mlflow.registered_model (its
    default where there is no params.yaml here)."""
    from digits.core.config import MlflowParams, load_params

    path = Path(params_file)
    name = load_params(path).mlflow.registered_model if path.exists() else None
    return f"models:/{name or MlflowParams().registered_model}@champion"


def load_model(uri: str | None = None):
    """The model at `uri` (a registry URI, runs:/ URI or folder; default: the champion) in the
    configured store, ready to predict: its weights file read by digits.model.inference (no code
    from the registry runs), or, for a version of an earlier format, the pyfunc model.

    Which version a `models:/` URI names is asked of the store directly (digits.tracking.resolve: no
    MLflow import); its weights are then read in place (a local store), from
    digits.serve.model_cache (downloaded before) or downloaded through MLflow, and must have the
    sha256 the version was registered with. Other URIs go through MLflow.

    Returns an object with `probabilities((N, 784) float32) -> (N, 10)`."""
    from digits.model.inference import Classifier, weights_in
    from digits.serve import model_cache
    from digits.tracking import resolve
    from digits.tracking.store import sqlite_path, tracking_uri

    uri = uri or champion_uri()
    store = tracking_uri()
    db = sqlite_path(store)
    if uri.startswith("models:/") and db is not None and not db.exists():
        # MLflow would create an empty store there and then report that the model is missing.
        raise DigitsError(
            f"no MLflow store at {db}: train a model first (`dvc repro`), or set "
            "MLFLOW_TRACKING_URI to the store holding it"
        )
    if Path(uri).is_dir():
        return _from_folder(Path(uri), uri, store)
    found = resolve.lookup(store, uri)
    if found is not None:
        kept = model_cache.get(found.sha256) if found.sha256 else None
        if kept is not None:  # its bytes were just checked against the sha256 it is kept by
            return Classifier.from_file(kept)
        weights = found.local_weights()
        if weights is not None:
            _check_registered(weights, found, uri, store)
            return Classifier.from_file(weights)
    import tempfile

    # the download is read into memory (or kept in the cache), then removed
    with tempfile.TemporaryDirectory(prefix="digits-model-") as tmp:
        local = _download(uri, store, tmp)
        weights = weights_in(local)
        if weights is not None and found is not None and found.sha256:
            _check_registered(weights, found, uri, store)
            model_cache.keep(weights, found.sha256)
        return _from_folder(local, uri, store)


@dataclass(frozen=True)
class Served:
    """One loaded version. `name`/`version` are None where the URI is not a registry URI the
    store can be asked about (a folder, runs:/...)."""

    model: object
    uri: str  # what the user asked for, e.g. models:/mnist-mlp@champion
    name: str | None
    version: str | None
    loaded_at: float = field(default_factory=time.time)

    @property
    def record(self) -> dict:
        """What each answer says of its model."""
        return {"name": self.name, "version": self.version, "uri": self.uri}


def load_served(uri: str, store: str, version: str | None = None) -> Served:
    """Load what `uri` names now in `store` (or, with `version`, that version of its model):
    the version is resolved first and then loaded by number, so the model and the version it
    is said to be cannot disagree. Raises DigitsError (digits.serve.predict.load_model)."""
    from digits.tracking import resolve

    ref = resolve.parse(uri)
    name = ref[0] if ref else None
    if version is None and ref is not None:
        found = resolve.lookup(store, uri)
        version = found.version if found else (ref[2] if ref[2] else None)
    target = f"models:/{name}/{version}" if name and version else uri
    return Served(load_model(target), uri, name, version)


def _check_registered(weights: Path, found, uri: str, store: str) -> None:
    """The weights must be the bytes the version was registered from (what the gate scored)."""
    from digits.data.preprocess import file_digest

    if found.sha256 and (digest := file_digest(weights)) != found.sha256:
        raise DigitsError(
            f"model {uri} (version {found.version}) in {store}: its weights file {weights} has "
            f"sha256 {digest[:12]}..., but the version was registered from {found.sha256[:12]}"
            "...: it changed after registration; register the model again (`dvc repro`)"
        )


def _from_folder(local: Path, uri: str, store: str):
    """The model in a downloaded version's folder (or a folder the user named)."""
    from digits.core.errors import first_line
    from digits.model.inference import Classifier, weights_in

    weights = weights_in(local)
    if weights is not None:
        return Classifier.from_file(weights)
    import mlflow

    # a version of an earlier format: as users load it; suppress_warnings skips MLflow's
    # check of the installed packages against the model's (seconds per start)
    try:
        return _Pyfunc(mlflow.pyfunc.load_model(str(local), suppress_warnings=True))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise DigitsError(f"model {uri} in {store}: cannot load it ({first_line(e)})") from None


def _download(uri: str, store: str, tmp: str) -> Path:
    """The model's files from the registry `store`, into the folder `tmp`."""
    import mlflow

    try:
        where = {"tracking_uri": store, "registry_uri": store}  # not MLflow's global setting
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, **where))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        from digits.core.errors import first_line

        raise DigitsError(f"model {uri} in {store}: cannot load it ({first_line(e)})") from None


class _Pyfunc:
    """A pyfunc model (earlier versions' pt2) behind the same `probabilities` call."""

    def __init__(self, model):
        self.model = model

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict(x))


def probabilities(model, batch: np.ndarray) -> np.ndarray:
    """(N, 784) float32 -> (N, 10) class probabilities."""
    out = np.asarray(model.probabilities(np.ascontiguousarray(batch, dtype=np.float32)))
    if out.shape != (len(batch), NUM_CLASSES):
        raise DigitsError(f"the model returned shape {out.shape}, expected ({len(batch)}, 10)")
    return out


def answers(model, batch: np.ndarray) -> Answers:
    """What the model says of each image of `batch`: the digit or "not a digit" (a version of
    an earlier format, without a refusal threshold, names a digit for everything)."""
    if hasattr(model, "answers"):
        return model.answers(np.ascontiguousarray(batch, dtype=np.float32))
    return Answers.of(probabilities(model, batch), 0.0)


@dataclass(frozen=True)
class Reading:
    """What the model says of one picture: its digits' pieces, left to right ([] for a blank
    picture), and the answer for each (rows of `said`)."""

    pieces: list[Piece]
    said: Answers | None

    @property
    def reading(self) -> str:
        """The digits, "?" where a piece is not a digit."""
        return "".join(str(d) if d >= 0 else "?" for d in self.said.digit) if self.said else ""

    @property
    def number(self) -> str | None:
        """The number it holds, or None when a piece is not a digit (or it is blank)."""
        text = self.reading
        return text if text and "?" not in text else None


def read_all(model, pictures: list) -> list[Reading]:
    """The pieces of each picture (digits.data.segment), read in one call of the model."""
    pieces = [read_pieces(img, name) for img, name in pictures]
    flat = [p.image for ps in pieces for p in ps]
    said = answers(model, np.stack(flat)) if flat else None
    out, start = [], 0
    for ps in pieces:
        rows = slice(start, start + len(ps))
        part = None
        if ps and said is not None:
            part = Answers(said.digit[rows], said.guess[rows], said.confidence[rows],
                           said.probabilities[rows])  # fmt: skip
        out.append(Reading(ps, part))
        start += len(ps)
    return out


def main(args) -> int:
    """The `digits predict` handler: one line per image (or one JSON object with --json, which
    also names the model and, when logged, the prediction's id), in the order given; an image
    that cannot be read is reported on stderr by name, the others are still answered. A blank
    image is an answer, "not a digit (no ink)", not an error. The answers are then appended to
    the prediction log (digits.serve.predlog) unless --no-log: a log that cannot be written is
    one warning line, never a failed command."""
    from digits.core.errors import redact
    from digits.monitor import logdb
    from digits.serve import predlog
    from digits.tracking.store import tracking_uri

    store = tracking_uri()
    url = None
    if not getattr(args, "no_log", False):
        log_db = getattr(args, "log_db", None)
        url = logdb.log_url(log_db, store)
    served = load_served(args.model or champion_uri(), store)
    entries: list[predlog.Entry] = []
    failed = 0
    batch_size = 256  # print as we go for long lists, and keep memory flat
    for start in range(0, len(args.images), batch_size):
        pictures = []
        for name in args.images[start : start + batch_size]:
            try:
                pictures.append((read_image(name), name))
            except ImageError as e:
                print(f"digits predict: error: {e}", file=sys.stderr)
                failed += 1
        for (_, name), reading in zip(pictures, read_all(served.model, pictures), strict=True):
            record = reading_record(name, reading)
            if url is not None:
                record["prediction_id"] = pid = predlog.new_id()
                seen = predlog.pixels([p.image for p in reading.pieces])
                entries.append(
                    predlog.Entry(pid, predlog.now(), "predict", served.record, record, seen)
                )
            record["model"] = served.record
            print(json.dumps(record) if args.json else format_reading(name, reading, False))
    sys.stdout.flush()  # the answers first; the log after them
    if url is not None and (why := predlog.log_now(url, entries)):
        print(
            f"digits predict: warning: prediction log {redact(url)}: {why}; the answers "
            "above were not logged",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _piece(said: Answers, i: int) -> dict:
    digit = int(said.digit[i])
    return {
        "digit": digit if digit >= 0 else None,
        "guess": int(said.guess[i]),
        "confidence": round(float(said.confidence[i]), 6),
        "probabilities": [round(float(v), 6) for v in said.probabilities[i]],
    }


def _said(said: Answers, i: int, short: bool = False) -> str:
    digit, guess, confidence = int(said.digit[i]), int(said.guess[i]), float(said.confidence[i])
    if digit < 0:
        return f"not a digit (best guess {guess}, {confidence:.0%})"
    return f"{digit} {confidence:.0%}" if short else f"{digit} ({confidence:.1%})"


def reading_record(name: str, r: Reading) -> dict:
    """A picture's answer as `digits predict --json` gives it (format_reading says what)."""
    said = r.said
    if said is None or not r.pieces:
        empty = {"digit": None, "guess": None, "confidence": 0.0, "probabilities": None}
        return {"file": name, **empty, "number": None, "reading": "", "digits": []}
    pieces = [{"box": list(p.box), **_piece(said, i)} for i, p in enumerate(r.pieces)]
    record: dict = {"file": name}
    if len(pieces) == 1:
        record.update({k: v for k, v in pieces[0].items() if k != "box"})
    record.update({"number": r.number, "reading": r.reading, "digits": pieces})
    return record


def format_reading(name: str, r: Reading, as_json: bool) -> str:
    """One picture's answer. A digit: `7 (99.2%)` or `not a digit (best guess 7, 31%)`; a
    blank picture: `not a digit (no ink)`; a number: `2026 (2 99%, 0 97%, 2 99%, 6 95%)`, "?"
    for a piece that is not a digit. As JSON: "number" (null unless every piece is a digit),
    "reading", and "digits", each piece's box (top, left, bottom, right in the picture's
    pixels), digit (null: not a digit), guess, confidence and probabilities; a picture of one
    digit also has that piece's keys at the top, as `digits predict` always gave them."""
    if as_json:
        return json.dumps(reading_record(name, r))
    said = r.said
    if said is None or not r.pieces:  # a blank picture
        return f"{name}: not a digit (no ink)"
    if len(r.pieces) == 1:
        return f"{name}: {_said(said, 0)}"
    each = ", ".join(_said(said, i, short=True) for i in range(len(r.pieces)))
    return f"{name}: {r.reading} ({each})"
