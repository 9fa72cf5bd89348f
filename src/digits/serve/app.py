"""`digits app`: a page to draw a digit (or upload a picture of one) and see what the model
thinks: the ten probabilities and the 28x28 image it was given; and the same as an API.

One FastAPI app served by uvicorn on 127.0.0.1, in `--workers` processes sharing the socket.
The page is plain HTML/JS/CSS from `digits/serve/static` (nothing from a CDN). `POST /predict`
takes the image's bytes as the body, with an `image/*` Content-Type (no multipart form, so no
extra parser), runs the same `preprocess` and cutting into digits as `digits predict`, and
answers with the JSON of `digits predict --json`, plus the prediction's id and the model that
gave it (registered name, version, the URI asked for); `?images=true` adds what the model saw of
each piece (the page asks for it). A bad request gets a 4xx whose JSON `detail` says what was
wrong, and the server goes on serving.

Each worker follows the alias it was started on (digits.serve.served), logs every answer
(digits.serve.predlog), takes corrections (`POST /feedback`) and counts (`GET /metrics`,
digits.serve.metrics). `GET /health` says which version every worker serves. Every answer
carries security headers, and /predict and /feedback are rate-limited per client
(digits.serve.guard); a non-loopback --host needs --public. docs/service.md.

Only the `digits app` handler imports this module. No torch; MLflow only where
digits.serve.predict.load_model needs it to download the model."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from digits.core.errors import DigitsError, first_line, redact
from digits.core.files import atomic_path
from digits.core.mnist import COLS, ROWS
from digits.core.net import is_loopback
from digits.data.imaging import MAX_BYTES, ImageError, read_image
from digits.monitor import logdb
from digits.serve import predlog
from digits.serve.feedback import FEEDBACK_BYTES, parse_feedback, store_feedback
from digits.serve.guard import RateLimit, SecurityHeaders
from digits.serve.predict import champion_uri, read_all, reading_record
from digits.serve.served import Follower, Holder, Served, follows, load_served

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


@dataclass(frozen=True)
class Options:
    """What every worker is told (pickled to the worker processes with uvicorn's config)."""

    uri: str  # the URI asked for: an alias is followed, a version stays pinned
    store: str  # the tracking URI
    version: str | None = None  # the version the parent loaded: every worker starts on it
    follow_interval: float = 2.0  # seconds between polls of the store; 0: never follow
    log_url: str | None = None  # the prediction log (a SQLAlchemy URL); None: --no-log
    retention_days: float = 30.0
    state_dir: str | None = None  # the workers' status files and Prometheus' folder
    multiprocess: bool = False  # PROMETHEUS_MULTIPROC_DIR is set for the workers
    rate_limit: float = 20.0  # /predict and /feedback requests a second per client and worker
    rate_burst: int = 40  # ... and at once; 0 rate: no limit (digits.serve.guard)


def say(text: str) -> None:
    print(f"digits app [{os.getpid()}]: {text}", flush=True)


def create_app(served: Served, options: Options) -> FastAPI:
    """The app of one worker around an already loaded version (digits.serve.predict.load_served)."""
    from digits.core import blas
    from digits.serve.metrics import CountRequests, Metrics

    blas.use_threads(1)  # one request at a time per process: its products on one thread
    metrics = Metrics(options.multiprocess)
    holder = Holder(served)
    metrics.served(served.name, served.version)
    log = None
    if options.log_url is not None:
        log = predlog.PredictionLog(
            options.log_url, retention_days=options.retention_days, say=say,
            on_write=metrics.logged,
        )  # fmt: skip
    status_dir = Path(options.state_dir, "workers") if options.state_dir else None

    def status() -> dict:
        current = holder.current
        return {
            "pid": os.getpid(),
            "name": current.name,
            "version": current.version,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(current.loaded_at)),
            "following": following,
            "reloads": holder.reloads,
            "failed_reloads": holder.failed,
            "problem": holder.problem,
            "log": log.stats() if log is not None else None,
        }

    def publish() -> None:
        """This worker's status where the others' /health can read it."""
        if status_dir is None:
            return
        with contextlib.suppress(OSError):
            status_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(status_dir / f"{os.getpid()}.json") as tmp:
                tmp.write_text(json.dumps(status()))

    def on_reload(ok: bool) -> None:
        if ok:
            metrics.reloads.inc()
            metrics.served(holder.current.name, holder.current.version)
        else:
            metrics.failed_reloads.inc()

    following = options.follow_interval > 0 and follows(options.uri)
    # pinned, the thread only keeps this worker's status (its log's counts) fresh for /health
    every = options.follow_interval if following else 2.0
    follower = Follower(holder, options.store, every, say, publish, on_reload, follow=following)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if log is not None:
            log.start()
        follower.start()
        publish()
        try:
            yield
        finally:
            follower.stop()
            if log is not None:
                log.close()  # what is queued is written: every answered request is in the log
            metrics.worker_gone()
            if status_dir is not None:
                with contextlib.suppress(OSError):
                    (status_dir / f"{os.getpid()}.json").unlink()

    app = FastAPI(
        title="digits", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    limited = ("/predict", "/feedback")
    app.add_middleware(RateLimit, rate=options.rate_limit, burst=options.rate_burst, paths=limited)
    app.add_middleware(CountRequests, metrics=metrics)  # counts the 429s too
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, errors and 429s included
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        mine = status()
        workers = {mine["pid"]: mine}
        if status_dir is not None:
            for path in status_dir.glob("*.json"):
                with contextlib.suppress(OSError, ValueError):
                    other = json.loads(path.read_text())
                    if other["pid"] not in workers and _alive(other["pid"]):
                        workers[other["pid"]] = other
        every = [workers[pid] for pid in sorted(workers)]
        problems = [f"worker {w['pid']}: {w['problem']}" for w in every if w["problem"]]
        for w in every:
            if w["log"] and w["log"]["last_error"]:
                problems.append(f"worker {w['pid']}: prediction log: {w['log']['last_error']}")
        return {
            "status": "degraded" if problems else "ok",
            "model": options.uri,
            "name": mine["name"],
            "version": mine["version"],
            "worker": mine["pid"],
            "workers": every,
            "problems": problems,
        }

    @app.get("/metrics")
    def prometheus() -> Response:
        data, kind = metrics.exposition()
        return Response(data, media_type=kind)

    def answer(body: bytes, name: str, images: bool) -> bytes:
        """The model's answer as JSON, as `digits predict --json` gives it (a digit, or a
        number and its pieces with their boxes) with its id and model; with `images`, also
        what the model saw of each piece (the page shows it: 784 numbers a piece, most of the
        answer's bytes)."""
        current = holder.current  # read once: the answer and its log entry name one model
        (reading,) = read_all(current.model, [(read_image(body, name), name)])
        record = reading_record(name, reading)
        del record["file"]
        record["prediction_id"] = pid = predlog.new_id()
        record["model"] = current.record
        if log is not None:
            seen = predlog.pixels([p.image for p in reading.pieces])
            log.add(predlog.Entry(pid, predlog.now(), "app", current.record, record, seen))
        count = metrics.answers
        if not reading.pieces or reading.said is None:
            count.labels("no ink").inc()
        else:
            for d in reading.said.digit.tolist():
                count.labels(str(d) if d >= 0 else predlog.NOT_A_DIGIT).inc()
        if images:
            seen_rows = [np.round(p.image.reshape(ROWS, COLS), 3).tolist() for p in reading.pieces]
            record = {**record, "images": seen_rows}  # piece by piece
            record["image"] = seen_rows[0] if seen_rows else np.zeros((ROWS, COLS)).tolist()
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

    @app.post("/feedback", status_code=201)
    async def feedback(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_body(request)
        if kind != "application/json":
            raise HTTPException(
                415, f"Content-Type {kind or '(none)'!r}: expected application/json"
            )
        if len(body) > FEEDBACK_BYTES:
            raise HTTPException(413, f"a correction is a few bytes; the limit is {FEEDBACK_BYTES}")
        prediction_id, label, piece = parse_feedback(body)
        if log is None:
            raise HTTPException(
                409, "this service keeps no prediction log (digits app --no-log): corrections "
                "cannot be stored",
            )  # fmt: skip
        client = request.client.host if request.client else None
        agent = request.headers.get("user-agent")
        stored = await run_in_threadpool(
            store_feedback, log, prediction_id, label, piece, client, agent
        )
        metrics.feedback.labels(label).inc()
        return {"feedback": stored, "prediction_id": prediction_id, "piece": piece, "label": label}

    return app


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def worker_app(options: Options) -> FastAPI:
    """The app of one worker process (uvicorn calls this in each, with the parent's options):
    its own copy of the version the parent loaded (read in place, or from
    digits.serve.model_cache), following the alias from there. A worker started later (uvicorn
    replaces one that died) starts on what the alias names by then, or, if that version does
    not load, on the parent's (its follower then says why)."""
    if options.follow_interval > 0 and follows(options.uri):
        try:
            return create_app(load_served(options.uri, options.store), options)
        except Exception:  # the alias names a broken version: start as the parent did
            pass
    return create_app(load_served(options.uri, options.store, options.version), options)


def pinned(uri: str) -> str:
    """`models:/<name>/<version>` for the version an alias names now (digits.tracking.resolve);
    the URI itself where the store cannot be asked directly."""
    from digits.tracking import resolve
    from digits.tracking.store import tracking_uri

    found = resolve.lookup(tracking_uri(), uri)
    return f"models:/{found.name}/{found.version}" if found else uri


def log_url(args, store: str) -> str | None:
    """The prediction log's SQLAlchemy URL (None with --no-log); checked, and its tables made,
    now: a bad URL stops the command, a database that does not answer only warns (the workers
    count what they cannot write, and write again once it answers)."""
    if getattr(args, "no_log", False):
        return None
    url = logdb.log_url(args.log_db, store)
    eng = predlog.engine(url)
    try:
        predlog.create(eng)
    except Exception as e:  # the service starts; /health says what is wrong
        print(
            f"digits app: warning: prediction log {redact(url)}: {first_line(e)}; "
            "answers are served and counted as not logged until it answers",
            file=sys.stderr,
            flush=True,
        )
    finally:
        eng.dispose()
    return url


def main(args) -> int:
    """The `digits app` handler: load the model, then serve until Ctrl+C, in `--workers`
    processes sharing the socket (each request is read and answered by one of them; Python
    runs one request's preprocessing at a time per process)."""
    from digits.serve.metrics import MULTIPROC_ENV
    from digits.tracking.store import tracking_uri

    if args.follow_interval < 0:
        raise DigitsError(f"--follow-interval {args.follow_interval}: expected seconds >= 0")
    if args.log_retention_days <= 0:
        raise DigitsError(f"--log-retention-days {args.log_retention_days}: expected > 0")
    rate, burst = getattr(args, "rate_limit", 20.0), getattr(args, "rate_burst", 40)
    if rate < 0 or burst < 1:
        raise DigitsError(
            f"--rate-limit {rate:g} --rate-burst {burst}: expected requests a second >= 0 "
            "(0: no limit) and a burst >= 1"
        )
    if not is_loopback(args.host) and not getattr(args, "public", False):
        raise DigitsError(
            f"--host {args.host}: not a loopback address, so the page and its API would be open "
            "to the network; say so with --public (and put TLS in front: docs/service.md)"
        )
    sock = listen(args.host, args.port)  # first: a taken port fails before seconds of loading
    uri = args.model or champion_uri()
    store = tracking_uri()
    url = log_url(args, store)
    state = tempfile.mkdtemp(prefix="digits-app-")
    # before anything imports prometheus-client (MLflow may, loading the model): the counts of
    # every worker go to files there
    os.environ[MULTIPROC_ENV] = str(Path(state, "prometheus"))
    Path(state, "prometheus").mkdir()
    try:
        first = load_served(uri, store)  # here first: a bad URI fails once, with one line
    except BaseException:
        shutil.rmtree(state, ignore_errors=True)
        raise
    options = Options(
        uri=uri, store=store, version=first.version, follow_interval=args.follow_interval,
        log_url=url, retention_days=args.log_retention_days, state_dir=state,
        multiprocess=True, rate_limit=rate, rate_burst=burst,
    )  # fmt: skip
    try:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        workers = args.workers or min(os.cpu_count() or 1, 4)
        which = f"{uri} (version {first.version})" if first.version else uri
        print(f"digits app: {which} on http://{shown}:{port}/ (Ctrl+C to stop)", flush=True)
        if options.follow_interval > 0 and follows(uri):
            every = f"{options.follow_interval:g} s"
            print(f"digits app: following {uri}: a move is served within {every}", flush=True)
        elif first.version:
            print(f"digits app: pinned to version {first.version}", flush=True)
        if url:
            kept = f"{options.retention_days:g} days"
            print(f"digits app: logging answers to {redact(url)} (kept {kept})", flush=True)
        else:
            print("digits app: answers are not logged (--no-log)", flush=True)
        print(f"digits app: ready, {workers} worker(s)", flush=True)
        if workers == 1:
            config = uvicorn.Config(create_app(first, options), log_level="warning")
            uvicorn.Server(config).run(sockets=[sock])
            return 0
        from uvicorn.supervisors import Multiprocess

        del first  # each worker loads its own copy
        config = uvicorn.Config(
            functools.partial(worker_app, options), factory=True, workers=workers,
            log_level="warning",
        )  # fmt: skip
        Multiprocess(config, sockets=[sock]).run()
        return 0
    finally:
        shutil.rmtree(state, ignore_errors=True)
