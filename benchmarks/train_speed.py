"""Training speed: the project's trainer with the portable numerics (the default), without them,
and with the former pins, against the machine's own matrix-multiply limit, all in one run.

    python benchmarks/train_speed.py                     # 2 timed epochs x 3 repeats each
    python benchmarks/train_speed.py --epochs 1 --repeats 5 --profile

Every row runs in a fresh child process, prepared alike: the child imports the trainer, loads
the 60,000 training images, trains one warm-up epoch that is not timed (first-call costs: lazy
imports, allocator growth), then times `--epochs` epochs `--repeats` times; the row is the
median. The children differ only in their numerics environment:

  portable : digits.core.numerics' pins (the default): products in numpy's OpenBLAS, Haswell
             kernels, 2 threads; torch on one thread; the batches made in a second thread
             (digits.model.batches)
  inline   : the same, but each batch made in line between two steps, and OpenBLAS's idle
             threads spinning for its default time (the trainer before the producer thread;
             the same bytes)
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
    if mode == "inline":  # and OpenBLAS's idle threads spin as long as they did (its default)
        return {**env, "OPENBLAS_THREAD_TIMEOUT": "28"}
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


def profile(params, x, y) -> dict[str, float]:
    """Where an epoch's time goes: the trainer's step, made in line (no producer thread, so
    that the parts add up), each part timed on its own; the products timed inside
    digits.core.blas. Seconds per epoch of `x`: the median of three epochs after a warm-up."""
    import torch
    from torch import nn

    from digits.core import blas
    from digits.model.augment import augment_batch, make_augment
    from digits.stages.train import build, outlier_pool, set_up

    p = params.train
    device = set_up(p)
    pool = outlier_pool(p, x) if p.outliers.enabled else None
    model, opt, sched = build(p, device, total_steps=10 * (len(x) // p.batch_size + 1))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    augment = make_augment(p.augment) if p.augment.enabled else None
    products = [0.0]
    matmul = blas.matmul

    def timed_matmul(a, b):
        t = time.perf_counter()
        out = matmul(a, b)
        products[0] += time.perf_counter() - t
        return out

    def epoch() -> dict[str, float]:
        parts = dict.fromkeys(("batch", "outliers", "augment", "forward", "loss", "backward",
                               "optimizer"), 0.0)  # fmt: skip
        products[0] = 0.0
        clock = time.perf_counter
        t_epoch = clock()
        for idx in torch.randperm(len(x)).split(p.batch_size):
            t0 = clock()
            b = len(idx)
            k = round(p.outliers.share * b) if pool is not None else 0
            xb = torch.empty(b + k, x.shape[1])
            torch.index_select(x, 0, idx, out=xb[:b])
            yb = y[idx]
            t1 = clock()
            if pool is not None and k:
                torch.index_select(pool, 0, torch.randint(len(pool), (k,)), out=xb[b:])
            t2 = clock()
            if augment is not None:
                xb = augment_batch(xb, augment, p.augment.group_size, owned=True)
            t3 = clock()
            out = model(xb)
            t4 = clock()
            loss = loss_fn(out[:b], yb)
            if k:
                loss = loss - p.outliers.weight * torch.log_softmax(out[b:], 1).mean()
            t5 = clock()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t6 = clock()
            opt.step()
            sched.step() if sched is not None else None
            t7 = clock()
            for name, a, z in zip(parts, (t0, t1, t2, t3, t4, t5, t6), (t1, t2, t3, t4, t5, t6, t7),
                                  strict=True):  # fmt: skip
                parts[name] += z - a
        parts["epoch"] = clock() - t_epoch
        parts["digits"] = len(x)
        parts["products"] = products[0]
        return parts

    blas.matmul = timed_matmul
    try:
        epoch()  # warm-up
        runs = [epoch() for _ in range(3)]
    finally:
        blas.matmul = matmul
    return sorted(runs, key=lambda r: r["epoch"])[1]  # the median epoch, its parts adding up


def print_profile(parts: dict[str, float], p, portable_limit: float) -> None:
    """The split of an in-line epoch, and what the products alone would take."""
    rows = p.batch_size + round(p.outliers.share * p.batch_size) * p.outliers.enabled
    n = int(parts["digits"])
    print(
        f"\nwhere an epoch's time goes (the trainer in line, {n:,} digits, batches of "
        f"{p.batch_size} digits + {rows - p.batch_size} outliers; median of 3 epochs)"
    )
    epoch = parts["epoch"]
    shown = ("batch", "outliers", "augment", "forward", "loss", "backward", "optimizer")
    for name in shown:
        print(f"  {name:<34}{parts[name]:>7.3f} s {parts[name] / epoch:>6.1%}")
    other = epoch - sum(parts[k] for k in shown)
    print(f"  {'(loop, schedule, metrics)':<34}{other:>7.3f} s {other / epoch:>6.1%}")
    print(f"  {'epoch':<34}{epoch:>7.3f} s")
    prod = parts["products"]
    print(f"  of forward + backward, the products  {prod:>7.3f} s {prod / epoch:>6.1%}")
    alone = n / portable_limit * rows / p.batch_size
    print(f"  the products at the portable limit  {alone:>7.3f} s  ({rows} rows per "
          f"{p.batch_size} digits)")  # fmt: skip


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
        if args.child == "inline":  # the trainer before the producer thread: same bytes
            import digits.stages.train

            digits.stages.train.prefetch = lambda batches: batches
        out["rates"] = time_trainer(params, x, y, args.epochs, args.repeats)
        if not args.accurate:
            out["gemm"] = gemm_rates(sizes, params.train.batch_size)
            out["numerics"] = tracking.numerics_tags()
        if args.profile:
            out["profile"] = profile(params, x, y)
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
    inline = run_child("inline", args)
    unpinned = run_child("unpinned", args)
    former = run_child("former", args)
    accurate = run_child("portable", args, accurate=True)
    usual = run_child("usual", args)

    limit_gemm = max(unpinned["gemm"].values())
    limit = limit_gemm * 1e9 / flops
    portable_limit = portable["gemm"]["numpy"] * 1e9 / flops  # the products alone, pinned
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
    print(f"{'trainer':<46}{'samples/s':>11}{'vs unpinned':>13}{'vs limit':>10}"
          f"{'vs portable limit':>19}")  # fmt: skip
    rows = (
        ("portable (default: OpenBLAS Haswell)", portable),
        ("portable, batches in line (before)", inline),
        ("unpinned (MKL, every core)", unpinned),
        ("former pins (MKL COMPATIBLE)", former),
        ("portable, accurate profile (augmented)", accurate),
        ("usual: DataLoader batch 64 (unpinned)", usual),
    )
    for name, r in rows:
        sps = r["median"]
        print(f"{name:<46}{sps:>11,.0f}{sps / unpinned['median']:>12.2f}x{sps / limit:>9.2f}x"
              f"{sps / portable_limit:>18.2f}x")  # fmt: skip
    print(
        f"\nportable / unpinned = {portable['median'] / unpinned['median']:.2f} (target >= 0.6); "
        f"the pins cost {unpinned['median'] / portable['median']:.2f}x "
        f"(the former pins: {unpinned['median'] / former['median']:.2f}x)"
    )
    print(f"limit: {limit:,.0f} samples/s = {limit_gemm:.0f} GFLOP/s / {flops / 1e6:.2f} MFLOP")
    print(
        f"portable limit (the products alone, pinned): {portable_limit:,.0f} samples/s = "
        f"{portable['gemm']['numpy']:.0f} GFLOP/s / {flops / 1e6:.2f} MFLOP; the trainer at "
        f"{portable['median'] / portable_limit:.2f} of it (target >= 0.5), "
        f"{portable['median'] / inline['median']:.2f}x the in-line trainer"
    )
    if "profile" in portable:
        print_profile(portable["profile"], params.train, portable_limit)


if __name__ == "__main__":
    main()
