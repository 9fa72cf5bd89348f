"""Using the champion: how long one image takes, and how many images per second a batch gets.

  1. `digits predict`, model loaded: one user's picture (a PNG file of an MNIST test digit made
     to look like a photo: dark ink on paper, off-centre, 2-6x larger, RGB) read from disk,
     preprocessed and predicted in this process; the preprocessing and the model also alone.
  2. the page's endpoint: the same pictures POSTed one after another to `digits app`'s
     /predict on 127.0.0.1 (one kept-alive connection, as a browser does).
  3. pyfunc batch throughput: `model.predict` on 10,000 images at once, in images/s.
  4. for reference, one `digits predict IMAGE` process from start to end (imports and model
     loading included).

p50 and p99 over --requests images (default 300). The model is --model (default
models:/mnist-mlp@champion) in the configured store (MLFLOW_TRACKING_URI, else mlflow.db at the
repository root: run `dvc repro` first).

    python benchmarks/predict_latency.py
    MLFLOW_TRACKING_URI=sqlite:////path/to/mlflow.db python benchmarks/predict_latency.py"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from digits import numerics

numerics.pin()  # before anything imports torch (the model's load does)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from digits.data import read_pair  # noqa: E402
from digits.imaging import preprocess, read_image  # noqa: E402
from digits.predict import champion_uri, load_model, probabilities  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(Path(sys.executable).parent / "digits")


def find_mnist() -> Path:
    for c in (ROOT / "data/raw", os.environ.get("MNIST_DIR", ""), ROOT.parent / "shared/mnist"):
        if c and (Path(c) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(c)
    sys.exit("benchmark: no MNIST test files (run `dvc repro`, or set MNIST_DIR)")


def photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """An MNIST digit as a user's PNG: dark ink on off-white paper, larger, off-centre, RGB."""
    side = round(28 * rng.uniform(2, 6))
    ink = Image.fromarray(255 - digit.reshape(28, 28)).resize(
        (side, side), Image.Resampling.BICUBIC
    )
    page = Image.new("L", (2 * side, 2 * side), 255)
    page.paste(ink, (int(rng.integers(0, side)), int(rng.integers(0, side))))
    rgb = Image.merge("RGB", [page.point(lambda v, k=k: 20 + v * k) for k in (0.88, 0.82, 0.54)])
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    return buf.getvalue()


def percentiles(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"{np.percentile(ms, 50):7.2f} | {np.percentile(ms, 99):7.2f}"


def in_process(model, files: list[Path]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"end to end": [], "read + preprocess": [], "model": []}
    for f in files:
        t0 = time.perf_counter()
        x = preprocess(read_image(f), str(f))
        t1 = time.perf_counter()
        probabilities(model, x[None])
        t2 = time.perf_counter()
        times["end to end"].append(t2 - t0)
        times["read + preprocess"].append(t1 - t0)
        times["model"].append(t2 - t1)
    return times


def start_app(model_uri: str, log: Path) -> tuple[subprocess.Popen, int]:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [DIGITS, "app", "--port", "0", "--model", model_uri], stdout=out, stderr=out
        )
    for _ in range(1200):
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"benchmark: digits app did not start:\n{log.read_text()}")


def endpoint(port: int, bodies: list[bytes]) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for body in [bodies[0], *bodies]:  # the first one warms the connection and the server
        t0 = time.perf_counter()
        conn.request("POST", "/predict", body, {"Content-Type": "image/png"})
        response = conn.getresponse()
        response.read()
        times.append(time.perf_counter() - t0)
        assert response.status == 200, response.status
    conn.close()
    return times[1:]


def batch_throughput(model, x: np.ndarray, repeats: int = 5) -> float:
    probabilities(model, x[:10])  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        probabilities(model, x)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=champion_uri())
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()

    x, _ = read_pair(find_mnist(), "t10k")
    rng = np.random.default_rng(0)
    bodies = [photo(v, rng) for v in x[: args.requests]]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, body in enumerate(bodies):
            files.append(Path(tmp) / f"{i}.png")
            files[-1].write_bytes(body)
        t0 = time.perf_counter()
        model = load_model(args.model)
        load_s = time.perf_counter() - t0
        in_process(model, files[:20])  # warm up
        local = in_process(model, files)
        proc, port = start_app(args.model, Path(tmp) / "app.log")
        try:
            page = endpoint(port, bodies)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        t0 = time.perf_counter()
        cli = subprocess.run(
            [DIGITS, "predict", "--model", args.model, str(files[0])], capture_output=True
        )
        cold_s = time.perf_counter() - t0
        assert cli.returncode == 0, cli.stderr.decode()
    batch = x.astype(np.float32) / 255
    rate = batch_throughput(model, batch)

    import torch

    sizes = [Image.open(io.BytesIO(b)).size[0] for b in bodies]
    load = os.getloadavg()[0]
    print(
        f"\n{len(files)} PNG pictures, {min(sizes)}-{max(sizes)} px square; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; model loaded in {load_s:.1f} s; "
        f"load average {load:.1f}\n"
    )
    print("| one image | p50 ms | p99 ms |\n| --- | ---: | ---: |")
    for name, seconds in local.items():
        print(f"| `digits predict`, model loaded: {name} | {percentiles(seconds)} |")
    print(f"| page endpoint `POST /predict` on 127.0.0.1 | {percentiles(page)} |")
    print(f"\npyfunc batch of {len(batch):,}: {rate:,.0f} images/s")
    print(f"one `digits predict IMAGE` process, start to end: {cold_s:.1f} s")


if __name__ == "__main__":
    main()
