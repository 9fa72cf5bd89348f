"""Corrections (`POST /feedback` of `digits app`): what a body must hold, and storing it beside
its answer in the prediction log (digits.serve.predlog). Corrections are untrusted input: kept
with where they came from, for people to review; nothing here touches a model."""

from __future__ import annotations

import json
import re
import time

from fastapi import HTTPException

from digits.core.errors import first_line
from digits.serve import predlog

FEEDBACK_BYTES = 4096  # a correction is a few bytes
_ID = re.compile(r"[0-9a-f]{32}")


def parse_feedback(body: bytes) -> tuple[str, str, int]:
    """(prediction id, label, piece) of a correction's JSON body, or a 400 saying what is wrong:
    {"prediction_id": "<32 hex digits>", "label": 0-9 or "not a digit", "piece": 0 (optional:
    which digit of a number, from the left)}."""
    try:
        data = json.loads(body)
    except ValueError:
        raise HTTPException(
            400, 'not JSON: expected {"prediction_id": ..., "label": ...}'
        ) from None
    if not isinstance(data, dict):
        raise HTTPException(400, "expected a JSON object with prediction_id and label")
    pid = data.get("prediction_id")
    if not isinstance(pid, str) or not _ID.fullmatch(pid):
        raise HTTPException(
            400, f"prediction_id {pid!r}: expected the 32 hex digits an answer gave"
        )
    label = data.get("label")
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or label.strip().lower() not in predlog.LABELS:
        raise HTTPException(400, f'label {label!r}: expected a digit 0-9 or "not a digit"')
    piece = data.get("piece", 0)
    if not isinstance(piece, int) or isinstance(piece, bool) or piece < 0:
        raise HTTPException(400, f"piece {piece!r}: expected 0, 1, ... (a digit of the number)")
    return pid, label.strip().lower(), piece


def store_feedback(
    log: predlog.PredictionLog, pid: str, label: str, piece: int, client, agent
) -> int:
    """Store a correction beside its answer. An answer given a moment ago may still be on its
    way to the log (this worker's or another's batch): wait for it, a few batches long."""
    deadline = time.monotonic() + 5 * log.interval + 2
    try:
        while (pieces := predlog.find(log.engine, pid)) is None:
            if time.monotonic() > deadline:
                raise HTTPException(404, f"prediction {pid}: no such answer in the log")
            time.sleep(0.05)
        if piece >= max(pieces, 1):
            raise HTTPException(
                400, f"piece {piece}: that answer has {pieces} piece(s), numbered from 0"
            )
        return predlog.add_feedback(log.engine, pid, label, piece, client, agent)
    except HTTPException:
        raise
    except Exception as e:  # the database is down: the client may try again
        raise HTTPException(
            503, f"the prediction log cannot be reached ({first_line(e)})"
        ) from None
