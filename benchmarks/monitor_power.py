"""How `digits monitor` behaves, measured: its false-alarm rate over many windows of clean MNIST
digits, the smallest shift it catches for three kinds of shift, and how long it takes to check
100,000 logged answers on SQLite (docs/production-loop.md lists the figures).

    python benchmarks/monitor_power.py                        # models/model.safetensors
    python benchmarks/monitor_power.py --model path --data data/processed --windows 500
    python benchmarks/monitor_power.py --postgres --timing-only   # + a local PostgreSQL log

The reference is the model's, on the validation split (as the evaluate stage makes it). Clean
windows are `--size` test digits drawn at random (the test set mixes MNIST's two populations of
writers, as the validation split does). A shifted window replaces a share of them with:
- `thick`: the same digits with strokes one pixel thicker (a 3x3 max filter): another pen;
- `one-digit`: sevens only (a surge of one answer: prediction drift);
- `non-digits`: digits.data.outliers' suite (shapes, scribbles, letters, noise).
Detection is the share of `--trials` windows that alert, per share replaced; the smallest
share detected is the first where at least 90% of windows alert. The settings are params.yaml's
`monitor:`. Each window's answers come from the model (digits.model.inference), as logged."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from digits.core import numerics  # noqa: E402

numerics.pin()

from digits.core.config import load_params  # noqa: E402
from digits.model.inference import Classifier  # noqa: E402
from digits.monitor import drift, reference, window  # noqa: E402

SHARES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def thicker(x: np.ndarray) -> np.ndarray:
    img = x.reshape(-1, 28, 28)
    p = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    out = np.max([p[:, r : r + 28, c : c + 28] for r in range(3) for c in range(3)], axis=0)
    return out.reshape(-1, 784)


def answered(model: Classifier, x: np.ndarray):
    said = model.answers(x.astype(np.float32) / np.float32(255))
    return said.digit, said.confidence.astype(np.float64)


def alerts(ref, x, d, c, settings) -> bool:
    return any(ch.drifted for ch in drift.compare(ref, d, c, x, settings))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models/model.safetensors"))
    ap.add_argument("--data", default=str(ROOT / "data/processed"))
    ap.add_argument("--size", type=int, default=1000, help="pieces per window")
    ap.add_argument("--windows", type=int, default=500, help="clean windows")
    ap.add_argument("--trials", type=int, default=50, help="windows per shift and share")
    ap.add_argument("--rows", type=int, default=100_000, help="log rows for the timing")
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="time a local PostgreSQL cluster's log too (digits.team.server)",
    )
    ap.add_argument("--timing-only", action="store_true", help="skip the windows")
    args = ap.parse_args()
    settings = load_params(ROOT / "params.yaml").monitor
    model = Classifier.from_file(args.model)
    with np.load(Path(args.data, "train.npz")) as f:
        val = f["val_x"].reshape(-1, 784)
    with np.load(Path(args.data, "test.npz")) as f:
        test, labels = f["test_x"].reshape(-1, 784), f["test_y"]
    ref = reference.of_classifier(model, val)
    with tempfile.TemporaryDirectory() as tmp:
        timing(model, ref, test, args.rows, settings, f"sqlite:///{tmp}/predictions.db")
    if args.postgres:
        import os

        from digits.team.server import LocalPostgres

        pg = LocalPostgres().start()
        try:
            os.environ.update(pg.env)
            timing(model, ref, test, args.rows, settings, pg.create_database("predictions"))
        finally:
            pg.stop()
    if args.timing_only:
        return
    rng = np.random.default_rng(0)
    clean = (test, *answered(model, test))

    false = sum(
        alerts(ref, *(a[idx] for a in clean), settings)
        for idx in (rng.choice(len(test), args.size, replace=False) for _ in range(args.windows))
    )
    print(f"clean windows of {args.size}: {false} of {args.windows} alert "
          f"(false-alarm rate {false / args.windows:.3f})")  # fmt: skip

    from digits.data.outliers import outlier_set

    odd = np.concatenate(list(outlier_set("suite", 300, test.astype(np.float32) / 255).values()))
    odd = (odd * 255 + 0.5).clip(0, 255).astype(np.uint8) if odd.dtype != np.uint8 else odd
    sevens = test[labels == 7]
    shifted = {
        "thick": (thicker(test), *answered(model, thicker(test))),
        "one-digit": (sevens, *answered(model, sevens)),
        "non-digits": (odd, *answered(model, odd)),
    }
    for kind, pool in shifted.items():
        rates = []
        for share in SHARES:
            k = round(share * args.size)
            hits = 0
            for _ in range(args.trials):
                a = rng.choice(len(test), args.size - k, replace=False)
                b = rng.choice(len(pool[0]), k, replace=k > len(pool[0]))
                win = [np.concatenate([c[a], s[b]]) for c, s in zip(clean, pool, strict=True)]
                hits += alerts(ref, *win, settings)
            rates.append(hits / args.trials)
        caught = next((s for s, r in zip(SHARES, rates, strict=True) if r >= 0.9), None)
        table = ", ".join(f"{s:g}: {r:.2f}" for s, r in zip(SHARES, rates, strict=True))
        print(f"{kind}: detection by share replaced {{{table}}}; smallest >= 90%: {caught}")


def timing(model, ref, test, rows: int, settings, url: str) -> None:
    """`rows` one-digit answers in the log at `url` (the service's writer), then the window
    read and every check, timed as `digits monitor` runs them."""
    from digits.serve import predlog

    d, c = answered(model, test)
    now = predlog.now()
    eng = predlog.engine(url)
    predlog.create(eng)
    batch = []
    for i in range(rows):
        j = i % len(test)
        digit = None if d[j] < 0 else int(d[j])
        said = {"box": [0, 0, 28, 28], "digit": digit, "guess": int(d[j]) % 10,
                "confidence": float(c[j]), "probabilities": [0.1] * 10}  # fmt: skip
        record = {"digit": digit, "guess": said["guess"], "confidence": float(c[j]),
                  "reading": str(digit), "number": None, "digits": [said]}  # fmt: skip
        model_id = {"name": "mnist-mlp", "version": "1", "uri": "models:/mnist-mlp@champion"}
        at = now - dt.timedelta(seconds=(rows - i) / 2)  # all within the day
        batch.append(predlog.Entry(predlog.new_id(), at, "app", model_id, record,
                                   test[j].tobytes()))  # fmt: skip
        if len(batch) == 5000:
            predlog.write(eng, batch)
            batch = []
    if batch:
        predlog.write(eng, batch)
    t0 = time.perf_counter()
    win = window.read(eng, "mnist-mlp", "1", now - dt.timedelta(days=1), now)
    t1 = time.perf_counter()
    drift.compare(ref, win.digit, win.confidence, win.pixels, settings)
    t2 = time.perf_counter()
    eng.dispose()
    where = url.split(":")[0]
    print(f"{win.answers} logged answers on {where}: read {t1 - t0:.2f} s, checks {t2 - t1:.2f} s, "
          f"total {t2 - t0:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
