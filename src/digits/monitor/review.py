"""Corrections become training data only after review (`digits feedback review / export`).

A correction is untrusted: anyone who can reach the page can send one. A label enters the
feedback dataset only once approved, by a person (`--approve ID`) or by the default rule: at
least `feedback.min_sources` distinct sources (client addresses) gave the same label for the
same image (the sha256 of the 784 pixels the model saw), and more sources than gave any other
label for it. Why this rule: one source, however many corrections it sends, can never approve
its own labels (a flood from one address stays pending), while a label people agree on needs
no reviewer; an address is a weak identity (NAT, proxies), so the rule only approves, it never
rejects, and a person can still reject what it approved. Decisions are kept in a table of their
own, `feedback_reviews`, in the log's database (the service's tables are left as it wrote them):
who decided, when, and by which rule.

Export writes the approved examples, deduplicated by image, to one .npz sorted by the image's
hash (`x` (N, 784) uint8, `y` int64 with -1 for "not a digit", `sha256`): the same approvals
give the same bytes, so exporting twice changes nothing, and DVC tracks the file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digits.core.errors import DigitsError, first_line, redact
from digits.monitor.features import PIXELS
from digits.monitor.window import NOT_A_DIGIT, now

APPROVED, REJECTED = "approved", "rejected"
NOT_A_DIGIT_LABEL = -1  # y of a "not a digit" example


class ReviewError(DigitsError):
    pass


def engine(url: str):
    """An engine on the log; a SQLite file that is not there is an error (opening it would
    create an empty one)."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise ReviewError(
            f"no prediction log at {url[len('sqlite:///') :]} (digits app and digits predict "
            "write it); --log-db names another"
        )

    try:
        return create_engine(url, connect_args={"timeout": 10} if url.startswith("sqlite") else {})
    except (ArgumentError, NoSuchModuleError, ImportError, ValueError) as e:
        raise ReviewError(
            f"--log-db {redact(url)}: not a database URL SQLAlchemy can open ({first_line(e)})"
        ) from None


def _reviews():
    from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table

    meta = MetaData()
    return meta, Table(
        "feedback_reviews",
        meta,
        Column("feedback_id", Integer, primary_key=True),  # feedback.id
        Column("decision", String(16), nullable=False),  # approved | rejected
        Column("by", String(256), nullable=False),  # a person, or "rule"
        Column("rule", String(256)),
        Column("at", DateTime, nullable=False),
    )


def _decisions(eng) -> dict[int, str]:
    from sqlalchemy import inspect, select

    if not inspect(eng).has_table("feedback_reviews"):
        return {}
    table = _reviews()[1]
    with eng.connect() as conn:
        return {int(i): d for i, d in conn.execute(select(table.c.feedback_id, table.c.decision))}


def rejected(eng) -> frozenset[int]:
    """The corrections a review rejected (digits monitor leaves them out)."""
    try:
        return frozenset(i for i, d in _decisions(eng).items() if d == REJECTED)
    except Exception:  # no review table, or a log not reachable yet: the read says which
        return frozenset()


@dataclass(frozen=True)
class Correction:
    id: int
    prediction_id: str
    piece: int
    label: str
    client: str | None
    agent: str | None
    at: object
    answered: str  # what the model said of the piece: a digit or "not a digit"
    version: str | None
    image: bytes  # 784 bytes
    decision: str | None  # approved, rejected, None: pending

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.image).hexdigest()


def corrections(eng) -> list[Correction]:
    """Every correction with its answer and image, oldest first."""
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from digits.monitor.window import _tables

    predictions, feedback = _tables()
    f, p = feedback.c, predictions.c
    try:
        decided = _decisions(eng)
        with eng.connect() as conn:
            rows = conn.execute(
                select(
                    f.id,
                    f.prediction_id,
                    f.piece,
                    f.label,
                    f.client,
                    f.user_agent,
                    f.at,
                    p.pieces,
                    p.digit,
                    p.answer,
                    p.inputs,
                    p.model_version,
                )
                .join_from(feedback, predictions, f.prediction_id == p.id)
                .order_by(f.at, f.id)
            ).all()
    except SQLAlchemyError as e:
        raise ReviewError(f"prediction log {redact(str(eng.url))}: {first_line(e)}") from None
    out = []
    for r in rows:
        if r.pieces == 1:
            digit = r.digit
        else:
            answer = r.answer or []
            digit = answer[r.piece].get("digit") if r.piece < len(answer) else None
        image = (r.inputs or b"")[r.piece * PIXELS : (r.piece + 1) * PIXELS]
        if len(image) != PIXELS:
            continue  # a blank picture's correction: no image to learn from
        out.append(
            Correction(
                r.id,
                r.prediction_id,
                r.piece,
                r.label,
                r.client,
                r.user_agent,
                r.at,
                NOT_A_DIGIT if digit is None else str(digit),
                r.model_version,
                image,
                decided.get(int(r.id)),
            )
        )
    return out


def decide(eng, ids: list[int], decision: str, by: str, rule: str | None = None) -> int:
    """Record a decision on corrections `ids` (a later decision replaces an earlier one)."""
    from sqlalchemy import delete

    meta, table = _reviews()
    known = {c.id for c in corrections(eng)}
    if unknown := sorted(set(ids) - known):
        raise ReviewError(f"correction(s) {', '.join(map(str, unknown))}: no such correction")
    meta.create_all(eng, checkfirst=True)
    with eng.begin() as conn:
        conn.execute(delete(table).where(table.c.feedback_id.in_(ids)))
        if ids:
            conn.execute(
                table.insert(),
                [
                    {"feedback_id": i, "decision": decision, "by": by, "rule": rule, "at": now()}
                    for i in ids
                ],
            )
    return len(ids)


def by_rule(items: list[Correction], min_sources: int) -> list[Correction]:
    """The pending corrections the default rule approves: for one image, a label given by at
    least `min_sources` distinct sources, and by more sources than any other label."""
    sources: dict[str, dict[str, set[str]]] = {}
    for c in items:
        if c.client:
            sources.setdefault(c.sha256, {}).setdefault(c.label, set()).add(c.client)
    winners = {}
    for sha, labels in sources.items():
        ranked = sorted(((len(s), label) for label, s in labels.items()), reverse=True)
        if ranked[0][0] >= min_sources and (len(ranked) == 1 or ranked[1][0] < ranked[0][0]):
            winners[sha] = ranked[0][1]
    return [c for c in items if c.decision is None and winners.get(c.sha256) == c.label]


def examples(items: list[Correction]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The approved corrections as a dataset: one example per image (the approved label;
    an image approved with two different labels is left out), sorted by the image's sha256."""
    labels: dict[str, set[str]] = {}
    images: dict[str, bytes] = {}
    for c in items:
        if c.decision == APPROVED:
            labels.setdefault(c.sha256, set()).add(c.label)
            images[c.sha256] = c.image
    keep = sorted(sha for sha, ls in labels.items() if len(ls) == 1)
    x = np.frombuffer(b"".join(images[s] for s in keep), np.uint8).reshape(len(keep), PIXELS)
    y = np.array(
        [
            NOT_A_DIGIT_LABEL if (lab := next(iter(labels[s]))) == NOT_A_DIGIT else int(lab)
            for s in keep
        ],
        np.int64,
    )
    return x, y, keep


def export(items: list[Correction], path: Path) -> tuple[int, bool]:
    """Write the approved examples to `path` (.npz); (how many, whether the file changed)."""
    from digits.core.files import atomic_path

    x, y, keep = examples(items)
    old = path.read_bytes() if path.is_file() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, x=x, y=y, sha256=np.array(keep, dtype="U64"))
    return len(keep), old != path.read_bytes()


def reviewer() -> str:
    """Who decides, for the record: the login name (no secret)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
