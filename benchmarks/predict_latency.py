"""Using the champion: how fast `digits predict` starts, how long one picture takes, and how much
load the page's endpoint holds, for a photo of one digit and one of a 4-digit number.

  1. one `digits predict PHOTO` process from start to end, with an empty model cache (the
     first ever) and again, against the floor: a Python that only imports numpy and Pillow;
  2. in this process, the model loaded: reading, cutting and predicting one picture;
  3. `digits app` on 127.0.0.1 under load, every answer logged (the default; the log in a
     temporary SQLite file): C clients at once (threads, kept-alive connections), each POSTing
     JPEG photos to /predict: requests/s, p50 and p99 latency, errors; the page's requests
     (?images=true); bad bodies sent among them, which must get a 4xx while the rest is
     served; and the ceiling: the same clients on GET /health (what the HTTP layer and the load
     generator alone allow on these cores);
  4. the same service with `--no-log` beside it: one digit and 4 digits, 8 clients, so that
     what the prediction log costs is the difference of two rows.

The pictures are MNIST test digits made to look like photos (strips). The model is
--model (default: the champion) in the configured store (MLFLOW_TRACKING_URI, else mlflow.db at
the repository root: run `dvc repro` first).

    python benchmarks/predict_latency.py
    python benchmarks/predict_latency.py --requests 2000 --clients 1 8 32"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from digits.core import numerics

# the photo strips are the tests' generator (tests/strips.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

numerics.pin()  # before numpy loads

import numpy as np  # noqa: E402

from digits.data.imaging import read_image  # noqa: E402
from digits.data.preprocess import read_pair  # noqa: E402
from digits.serve.predict import champion_uri, load_model, read_all  # noqa: E402
from strips import strip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(Path(sys.executable).parent / "digits")


def find_mnist() -> Path:
    for c in (ROOT / "data/raw", os.environ.get("MNIST_DIR", ""), ROOT.parent / "shared/mnist"):
        if c and (Path(c) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(c)
    sys.exit("benchmark: no MNIST test files (run `dvc repro`, or set MNIST_DIR)")


def ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q))


def drop_page_cache() -> bool:
    """Empty the OS page cache (root only): the next start reads every file from disk, as the
    first command after a boot does. False where it cannot be done."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cold(
    model: str, picture: Path, cache: Path, drop: bool = False, log: list[str] | None = None
) -> float | None:
    """One `digits predict` process, start to end; `log`: its log options (default: none)."""
    if drop and not drop_page_cache():
        return None
    t0 = time.perf_counter()
    out = subprocess.run(
        [DIGITS, "predict", "--model", model, *(log or ["--no-log"]), str(picture)],
        capture_output=True,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
    )
    took = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr.decode()
    return took


def floor_start() -> float:
    """A Python process that imports numpy and Pillow and exits: what any start costs."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import numpy, PIL.Image"], check=True)
    return time.perf_counter() - t0


def start_app(
    model: str, log: Path, workers: int | None, more: list[str]
) -> tuple[subprocess.Popen, int]:
    # every client is this machine's one address: no per-client rate limit (digits.serve.guard)
    cmd = [DIGITS, "app", "--port", "0", "--model", model, "--rate-limit", "0", *more]
    cmd += ["--workers", str(workers)] if workers else []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out)
    for _ in range(1200):
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())
        if m and "ready" in log.read_text():
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"benchmark: digits app did not start:\n{log.read_text()}")


def started(proc_port: tuple[subprocess.Popen, int], warm: list[bytes]) -> tuple:
    """The service, warmed up: each worker's first requests (imports, first allocations) are
    not what a running service answers with."""
    load(proc_port[1], warm, 8, 200)
    return proc_port


def load(
    port: int,
    bodies: list[bytes] | None,
    clients: int,
    total: int,
    bad_every: int = 0,
    path: str = "/predict",
) -> dict:
    """`clients` threads POST `total` requests in all to `path` (GET when `bodies` is None);
    every `bad_every`-th is a bad body."""
    times: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            bad = bad_every and i % bad_every == bad_every - 1
            t0 = time.perf_counter()
            if bodies is None:
                conn.request("GET", path)
            else:
                body = b"not an image at all" if bad else bodies[i % len(bodies)]
                conn.request("POST", path, body, {"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            took = time.perf_counter() - t0
            with lock:
                statuses.append(response.status)
                if not bad:
                    times.append(took)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    good = sum(s == 200 for s in statuses)
    return {
        "rate": len(statuses) / wall,
        "p50": ms(times, 50),
        "p99": ms(times, 99),
        "ok": good,
        "4xx": sum(400 <= s < 500 for s in statuses),
        "other": sum(not (s == 200 or 400 <= s < 500) for s in statuses),
    }


def count_rows(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM predictions").fetchone()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the champion")
    ap.add_argument("--requests", type=int, default=1500, help="per load test (default 1500)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--workers", type=int, default=2, help="digits app --workers (default 2)")
    args = ap.parse_args()
    model_uri = args.model or champion_uri()

    x, _ = read_pair(find_mnist(), "t10k")
    rng = np.random.default_rng(0)
    one = [strip(x[i : i + 1], rng, "JPEG") for i in range(200)]
    four = [strip(x[4 * i : 4 * i + 4], rng, "JPEG") for i in range(200)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "one.jpg").write_bytes(one[0])
        (tmp / "four.jpg").write_bytes(four[0])
        floor = [floor_start() for _ in range(3)]
        first = cold(model_uri, tmp / "one.jpg", tmp / "cache")
        disk = [cold(model_uri, tmp / "one.jpg", tmp / f"cache{i}", drop=True) for i in range(3)]
        again = [cold(model_uri, tmp / "one.jpg", tmp / "cache") for _ in range(3)]
        again4 = [cold(model_uri, tmp / "four.jpg", tmp / "cache") for _ in range(3)]
        logged = ["--log-db", str(tmp / "cli-log.db")]
        again_log = [cold(model_uri, tmp / "one.jpg", tmp / "cache", log=logged) for _ in range(3)]

        model = load_model(model_uri)
        local = {}
        for name, bodies in (("one digit", one), ("4 digits", four)):
            read_all(model, [(read_image(bodies[0]), "warm")])
            seconds = []
            for b in bodies:
                t0 = time.perf_counter()
                read_all(model, [(read_image(b), "b")])
                seconds.append(time.perf_counter() - t0)
            local[name] = seconds

        log_db = ["--log-db", str(tmp / "predictions.db")]
        proc, port = started(start_app(model_uri, tmp / "app.log", args.workers, log_db), one)
        try:
            rows = []
            for clients in args.clients:
                rows.append(("one digit", clients, load(port, one, clients, args.requests)))
            rows.append(("4 digits", 8, load(port, four, 8, args.requests)))
            page = load(port, one, 8, args.requests, path="/predict?images=true")
            rows.append(("one digit, as the page asks (with the images)", 8, page))
            rows.append(("one digit, 1 in 10 bad", 8, load(port, one, 8, args.requests, 10)))
            rows.append(
                (
                    "ceiling: GET /health (little work: the workers' status)",
                    8,
                    load(port, None, 8, args.requests, path="/health"),
                )
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        logged_rows = count_rows(tmp / "predictions.db")
        nolog = start_app(model_uri, tmp / "app-nolog.log", args.workers, ["--no-log"])
        proc, port = started(nolog, one)
        try:
            for name, bodies in (("one digit", one), ("4 digits", four)):
                r = load(port, bodies, 8, args.requests)
                rows.append((f"{name}, --no-log (a service of its own)", 8, r))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(
        f"\nmodel {model_uri}; digits app --workers {args.workers}; load average "
        f"{os.getloadavg()[0]:.1f}; {os.cpu_count()} cores; {logged_rows:,} answers in the "
        "prediction log after the logged runs (warm-up included)\n"
    )
    print(
        f"`digits predict one.jpg`, one process: first ever (empty model cache) {first:.2f} s; "
        f"then {min(again):.2f}-{max(again):.2f} s; a 4-digit photo "
        f"{min(again4):.2f}-{max(again4):.2f} s; with its answer logged (the default) "
        f"{min(again_log):.2f}-{max(again_log):.2f} s; the floor (python importing numpy and "
        "Pillow) "
        f"{min(floor):.2f}-{max(floor):.2f} s"
    )
    if None not in disk:
        print(
            f"the same first-ever call with the OS page cache emptied first (every file read "
            f"from disk, as after a boot): {min(disk):.2f}-{max(disk):.2f} s"
        )
    print("\n| in this process, model loaded | p50 ms | p99 ms |\n| --- | ---: | ---: |")
    for name, seconds in local.items():
        print(f"| read, cut and predict: {name} | {ms(seconds, 50):.2f} | {ms(seconds, 99):.2f} |")
    print(
        "\n| `POST /predict` | clients | requests/s | p50 ms | p99 ms | 200 | 4xx | other |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    for name, clients, r in rows:
        print(
            f"| {name} | {clients} | {r['rate']:,.0f} | {r['p50']:.1f} | {r['p99']:.1f} | "
            f"{r['ok']} | {r['4xx']} | {r['other']} |"
        )


if __name__ == "__main__":
    main()
