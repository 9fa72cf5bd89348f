"""How well `digits predict` reads whole numbers: photos of strips of MNIST test digits
(strips: 2 to 8 digits, varied gaps, baseline and size jitter, paper grain, PNG and JPEG)
read by the champion, as `digits predict` reads them (digits.serve.predict.read_all).

    python benchmarks/read_numbers.py                 # 500 4-digit strips, 100 of each other k
    python benchmarks/read_numbers.py --strips 1000 --model models:/mnist-mlp/3

It prints, per number of digits: whole numbers read right (every digit found and right, none
refused), the strips cut into the right number of pieces, and per digit (of the strips cut
right) the share read right and the share refused as not a digit. The model is --model (default:
the champion) in the configured store (MLFLOW_TRACKING_URI, else mlflow.db at the repository
root: run `dvc repro` first)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_mnist() -> Path:
    for c in (ROOT / "data/raw", os.environ.get("MNIST_DIR", ""), ROOT.parent / "shared/mnist"):
        if c and (Path(c) / "t10k-images-idx3-ubyte.gz").is_file():
            return Path(c)
    sys.exit("read_numbers: no MNIST test files (run `dvc repro`, or set MNIST_DIR)")


def main() -> int:
    from digits.core import numerics

    numerics.pin()
    import numpy as np

    from digits.data.imaging import read_image
    from digits.data.preprocess import read_pair
    from digits.serve.predict import champion_uri, load_model, read_all

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/strips.py
    from strips import strip

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="MLflow model URI (default: the champion)")
    ap.add_argument("--strips", type=int, default=500, help="4-digit strips (default 500)")
    ap.add_argument("--others", type=int, default=100, help="strips of each other length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    x, y = read_pair(find_mnist(), "t10k")
    model = load_model(args.model)
    rng = np.random.default_rng(args.seed)
    print(f"model {args.model or champion_uri()}; MNIST test digits, seed {args.seed}\n")
    print("| digits | strips | numbers read right | cut right | digits right | refused |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in range(2, 9):
        n = args.strips if k == 4 else args.others
        picked = [rng.integers(len(x), size=k) for _ in range(n)]
        pictures = [
            (read_image(strip(x[p], rng, "JPEG" if i % 2 else "PNG"), f"{i}"), f"{i}")
            for i, p in enumerate(picked)
        ]
        readings = read_all(model, pictures)
        right = cut = digit_right = refused = 0
        for p, r in zip(picked, readings, strict=True):
            truth = "".join(str(d) for d in y[p])
            right += r.number == truth
            if len(r.pieces) == k:
                cut += 1
                digit_right += int((r.said.digit == y[p]).sum())
                refused += int((r.said.digit < 0).sum())
        seen = max(cut * k, 1)
        print(
            f"| {k} | {n} | {right / n:.1%} | {cut / n:.1%} | {digit_right / seen:.2%} | "
            f"{refused / seen:.2%} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
