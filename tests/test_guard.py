"""digits.serve.guard on its own: the security headers and the per-client rate limit, as ASGI
middleware around a small ASGI app, called as uvicorn calls it (a scope, receive, send). The
real service with them is tested in tests/test_app.py."""

from __future__ import annotations

import asyncio
import json

from digits.core.net import is_loopback
from digits.serve.guard import CSP, Buckets, RateLimit, SecurityHeaders


async def hello(scope, receive, send):
    """An app that reads the whole body and answers 200, or 404 off /predict."""
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    status = 200 if scope["path"] in ("/predict", "/") else 404
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def call(app, path: str = "/predict", client: str = "192.0.2.1", body: bytes = b"x" * 10):
    """(status, headers as a dict, body) of one request."""
    sent: list[dict] = []
    chunks = [body[i : i + 4] for i in range(0, len(body), 4)] or [b""]

    async def receive():
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": [],
             "client": (client, 50000)}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:]), chunks


def test_every_answer_has_the_security_headers():
    app = SecurityHeaders(hello)
    for path in ("/", "/predict", "/nowhere"):
        status, headers, _, _ = call(app, path)
        assert status in (200, 404)
        assert headers["content-security-policy"] == CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
    assert "default-src 'self'" in CSP and "script-src 'self'" in CSP
    assert "frame-ancestors 'none'" in CSP and "unsafe-inline" not in CSP


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    b = Buckets(rate=2.0, burst=3, clock=clock)
    assert [b.take("a") for _ in range(3)] == [0, 0, 0]
    assert b.take("a") == 0.5  # one token comes back in half a second
    assert b.take("b") == 0  # another client has its own bucket
    clock.now += 0.5
    assert b.take("a") == 0
    assert b.take("a") > 0
    clock.now += 60  # refilled to the burst, not beyond
    assert [b.take("a") for _ in range(4)][-1] > 0


def test_the_table_of_clients_stays_bounded():
    clock = Clock()
    b = Buckets(rate=1.0, burst=2, clock=clock)
    b.MAX_KEYS = 100
    for n in range(1000):
        b.take(f"10.0.{n // 256}.{n % 256}")
        clock.now += 1  # each earlier client's bucket has refilled: forgotten when pruned
    assert len(b.state) <= 101


def test_a_flood_gets_429_and_others_are_served():
    clock = Clock()  # stopped: no token comes back during the test
    app = SecurityHeaders(RateLimit(hello, rate=1.0, burst=5, paths=["/predict"], clock=clock))
    answers = [call(app, client="192.0.2.1") for _ in range(8)]
    assert [a[0] for a in answers] == [200] * 5 + [429] * 3
    _, headers, body, unread = answers[-1]
    assert json.loads(body) == {"detail": "too many requests from 192.0.2.1: slow down"}
    assert headers["retry-after"] == "1" and headers["x-frame-options"] == "DENY"
    assert unread == []  # the refused body was read to its end: the client reads the 429
    assert call(app, client="192.0.2.2")[0] == 200  # another client
    assert call(app, path="/", client="192.0.2.1")[0] == 200  # the page is not limited
    clock.now += 1
    assert call(app, client="192.0.2.1")[0] == 200  # a second later, one more
    assert call(RateLimit(hello, rate=0, burst=1, paths=["/predict"]))[0] == 200  # 0: no limit


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.10", "example.com", ""]))
