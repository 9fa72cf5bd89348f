"""Bit-for-bit training across core counts, thread settings and CPU kernels (the committed lock
must come out on any x86-64 machine with AVX2). Each run is a fresh process, since the math
libraries read their settings when they load; the pins come from `digits.core.numerics.pin()`, as
in the stages. docs/reproducibility.md says which CPUs each claim was measured on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from digits.core import numerics
from helpers import ROOT, mnist_dir

# Two epochs of the default trainer on 6,000 real MNIST images: the pipeline's own shapes
# (batch 512 through 784-256-128-64-32-10), small enough for seconds per run. The child prints
# what it ran on, then the weights' sha256.
SCRIPT = """
import hashlib, os, sys
if sys.argv[2] != "all":
    os.sched_setaffinity(0, {int(c) for c in sys.argv[2].split(",")})
from digits.core import numerics
numerics.pin()
import torch
from digits.core import blas
from digits.core.config import TrainParams
from digits.data.preprocess import read_pair
from digits.stages.train import train
x, y = read_pair(__import__("pathlib").Path(sys.argv[1]), "train")
x = torch.from_numpy(x[:6000]).float().div_(255.0); y = torch.from_numpy(y[:6000]).long()
p = TrainParams(epochs=2, device="cpu")
result = train(p, (x[:5000], y[:5000], x[5000:], y[5000:]), progress=False)
h = hashlib.sha256()
for k, v in result.model.state_dict().items():
    h.update(k.encode()); h.update(v.numpy().tobytes())
info = blas.describe() if blas.portable() else "off"
cores = len(os.sched_getaffinity(0))
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), cores)
print(info)
print(h.hexdigest())
"""


def train_hash(cpus: str = "all", **env: str) -> tuple[str, str, str]:
    """(what ATen ran on: capability, threads, cores; OpenBLAS's kernels and threads; the weights'
    sha256) of a run in a fresh process on `cpus` ("0": one core), with `env` over the pins."""
    full = {k: v for k, v in os.environ.items() if k not in numerics.PINS}
    full.update(env)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(mnist_dir()), cpus],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout.splitlines()
    return out[-3], out[-2], out[-1]


# The weights hash of SCRIPT under the pins, meant to be the same on every x86-64 CPU with AVX2
# (and the locked torch, numpy and OpenBLAS): measured on an AMD EPYC (Zen 4, AVX-512) with 2
# cores and with 1 (docs/reproducibility.md). `.ci/check_reproduced.py` checks the same for the
# whole pipeline against dvc.lock.
PORTABLE_HASH = "847ecb538221ce19280af9e4aeb594f703648bc5eb83c3ec8b7d110b15be5fc9"


@pytest.fixture(scope="module")
def pinned() -> tuple[str, str, str]:
    return train_hash()


@pytest.mark.slow
def test_pinned_training_gives_the_same_bytes_on_every_cpu(pinned):
    """Whatever this CPU is (AMD or Intel, AVX2 or AVX-512, 1 or 16 cores), the pins make ATen
    run its AVX2 kernels on one thread and OpenBLAS its Haswell kernels on two: the bytes are
    the ones measured when PORTABLE_HASH was written. A failure here on a new CPU means the pins
    do not cover it (docs/reproducibility.md says what they cover)."""
    aten, openblas, digest = pinned
    assert aten.split()[:2] == ["AVX2", "1"]
    assert openblas.endswith("Haswell, 2 threads"), openblas
    assert digest == PORTABLE_HASH


@pytest.mark.slow
def test_one_core_gives_the_bytes_of_two(pinned):
    """OpenBLAS caps OPENBLAS_NUM_THREADS at the core count, and one thread sums differently:
    the run-time thread pin (digits.core.blas.pin_threads) keeps two threads on one core."""
    aten, openblas, digest = train_hash("0")
    assert aten.split()[2] == "1"  # really one core
    assert openblas.endswith("2 threads")
    assert digest == pinned[2]


@pytest.mark.slow
def test_openblas_kernels_decide_the_bytes(pinned):
    """The Zen core type is the Haswell kernels under another name: the same bytes. The pin is
    what makes them the same everywhere: OpenBLAS's own choice for an AVX-512 CPU (SkylakeX)
    gives other bytes; four threads split the products otherwise and give other bytes too."""
    assert train_hash(OPENBLAS_CORETYPE="Zen")[2] == pinned[2]
    assert train_hash(OPENBLAS_NUM_THREADS="4")[2] != pinned[2]
    if " avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("no AVX-512 here: OpenBLAS's SkylakeX kernels cannot run")
    assert train_hash(OPENBLAS_CORETYPE="SkylakeX")[2] != pinned[2]


@pytest.mark.slow
def test_unpinned_training_is_torchs_own(pinned):
    """DIGITS_PORTABLE_NUMERICS=0: torch's nn.Linear on MKL, whatever this CPU offers."""
    _, openblas, digest = train_hash(**{numerics.SWITCH: "0"})
    assert openblas == "off" and digest != pinned[2]


def test_pin_sets_every_pin_and_leaves_a_users_own_values_alone():
    env = {"OPENBLAS_CORETYPE": "Zen", "OMP_NUM_THREADS": "3"}  # a user's, not the pins'
    pins = numerics.pin(env)
    assert env["OPENBLAS_CORETYPE"] == "Zen" and env["OMP_NUM_THREADS"] == "3"
    assert pins == {k: env[k] for k in numerics.PINS}  # in force, the user's values included
    assert env["OPENBLAS_THREAD_TIMEOUT"] == numerics.SPEED["OPENBLAS_THREAD_TIMEOUT"]
    for key, value in numerics.PINS.items():
        if key not in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS"):
            assert env[key] == value, key
    assert numerics.pin({numerics.SWITCH: "0"}) == {}
    off = {numerics.SWITCH: "0"}
    numerics.pin(off)
    assert off == {numerics.SWITCH: "0"}  # switched off: nothing set
