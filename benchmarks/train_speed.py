"""Training speed: the project's trainer with the portable numerics (the default), without them,
and with the former pins, against the machine's own matrix-multiply limit, all in one run.

    python benchmarks/train_speed.py                     # 2 timed epochs x 3 repeats each
    python benchmarks/train_speed.py --epochs 1 --repeats 5 --profile

Every row runs in a fresh child process, prepared alike: the child imports the trainer, loads
the 60,000 training images, trains one warm-up epoch that is not timed (first-call costs: lazy
imports, allocator growth), then times `--epochs` epochs `--repeats` times; the row is the
median. The children differ only in their numerics environment:

  portable : digits.core.numerics' pins (the default): products in numpy's OpenBLAS, Haswell
             kernels, 2 threads; torch on one thread
  unpinned : DIGITS_PORTABLE_NUMERICS=0 and no pin variables: torch's nn.Linear on MKL with
             every core, whatever kernels MKL picks for this CPU (the machine's speed)
  former   : the pins before this change (MKL_CBWR=COMPATIBLE, 2 threads, ATen AVX2)
  usual    : the seed project's loop (torchvision MNIST + ToTensor, DataLoader batch 64), unpinned

The limit is the machine's own fastest unpinned fp32 GEMM (MKL through torch, or numpy's
OpenBLAS on the kernels it picks for this CPU), measured at the trainer's shapes: one training
step's products (forward, input and weight gradients of every layer, at the batch size), in the
unpinned child. The portable ceiling (OpenBLAS Haswell on 2 threads) and the former pin's GEMM
rate are printed beside it, measured the same way in their own children.

MNIST comes from data/raw if `dvc repro` has run, else from $MNIST_MIRROR / $MNIST_DIR /
../shared/mnist (a folder with the four official .gz files)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMER_PINS = {  # digits.core.numerics at bf8a237
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}


def find_mnist() -> Path:
    from digits.core.mnist import RESOURCES

    candidates = [
        ROOT / "data/raw",
        os.environ.get("MNIST_MIRROR", "").split(",")[0],
        os.environ.get("MNIST_DIR", ""),
        ROOT.parent / "shared/mnist",
    ]
    for c in candidates:
        if c and all((Path(c) / name).is_file() for name, _ in RESOURCES):
            return Path(c)
    sys.exit(
        "benchmark: no folder with the four MNIST .gz files (run `dvc repro`, or set "
        "MNIST_DIR to a local copy)"
    )


def child_env(mode: str) -> dict[str, str]:
    from digits.core import numerics

    env = {k: v for k, v in os.environ.items() if k not in numerics.PINS}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    if mode == "portable":
        return env  # the child pins, as every entry point does
    env[numerics.SWITCH] = "0"
    if mode == "former":
        env.update(FORMER_PINS)
    return env


# --- in the child -----------------------------------------------------------------------------


def step_flops(sizes: list[int], batch: int) -> int:
    """FLOPs of one training step's products: forward, weight gradient, and input gradient of
    every layer but the first (its input is the data, which needs none)."""
    pairs = list(itertools.pairwise(sizes))
    per_layer = [2 * batch * a * b for a, b in pairs]
    return 2 * sum(per_layer) + sum(per_layer[1:])


def gemm_rates(sizes: list[int], batch: int, seconds: float = 1.5) -> dict[str, float]:
    """GFLOP/s of one training step's products, through torch (MKL) and numpy (OpenBLAS)."""
    import numpy as np
    import torch

    from digits.core import blas

    rng = np.random.default_rng(0)
    pairs = list(itertools.pairwise(sizes))
    ops = []  # (a, b) with a @ b one of the step's products, laid out as the trainer has them
    for i, (fan_in, fan_out) in enumerate(pairs):
        x = rng.random((batch, fan_in), dtype=np.float32)
        w = rng.random((fan_out, fan_in), dtype=np.float32)
        g = rng.random((batch, fan_out), dtype=np.float32)
        ops += [(x, w.T), (g.T, x)] + ([(g, w)] if i else [])
    flops = step_flops(sizes, batch)

    def rate(fn) -> float:
        for _ in range(3):
            fn()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            reps += 1
        return flops * reps / (time.perf_counter() - t0) / 1e9

    torch_ops = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in ops]  # same strides
    return {
        "torch": rate(lambda: [a @ b for a, b in torch_ops]),
        "numpy": rate(lambda: [blas.matmul(a, b) for a, b in ops]),
    }


def time_trainer(params, x, y, epochs: int, repeats: int) -> list[float]:
    """samples/s (digits seen per second) of `repeats` timings of `epochs` epochs each, after
    one untimed warm-up epoch; with outlier exposure on, its non-digits ride along."""
    from digits.stages.train import outlier_pool, train

    pool = outlier_pool(params.train, x) if params.train.outliers.enabled else None

    def run(n: int) -> float:
        p = params.train.model_copy(update={"epochs": n})
        t0 = time.perf_counter()
        # validation on a slice: the epoch-end pass the trainer always makes, at its real cost
        train(p, (x, y, x[:5000], y[:5000]), outliers=pool, progress=False)
        return n * len(x) / (time.perf_counter() - t0)

    run(1)
    return [run(epochs) for _ in range(repeats)]


def usual_way(src: Path, hidden_sizes, epochs: int, repeats: int) -> list[float]:
    """The seed project's loop on torchvision's MNIST class; samples/s per timing."""
    import torch
    from torchvision import datasets, transforms

    from digits.core.mnist import RESOURCES
    from digits.model.network import build_mlp

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name, _ in RESOURCES:
            shutil.copy(src / name, raw / name)
        # download=True finds the verified .gz files and only extracts them: no network
        ds = datasets.MNIST(tmp, train=True, download=True, transform=transforms.ToTensor())
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True)
        model = build_mlp(hidden_sizes)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()

        def run(n: int) -> float:
            seen, t0 = 0, time.perf_counter()
            for _ in range(n):
                for xb, yb in loader:
                    opt.zero_grad()
                    loss_fn(model(xb.view(len(xb), -1)), yb).backward()
                    opt.step()
                    seen += len(xb)
            return seen / (time.perf_counter() - t0)

        run(1) if epochs > 1 else None
        return [run(epochs) for _ in range(repeats)]


def accurate_params(params):
    """params.yaml with the `-S train.*=...` overrides of the Makefile's ACCURATE profile."""
    import re

    import yaml

    from digits.core.config import parse_params

    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    flags = re.search(r"^ACCURATE\s*:?=(.*)$", text, re.M).group(1)
    raw = params.model_dump(mode="json")
    for key, value in re.findall(r"-S\s+'?(train\.[\w.]+)=([^\s']+)", flags):
        *parents, last = key.split(".")
        node = raw
        for k in parents:
            node = node[k]
        node[last] = yaml.safe_load(value)
    return parse_params(raw)


def profile(params, x, y) -> None:
    """Where a training step's time goes (the trainer, 30 steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from digits.stages.train import train

    p = params.train.model_copy(update={"epochs": 1})
    n = 30 * p.batch_size
    from digits.stages.train import outlier_pool

    pool = outlier_pool(p, x) if p.outliers.enabled else None
    train(p, (x[:n], y[:n], x[:1000], y[:1000]), outliers=pool, progress=False)  # warm
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train(p, (x[:n], y[:n], x[:1000], y[:1000]), outliers=pool, progress=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def child(args) -> None:
    from digits.core import numerics

    numerics.pin()  # before numpy and torch load
    import torch

    from digits.core.config import load_params
    from digits.data.preprocess import read_pair
    from digits.tracking import runs as tracking

    params = load_params(ROOT / "params.yaml")
    if args.accurate:
        params = accurate_params(params)
    src = find_mnist()
    sizes = [784, *params.train.hidden_sizes, 10]
    out: dict = {"threads": torch.get_num_threads()}
    if args.child == "usual":
        out["rates"] = usual_way(src, params.train.hidden_sizes, args.epochs, args.repeats)
    else:
        x, y = read_pair(src, "train")
        x, y = torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y).long()
        out["rates"] = time_trainer(params, x, y, args.epochs, args.repeats)
        if not args.accurate:
            out["gemm"] = gemm_rates(sizes, params.train.batch_size)
            out["numerics"] = tracking.numerics_tags()
        if args.profile:
            profile(params, x, y)
    print("RESULT " + json.dumps(out), flush=True)


# --- in the parent ----------------------------------------------------------------------------


def run_child(mode: str, args, accurate: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--epochs", str(args.epochs)]
    cmd += ["--repeats", str(args.repeats if mode != "usual" else 1)]
    cmd += ["--accurate"] if accurate else []
    cmd += ["--profile"] if args.profile and mode == "portable" and not accurate else []
    proc = subprocess.run(cmd, env=child_env(mode), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"benchmark: the {mode} child failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    for line in lines:
        if not line.startswith("RESULT "):
            print(line)
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    result["median"] = statistics.median(result["rates"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per timing (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per trainer (default 3)")
    ap.add_argument("--profile", action="store_true", help="a torch.profiler table (portable)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--accurate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    sys.path.insert(0, str(ROOT / "src"))
    from digits.core.config import load_params

    params = load_params(ROOT / "params.yaml")
    sizes = [784, *params.train.hidden_sizes, 10]
    flops = step_flops(sizes, params.train.batch_size) / params.train.batch_size

    portable = run_child("portable", args)
    unpinned = run_child("unpinned", args)
    former = run_child("former", args)
    accurate = run_child("portable", args, accurate=True)
    usual = run_child("usual", args)

    limit_gemm = max(unpinned["gemm"].values())
    limit = limit_gemm * 1e9 / flops
    print(
        f"machine: {os.cpu_count()} cores; {portable['numerics']['numerics.openblas']} "
        f"(portable); torch {portable['numerics']['numerics.torch']}, MKL "
        f"{portable['numerics']['numerics.mkl']}"
    )
    print(
        f"network {sizes}, batch {params.train.batch_size}: {flops / 1e6:.2f} MFLOP of "
        f"products per training sample; {args.epochs} epoch(s) x {args.repeats}, median"
    )
    print()
    print("GEMM at the trainer's shapes (one step's products)      GFLOP/s")
    print(
        f"  limit: the machine's own, unpinned (MKL, torch)      {unpinned['gemm']['torch']:8.0f}"
    )
    print(
        f"  limit: the machine's own, unpinned (OpenBLAS, numpy) {unpinned['gemm']['numpy']:8.0f}"
    )
    print(
        f"  portable ceiling: OpenBLAS Haswell, 2 threads        {portable['gemm']['numpy']:8.0f}"
    )
    print(f"  former pin: MKL COMPATIBLE, 2 threads                {former['gemm']['torch']:8.0f}")
    print()
    print(f"{'trainer':<46}{'samples/s':>11}{'vs unpinned':>13}{'vs limit':>10}")
    rows = (
        ("portable (default: OpenBLAS Haswell)", portable),
        ("unpinned (MKL, every core)", unpinned),
        ("former pins (MKL COMPATIBLE)", former),
        ("portable, accurate profile (augmented)", accurate),
        ("usual: DataLoader batch 64 (unpinned)", usual),
    )
    for name, r in rows:
        sps = r["median"]
        print(f"{name:<46}{sps:>11,.0f}{sps / unpinned['median']:>12.2f}x{sps / limit:>9.2f}x")
    print(
        f"\nportable / unpinned = {portable['median'] / unpinned['median']:.2f} (target >= 0.6); "
        f"the pins cost {unpinned['median'] / portable['median']:.2f}x "
        f"(the former pins: {unpinned['median'] / former['median']:.2f}x)"
    )
    print(f"limit: {limit:,.0f} samples/s = {limit_gemm:.0f} GFLOP/s / {flops / 1e6:.2f} MFLOP")


if __name__ == "__main__":
    main()
