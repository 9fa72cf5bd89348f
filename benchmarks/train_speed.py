"""Training speed, three ways, in one process on the same 60,000 MNIST training images:

  1. usual  : the way the seed project trains: torchvision.datasets.MNIST with ToTensor, a
              DataLoader with batch size 64 (shuffled, no workers), Adam at lr 1e-3;
  2. digits : the project's own trainer (src/digits/train.py) with the params.yaml defaults,
              and with the accurate profile's params (`make accurate`: batch augmentation);
  3. limit  : the machine's measured float32 matrix-multiply rate divided by the training FLOPs
              per sample (6 x parameters: 2 for the forward pass, 4 for the backward).

Both trainers run the same network for the same number of epochs; the figures that matter are
the ratios, since a loaded machine slows every row alike.

    python benchmarks/train_speed.py                  # 1 epoch each
    python benchmarks/train_speed.py --epochs 2 --profile

MNIST comes from data/raw if `dvc repro` has run, else from $MNIST_MIRROR / $MNIST_DIR /
../shared/mnist (a local folder of the four official .gz files)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from digits import numerics
from digits.config import load_params
from digits.mnist import RESOURCES
from digits.model import build_mlp, count_parameters
from digits.train import train

ROOT = Path(__file__).resolve().parents[1]


def find_mnist() -> Path:
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


def torchvision_dataset(src: Path, workdir: Path):
    """torchvision's own MNIST class on the official files (copied where it looks for them)."""
    from torchvision import datasets, transforms

    raw = workdir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, _ in RESOURCES:
        shutil.copy(src / name, raw / name)
    # download=True finds the verified .gz files and only extracts them: no network
    return datasets.MNIST(str(workdir), train=True, download=True, transform=transforms.ToTensor())


def mnist_tensors(src: Path):
    """The 60,000 training images as float32 in [0, 1] and their labels, read with the
    pipeline's own IDX reader."""
    from digits.data import read_pair

    x, y = read_pair(src, "train")
    return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y).long()


def usual_way(dataset, hidden_sizes, epochs: int) -> float:
    """The seed project's loop; returns samples per second."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    model = build_mlp(hidden_sizes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = loss_fn(model(x.view(len(x), -1)), y)
            loss.backward()
            opt.step()
            n += len(x)
    return n / (time.perf_counter() - t0)


def digits_way(params, x, y, epochs: int) -> float:
    p = params.train.model_copy(update={"epochs": epochs})
    t0 = time.perf_counter()
    # validation on a slice: the epoch-end pass the trainer always makes, at its real cost
    train(p, x, y, x[:5000], y[:5000], progress=False)
    return epochs * len(x) / (time.perf_counter() - t0)


def accurate_params(params):
    """params.yaml with the `-S train.*=...` overrides of the Makefile's ACCURATE profile
    applied: the benchmark measures what `make accurate` trains, from the one place it is
    defined."""
    import re

    import yaml

    from digits.config import parse_params

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


def matmul_rate(size: int = 1024, seconds: float = 2.0) -> float:
    """Sustained float32 GEMM FLOP/s on this machine, with torch's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * size**3 * reps / (time.perf_counter() - t0)


def profile(params, x, y) -> None:
    """Where a training step's time goes (the digits trainer, 30 steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    p = params.train.model_copy(update={"epochs": 1})
    n = 30 * p.batch_size
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train(p, x[:n], y[:n], x[:1000], y[:1000], progress=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def unpinned_rate(epochs: int) -> float:
    """The digits trainer's rate in a fresh process without the reproducibility pins (the
    libraries read them at load time, so this cannot run in the pinned process)."""
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINS}
    env[numerics.SWITCH] = "0"
    out = subprocess.run(
        [sys.executable, __file__, "--epochs", str(epochs), "--digits-only"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.split()[-1])


def main() -> None:
    numerics.pin_or_reexec()  # the pipeline's numerics: what the trainer really runs with
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1, help="epochs for both trainers (default 1)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table")
    ap.add_argument("--digits-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    params = load_params(ROOT / "params.yaml")
    if args.digits_only:  # the child of `unpinned_rate`
        x, y = mnist_tensors(find_mnist())
        print(digits_way(params, x, y, args.epochs))
        return
    hidden = params.train.hidden_sizes
    with tempfile.TemporaryDirectory() as tmp:
        ds = torchvision_dataset(find_mnist(), Path(tmp))
        x = ds.data.view(len(ds.data), -1).float().div_(255)
        y = ds.targets.clone()
        usual = usual_way(ds, hidden, args.epochs)
    ours = digits_way(params, x, y, args.epochs)
    accurate = accurate_params(params)
    augmented = digits_way(accurate, x, y, args.epochs)
    unpinned = unpinned_rate(args.epochs)
    flops_per_sample = 6 * count_parameters(build_mlp(hidden))
    rate = matmul_rate()
    limit = rate / flops_per_sample

    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; sgemm {rate / 1e9:.0f} GFLOP/s"
    )
    print(
        f"network: {count_parameters(build_mlp(hidden)):,} parameters, "
        f"{flops_per_sample / 1e6:.2f} MFLOP per training sample; {args.epochs} epoch(s), "
        f"{len(x):,} images"
    )
    print(
        f"digits params: batch {params.train.batch_size}, lr {params.train.lr}, "
        f"schedule {params.train.schedule}, device {params.train.device}"
    )
    print()
    print(f"{'way':<34}{'samples/s':>12}{'vs usual':>10}{'vs limit':>10}")
    for name, sps in (
        ("1. usual (DataLoader, batch 64)", usual),
        ("2. digits trainer (params.yaml)", ours),
        ("   the same without the pins", unpinned),
        ("   accurate profile (augmented)", augmented),
        ("3. limit (sgemm / 6 x params)", limit),
    ):
        print(f"{name:<34}{sps:>12,.0f}{sps / usual:>9.1f}x{sps / limit:>9.2f}x")
    print(
        f"\nreproducibility pins ({', '.join(f'{k}={v}' for k, v in numerics.PINS.items())}): "
        f"pinned / unpinned rate = {ours / unpinned:.2f}"
    )
    a = accurate.train
    print(
        f"accurate profile: batch {a.batch_size}, augment.method {a.augment.method}; the "
        f"augmentation costs {ours / augmented - 1:.0%} on top of a plain step"
        + (" (batch sizes differ)" if a.batch_size != params.train.batch_size else "")
    )
    if args.profile:
        print()
        profile(params, x, y)


if __name__ == "__main__":
    main()
