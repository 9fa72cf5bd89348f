"""A window of the prediction log, read in bulk: SQLAlchemy Core, one query for the answers and
one for their corrections, columns straight into numpy (the 784-byte pieces joined and viewed
as one uint8 array). The log's schema is digits.serve.predlog's (the service writes it); this
layer sits below serve, so it names the columns it reads with lightweight `table()` clauses,
and tests/test_monitor.py checks them against predlog's tables."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field

import numpy as np

from digits.core.errors import DigitsError, first_line, redact
from digits.monitor.features import PIXELS

NOT_A_DIGIT = "not a digit"


class WindowError(DigitsError):
    pass


def now() -> dt.datetime:
    """UTC, without a zone: as the log stores times."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def since(text: str, now: dt.datetime) -> dt.datetime:
    """The window's start: a duration back from `now` (`24h`, `90m`, `7d`) or an ISO 8601
    time (UTC unless it names a zone); naive UTC, as the log stores times."""
    if m := _DURATION.fullmatch(text.strip()):
        return now - dt.timedelta(seconds=float(m[1]) * _UNIT[m[2]])
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise WindowError(
            f"--since {text!r}: expected a duration such as 24h, 90m, 7d or an ISO 8601 time"
        ) from None
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo else t


def _tables():
    from sqlalchemy import JSON, DateTime, Float, Integer, LargeBinary, String, column, table

    predictions = table(
        "predictions",
        column("id", String),
        column("at", DateTime),
        column("model_name", String),
        column("model_version", String),
        column("pieces", Integer),
        column("digit", Integer),
        column("confidence", Float),
        column("answer", JSON),
        column("inputs", LargeBinary),
    )
    feedback = table(
        "feedback",
        column("id", Integer),
        column("prediction_id", String),
        column("at", DateTime),
        column("piece", Integer),
        column("label", String),
        column("client", String),
        column("user_agent", String),
    )
    return predictions, feedback


@dataclass
class Window:
    """The pieces answered in a window: per piece its answer and pixels; and the corrections
    of those answers (piece index into the arrays, the label)."""

    start: dt.datetime
    end: dt.datetime
    answers: int  # logged answers (a blank picture is an answer of no piece)
    digit: np.ndarray  # (N,) int64, -1: not a digit
    confidence: np.ndarray  # (N,) float64
    pixels: np.ndarray  # (N, 784) uint8
    corrected: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # piece index
    labels: list[str] = field(default_factory=list)  # the label of each correction

    @property
    def pieces(self) -> int:
        return len(self.digit)


def read(
    eng, name: str, version: str, start: dt.datetime, end: dt.datetime, skip_feedback=frozenset()
) -> Window:
    """The answers `name` version `version` gave in [start, end), and their corrections (the
    latest per piece; feedback ids in `skip_feedback`, e.g. rejected ones, left out)."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    predictions, feedback = _tables()
    p = predictions.c
    where = (p.at >= start, p.at < end, p.model_name == name, p.model_version == str(version))
    try:
        with eng.connect() as conn:
            rows = conn.execute(
                select(p.id, p.pieces, p.digit, p.confidence, p.inputs).where(*where).order_by(p.at)
            ).all()
            many = {
                r.id: r.answer
                for r in conn.execute(select(p.id, p.answer).where(*where, p.pieces > 1))
            }
            fb = conn.execute(
                select(feedback.c.id, feedback.c.prediction_id, feedback.c.piece, feedback.c.label)
                .join_from(feedback, predictions, feedback.c.prediction_id == p.id)
                .where(*where)
                .order_by(feedback.c.at, feedback.c.id)
            ).all()
    except SQLAlchemyError as e:
        raise WindowError(f"prediction log {redact(str(eng.url))}: {first_line(e)}") from None
    ids, pieces, digit, conf, blobs = zip(*rows, strict=True) if rows else ((),) * 5
    counts = np.asarray(pieces, np.int64)
    one = counts == 1
    # one-piece answers (the common case) come from their columns; numbers from their JSON
    d = np.where(one, np.asarray([-1 if v is None else v for v in digit], np.int64), -1)
    c = np.asarray([0.0 if v is None else v for v in conf], np.float64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    out_d = np.full(total, -1, np.int64)
    out_c = np.zeros(total, np.float64)
    out_d[offsets[:-1][one]] = d[one]
    out_c[offsets[:-1][one]] = c[one]
    for i in np.flatnonzero(counts > 1):
        answer = many.get(ids[i])
        answer = json.loads(answer) if isinstance(answer, str) else answer or []
        for j, piece in enumerate(answer[: counts[i]]):
            out_d[offsets[i] + j] = -1 if piece.get("digit") is None else int(piece["digit"])
            out_c[offsets[i] + j] = float(piece.get("confidence") or 0.0)
    data = b"".join(b or b"" for b in blobs)
    if len(data) != total * PIXELS:
        raise WindowError(
            f"prediction log: {len(data)} bytes of pieces for {total} pieces; expected "
            f"{PIXELS} bytes (28x28 uint8) each"
        )
    pixels = np.frombuffer(data, np.uint8).reshape(total, PIXELS)
    row = {pid: i for i, pid in enumerate(ids)}
    latest: dict[tuple[str, int], str] = {}  # the latest correction of each piece
    for fid, pid, piece, label in fb:
        if fid not in skip_feedback and 0 <= piece < counts[row[pid]]:
            latest[(pid, int(piece))] = label
    index = [int(offsets[row[pid]]) + piece for (pid, piece) in latest]
    return Window(
        start,
        end,
        len(rows),
        out_d,
        out_c,
        pixels,
        np.asarray(index, np.int64),
        list(latest.values()),
    )


def accuracy(window: Window) -> tuple[float | None, int]:
    """(share of corrected pieces whose answer was the label given, how many): a label of
    "not a digit" is right when the piece was refused."""
    if not window.labels:
        return None, 0
    said = window.digit[window.corrected]
    right = [
        (s < 0) if label == NOT_A_DIGIT else (s == int(label))
        for s, label in zip(said.tolist(), window.labels, strict=True)
    ]
    return float(np.mean(right)), len(right)
