"""What `digits app` needs to face the public: security headers on every response, a rate limit
per client on the endpoints that do work, and loopback unless told otherwise.

Two ASGI middlewares, pure (no framework imports), each a few lines per request:

- `SecurityHeaders`: a content security policy that lets the page run only its own script and
  style from this origin (no inline code, no other site, no plugins), sends its requests only
  here and cannot be framed; no MIME sniffing; no Referer to other sites.
- `RateLimit`: a token bucket per client address, in each worker: `rate` requests a second,
  `burst` at once; past it a 429 with Retry-After, while every other client goes on being
  served. The defaults (20/s, 40 at once) are far above what a person drawing sends (one
  request a stroke) and far below what one client can flood a worker with. Behind a reverse
  proxy every client has the proxy's address: limit there instead (docs/service.md)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",  # an uploaded picture is shown from a blob: URL before it is sent
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
DRAIN_BYTES = 1 << 20
HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """ASGI middleware: HEADERS on every HTTP response (the page, static files, errors)."""

    def __init__(self, app, headers: Iterable[tuple[bytes, bytes]] = HEADERS):
        self.app, self.headers = app, list(headers)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, sending)


class Buckets:
    """Token buckets by key: each holds up to `burst` tokens and gains `rate` a second; a
    request takes one. Full buckets are forgotten when there are many, so a stream of new
    addresses cannot grow the table without bound."""

    MAX_KEYS = 10_000

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.state: dict[str, tuple[float, float]] = {}  # key: (tokens, when)

    def take(self, key: str) -> float:
        """0 if `key` may go on (a token taken), else the seconds until it may."""
        now = self.clock()
        tokens, when = self.state.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - when) * self.rate)
        if tokens >= 1:
            self.state[key] = (tokens - 1, now)
            if len(self.state) > self.MAX_KEYS:
                self.prune(now)
            return 0.0
        self.state[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def prune(self, now: float) -> None:
        full = [k for k, (t, w) in self.state.items() if t + (now - w) * self.rate >= self.burst]
        for k in full:
            del self.state[k]


class RateLimit:
    """ASGI middleware: requests to `paths` beyond a client's bucket get a 429 (JSON `detail`,
    as FastAPI's errors), before the body is read or the model runs."""

    def __init__(self, app, rate: float, burst: int, paths: Iterable[str], clock=time.monotonic):
        self.app, self.paths = app, frozenset(paths)
        self.buckets = Buckets(rate, burst, clock) if rate > 0 else None

    async def __call__(self, scope, receive, send):
        if self.buckets is None or scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        client = scope.get("client")
        wait = self.buckets.take(client[0] if client else "unknown")
        if not wait:
            return await self.app(scope, receive, send)
        # read (and drop) what the client is still sending, so it gets to read the answer
        # instead of a reset connection; a body past DRAIN_BYTES is cut off
        size, more = 0, True
        while more and size <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps(
            {"detail": f"too many requests from {client[0] if client else 'you'}: slow down"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(max(1, math.ceil(wait))).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
