"""`digits app`: a page to draw a digit (or upload a picture of one) and see what the model
thinks: the ten probabilities and the 28x28 image it was given.

One FastAPI app served by uvicorn on 127.0.0.1. The page is plain HTML/JS/CSS from
`digits/static` (nothing from a CDN). `POST /predict` takes the image's bytes as the body,
with an `image/*` Content-Type (no multipart form, so no extra parser), and runs the same
`preprocess` and cutting into digits as `digits predict`, and answers with the JSON of
`digits predict --json`; `?images=true` adds what the model saw of each piece (the page asks
for it). A bad request gets a 4xx whose JSON `detail` says what was wrong, and the server goes
on serving.

Only the `digits app` handler imports this module. No torch; MLflow only where
digits.serve.predict.load_model needs it to download the model."""

from __future__ import annotations

import json
import os
import socket
from importlib.resources import files

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from digits.core.errors import DigitsError
from digits.core.mnist import COLS, ROWS
from digits.core.settings import DIGITS_APP_MODEL, DIGITS_APP_MODEL_SHOWN
from digits.data.imaging import MAX_BYTES, ImageError, read_image
from digits.serve.predict import champion_uri, load_model, read_all, reading_record

STATIC = files("digits.serve") / "static"
# Past MAX_BYTES a body is read and dropped (not kept) so the client can finish sending and
# read the 413; past this much more, the connection is simply closed.
DRAIN_LIMIT = 4 * MAX_BYTES
INLINE_BYTES = 256 * 1024  # bodies up to this size are read in the event loop (a phone photo
# of a digit, cropped, or a drawing: tens of KiB); bigger ones in a thread


async def read_body(request: Request) -> bytes:
    """The request body, at most MAX_BYTES of it, else 413. (uvicorn has already refused a
    malformed Content-Length; chunked bodies have none, so the count is ours.)"""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BYTES:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break
    if size > MAX_BYTES:
        raise HTTPException(
            413, f"upload of {size / 2**20:.1f} MiB or more: the limit is {MAX_BYTES // 2**20} MiB"
        )
    return b"".join(chunks)


def create_app(model, model_uri: str) -> FastAPI:
    """The app around an already loaded `model` (digits.serve.predict.load_model: do it once)."""
    from digits.core import blas

    blas.use_threads(1)  # one request at a time per process: its products on one thread
    app = FastAPI(title="digits", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_uri}

    def answer(body: bytes, name: str, images: bool) -> bytes:
        """The model's answer as JSON, as `digits predict --json` gives it (a digit, or a
        number and its pieces with their boxes); with `images`, also what the model saw of
        each piece (the page shows it: 784 numbers a piece, most of the answer's bytes)."""
        (reading,) = read_all(model, [(read_image(body, name), name)])
        record = reading_record(name, reading)
        del record["file"]
        if images:
            seen = [np.round(p.image.reshape(ROWS, COLS), 3).tolist() for p in reading.pieces]
            record["images"] = seen  # piece by piece
            record["image"] = seen[0] if seen else np.zeros((ROWS, COLS)).tolist()
        # serialised here, in C: FastAPI's encoder walks every number in Python
        return json.dumps(record).encode()

    @app.post("/predict")
    async def predict(request: Request, images: bool = False) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request)  # read even when refused: the client gets the answer
        if not kind.startswith("image/"):
            raise HTTPException(
                415,
                f"Content-Type {kind or '(none)'!r}: expected an image type such as image/png "
                "or image/jpeg, with the image's bytes as the body",
            )
        if not body:
            raise HTTPException(400, "empty body: expected the image's bytes")
        try:
            # A small picture is read in the event loop: a worker does one request's Python
            # at a time anyway (the GIL), and the hop to a thread and back cost more than the
            # reading (1,100 against 750 requests/s, docs/performance.md). A big one goes to a
            # thread, so that its seconds of decoding (Pillow lets go of the GIL) do not hold
            # up the small requests behind it.
            if len(body) <= INLINE_BYTES:
                data = answer(body, "the upload", images)
            else:
                data = await run_in_threadpool(answer, body, "the upload", images)
        except ImageError as e:
            raise HTTPException(400, str(e)) from None
        return Response(data, media_type="application/json")

    return app


def listen(host: str, port: int) -> socket.socket:
    """Bind the socket ourselves: a clear error when the port is taken, and --port 0 works
    (the OS picks a free port, printed at start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
    # so, and with Nagle on every answer waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DigitsError(
            f"{host}:{port}: cannot listen ({e.strerror}); try another --port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


# handed to the worker processes: the version the parent loaded, and the URI the user gave
MODEL_ENV, SHOWN_ENV = DIGITS_APP_MODEL.name, DIGITS_APP_MODEL_SHOWN.name


def worker_app() -> FastAPI:
    """The app of one worker process (uvicorn imports this by name in each): its own copy of
    the model the parent loaded (read in place, or from digits.serve.model_cache)."""
    version, shown = DIGITS_APP_MODEL.get(), DIGITS_APP_MODEL_SHOWN.get()
    if not (version and shown):
        raise DigitsError(f"{MODEL_ENV}: unset; `digits app` sets it for its workers")
    return create_app(load_model(version), shown)


def pinned(uri: str) -> str:
    """`models:/<name>/<version>` for the version an alias names now (digits.tracking.resolve), so
    that every worker serves the version the parent loaded even if the alias moves meanwhile; the
    URI itself where the store cannot be asked directly."""
    from digits.tracking import resolve
    from digits.tracking.store import tracking_uri

    found = resolve.lookup(tracking_uri(), uri)
    return f"models:/{found.name}/{found.version}" if found else uri


def main(args) -> int:
    """The `digits app` handler: load the model, then serve until Ctrl+C, in `--workers`
    processes sharing the socket (each request is read and answered by one of them; Python
    runs one request's preprocessing at a time per process)."""
    sock = listen(args.host, args.port)  # first: a taken port fails before seconds of loading
    uri = args.model or champion_uri()
    version = pinned(uri)
    model = load_model(version)  # here first: a bad URI fails once, with one line
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    workers = args.workers or min(os.cpu_count() or 1, 4)
    which = f"{uri} ({version})" if version != uri else uri
    print(f"digits app: {which} on http://{shown}:{port}/ (Ctrl+C to stop)", flush=True)
    print(f"digits app: ready, {workers} worker(s)", flush=True)
    if workers == 1:
        config = uvicorn.Config(create_app(model, uri), log_level="warning")
        uvicorn.Server(config).run(sockets=[sock])
        return 0
    from uvicorn.supervisors import Multiprocess

    os.environ[MODEL_ENV], os.environ[SHOWN_ENV] = version, uri
    config = uvicorn.Config(
        "digits.serve.app:worker_app", factory=True, workers=workers, log_level="warning"
    )
    Multiprocess(config, sockets=[sock]).run()
    return 0
