"""The project's own HTTP calls, one small client over the standard library: the tracking
server's /health probe (digits.tracking.store, digits.team.server) and the registry look-up of
digits.tracking.resolve. MLflow's own calls go through MLflow's client; this is for the few
that must answer in milliseconds, before (or instead of) importing MLflow.

An answer is an answer whatever its status (a 401 says the server is up, behind a login); no
answer (refused, timed out, a TLS failure) raises OSError, which urllib's URLError is."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.body)


def get(
    url: str,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Response:
    """GET `url` (its TLS checked by `context`, else the system's CAs): the answer, or OSError
    when none came within `timeout` seconds."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
            return Response(r.status, str(r.reason), r.read())
    except urllib.error.HTTPError as e:  # an answer: 4xx, 5xx
        with e:
            try:
                body = e.read()
            except OSError:
                body = b""
        return Response(e.code, str(e.reason), body)
