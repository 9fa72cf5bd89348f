"""The prediction log: every answer of `digits app` (and of `digits predict` unless --no-log),
and the corrections people send for them, in a real database through SQLAlchemy: SQLite by
default (`predictions.db` beside the MLflow store's `mlflow.db`), or any SQLAlchemy URL given
with --log-db, e.g. the team's PostgreSQL (one log for every replica).

Two tables (docs/service.md lists the columns):

- `predictions`: one row per answer: when (UTC), the prediction id, the model's registered name,
  version and the URI asked for, the answer (reading, number, digit, guess, confidence, and per
  piece its box, digit, guess, confidence and ten probabilities, as JSON), and what the model
  saw: each piece's 28x28 image as 784 bytes (uint8, row-major), concatenated. The pixels, not
  a hidden layer: they are what any later drift check or any later model can be run on, and
  a corrected answer's pixels are a training example in MNIST's own format;
- `feedback`: corrections (`POST /feedback`): the prediction, the piece, the label people say
  is right (`"0"`..`"9"` or `"not a digit"`), when, and where it came from (client address and
  user agent): untrusted input, kept for review, never fed to a model.

Writing is off the request path: `PredictionLog.add` puts the answer on a bounded queue and a
thread writes batches (every `interval` seconds or `batch` rows, one transaction each). A
database that is down or full never fails an answer: a batch that cannot be written is dropped
and counted (`dropped`), as is an answer that finds the queue full, and the service goes on.
The same thread deletes rows older than the retention setting."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from digits.core.errors import DigitsError, first_line, redact

LABELS = [str(d) for d in range(10)] + ["not a digit"]
NOT_A_DIGIT = "not a digit"


class LogError(DigitsError):
    pass


class UnknownPrediction(LogError):
    pass


def new_id() -> str:
    """A prediction id: 32 hex digits (uuid4), unguessable, unique across replicas."""
    return uuid.uuid4().hex


def now() -> dt.datetime:
    """UTC, without a zone: the same in SQLite's text and PostgreSQL's `timestamp`."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _tables():
    from sqlalchemy import (
        JSON,
        Column,
        DateTime,
        Float,
        ForeignKey,
        Integer,
        LargeBinary,
        MetaData,
        String,
        Table,
        Text,
    )

    meta = MetaData()
    predictions = Table(
        "predictions",
        meta,
        Column("id", String(32), primary_key=True),
        Column("at", DateTime, nullable=False, index=True),
        Column("source", String(16), nullable=False),  # "app" or "predict"
        Column("model_name", String(256)),
        Column("model_version", String(32)),
        Column("model_uri", Text),
        Column("reading", String(256), nullable=False),  # digits, "?" for a refused piece
        Column("number", String(256)),  # null unless every piece is a digit
        Column("digit", Integer),  # a one-piece answer's digit (null: not a digit)
        Column("guess", Integer),
        Column("confidence", Float),
        Column("pieces", Integer, nullable=False),
        Column("answer", JSON),  # per piece: box, digit, guess, confidence, probabilities
        Column("inputs", LargeBinary),  # 784 bytes per piece: what the model saw
    )
    feedback = Table(
        "feedback",
        meta,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column(
            "prediction_id",
            String(32),
            ForeignKey("predictions.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        Column("at", DateTime, nullable=False),
        Column("piece", Integer, nullable=False),
        Column("label", String(16), nullable=False),
        Column("client", String(256)),
        Column("user_agent", String(512)),
    )
    return meta, predictions, feedback


@functools.cache
def tables():
    """(metadata, predictions, feedback), built on first use (SQLAlchemy is imported then)."""
    return _tables()


def engine(url: str):
    """A SQLAlchemy engine for the log. SQLite: WAL (several workers write, readers never
    wait), a busy timeout, foreign keys on. A bad URL is one line naming it."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        if url.startswith("sqlite"):
            eng = create_engine(url, connect_args={"timeout": 10})

            @event.listens_for(eng, "connect")
            def _pragmas(conn, _record) -> None:
                cur = conn.cursor()
                for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
                    cur.execute(f"PRAGMA {pragma}")
                cur.close()

            return eng
        args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
        return create_engine(url, pool_pre_ping=True, connect_args=args)
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as e:
        raise LogError(
            f"--log-db {redact(url)}: not a database URL SQLAlchemy can open ({first_line(e)}); "
            "expected e.g. sqlite:///predictions.db or postgresql://user@host/db"
        ) from None


def create(eng) -> None:
    """The tables, where missing. Two services starting at once may both try: the loser of
    that race finds them made and goes on."""
    meta = tables()[0]
    try:
        meta.create_all(eng, checkfirst=True)
    except Exception:  # a concurrent CREATE; the second try sees the tables
        meta.create_all(eng, checkfirst=True)


@dataclass(frozen=True)
class Entry:
    """One answer, as the request path hands it over (the writer makes the row)."""

    id: str
    at: dt.datetime
    source: str
    model: dict  # name, version, uri
    record: dict  # the answer, as the service gives it
    inputs: bytes  # 784 uint8 per piece


def row(e: Entry) -> dict:
    r = e.record
    pieces = r.get("digits", [])
    return {
        "id": e.id,
        "at": e.at,
        "source": e.source,
        "model_name": e.model.get("name"),
        "model_version": e.model.get("version"),
        "model_uri": e.model.get("uri"),
        "reading": r.get("reading", ""),
        "number": r.get("number"),
        "digit": r.get("digit") if len(pieces) == 1 else None,
        "guess": r.get("guess") if len(pieces) == 1 else None,
        "confidence": r.get("confidence") if len(pieces) == 1 else None,
        "pieces": len(pieces),
        "answer": pieces,
        "inputs": e.inputs,
    }


def pixels(images) -> bytes:
    """What the model saw of each piece ((784,) float32 in [0, 1]) as 784 bytes each."""
    import numpy as np

    if not images:
        return b""
    return (np.stack(images) * 255 + 0.5).clip(0, 255).astype(np.uint8).tobytes()


def write(eng, entries: list[Entry]) -> None:
    """Append entries in one transaction (raises on a database error)."""
    _, predictions, _ = tables()
    with eng.begin() as conn:
        conn.execute(predictions.insert(), [row(e) for e in entries])


def prune(eng, days: float) -> int:
    """Delete answers (and their corrections) older than `days`; how many answers went."""
    from sqlalchemy import delete, select

    _, predictions, feedback = tables()
    cutoff = now() - dt.timedelta(days=days)
    old = select(predictions.c.id).where(predictions.c.at < cutoff)
    with eng.begin() as conn:
        conn.execute(delete(feedback).where(feedback.c.prediction_id.in_(old)))
        return conn.execute(delete(predictions).where(predictions.c.at < cutoff)).rowcount


class PredictionLog:
    """The writer of one process: `add` never blocks and never raises; a thread writes."""

    def __init__(
        self,
        url: str,
        *,
        retention_days: float = 30.0,
        batch: int = 500,
        interval: float = 0.2,
        capacity: int = 20000,
        say=None,
        on_write=None,
    ):
        self.url, self.retention_days = url, retention_days
        self.batch, self.interval = batch, interval
        self.queue: queue.Queue = queue.Queue(maxsize=capacity)
        self.written = 0
        self.dropped = 0
        self.last_error: str | None = None
        self.say = say or (lambda text: print(f"digits: {text}", file=sys.stderr, flush=True))
        self.on_write = on_write or (lambda written, dropped: None)
        self.engine = engine(url)
        self._ready = False
        self._said_at = 0.0
        self._pruned_at = -float("inf")  # the first prune comes with the first write
        self._thread = threading.Thread(target=self._run, name="digits-predlog", daemon=True)
        self._stop = object()

    def start(self) -> PredictionLog:
        self._thread.start()
        return self

    def add(self, entry: Entry) -> None:
        try:
            self.queue.put_nowait(entry)
        except queue.Full:  # the database is slower than the answers, or down: drop, count
            self.dropped += 1
            self.on_write(0, 1)

    @property
    def pending(self) -> int:
        return self.queue.qsize()

    def close(self, timeout: float = 30) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread.is_alive():
            self.queue.put(self._stop)
            self._thread.join(timeout)
        self.engine.dispose()

    def stats(self) -> dict:
        return {
            "database": redact(self.url),
            "written": self.written,
            "dropped": self.dropped,
            "queued": self.pending,
            "last_error": self.last_error,
        }

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self.queue.get(timeout=60)
            except queue.Empty:
                self._maybe_prune()
                continue
            entries: list[Entry] = []
            if first is self._stop:
                stopping = True
            else:
                entries.append(first)
            deadline = time.monotonic() + self.interval
            while not stopping and len(entries) < self.batch:
                left = deadline - time.monotonic()
                try:
                    item = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is self._stop:
                    stopping = True
                else:
                    entries.append(item)
            if stopping:  # drain what is left
                with contextlib.suppress(queue.Empty):
                    while True:
                        item = self.queue.get_nowait()
                        if item is not self._stop:
                            entries.append(item)
            for start in range(0, len(entries), self.batch):
                self._write(entries[start : start + self.batch])
            self._maybe_prune()

    def _write(self, entries: list[Entry]) -> None:
        try:
            if not self._ready:
                create(self.engine)
                self._ready = True
            write(self.engine, entries)
        except Exception as e:  # a database down or full: count it, go on
            self.dropped += len(entries)
            self.last_error = first_line(e)[:300]
            self.on_write(0, len(entries))
            if time.monotonic() - self._said_at > 30:  # a line, not one per batch
                self._said_at = time.monotonic()
                self.say(
                    f"warning: prediction log {redact(self.url)}: {len(entries)} answer(s) not "
                    f"written ({self.last_error}); the service goes on"
                )
            return
        self.written += len(entries)
        self.last_error = None
        self.on_write(len(entries), 0)

    def _maybe_prune(self) -> None:
        """Once an hour (and after the first batch written), the answers past retention go."""
        if time.monotonic() - self._pruned_at < 3600 or not self._ready:
            return
        self._pruned_at = time.monotonic()
        try:
            prune(self.engine, self.retention_days)
        except Exception as e:  # the next hour tries again
            self.last_error = first_line(e)[:300]


def find(eng, prediction_id: str) -> int | None:
    """The number of pieces of a logged answer, None when there is no such answer."""
    from sqlalchemy import select

    _, predictions, _ = tables()
    with eng.connect() as conn:
        got = conn.execute(
            select(predictions.c.pieces).where(predictions.c.id == prediction_id)
        ).first()
    return None if got is None else int(got[0])


def add_feedback(
    eng, prediction_id: str, label: str, piece: int, client: str | None, agent: str | None
) -> int:
    """Store a correction; its id."""
    _, _, feedback = tables()
    with eng.begin() as conn:
        result = conn.execute(
            feedback.insert().values(
                prediction_id=prediction_id,
                at=now(),
                piece=piece,
                label=label,
                client=(client or "")[:256] or None,
                user_agent=(agent or "")[:512] or None,
            )
        )
        return int(result.inserted_primary_key[0])


def log_now(url: str, entries: list[Entry]) -> str | None:
    """Write `entries` at once (`digits predict`): None, or why they could not be written."""
    if not entries:
        return None
    try:
        eng = engine(url)
    except LogError as e:
        return str(e)
    try:
        create(eng)
        write(eng, entries)
        return None
    except Exception as e:  # the answers are printed already; say, go on
        return first_line(e)
    finally:
        eng.dispose()
