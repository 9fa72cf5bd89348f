"""Bit-for-bit training across thread counts and CPU kernels (issue: the committed lock must
come out on any x86-64 machine). Each run is a fresh process, since the math libraries read
their settings when they load; the pins come from `digits.numerics.pin()`, as in the stages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from digits import numerics
from helpers import ROOT, mnist_dir

# Two epochs of the default trainer on 6,000 real MNIST images: the pipeline's own shapes
# (batch 512 through 784-256-128-64-32-10), small enough for seconds per run.
SCRIPT = """
import hashlib, sys
from digits import numerics
numerics.pin()
import torch
from digits.config import TrainParams
from digits.data import read_pair
from digits.train import train
x, y = read_pair(__import__("pathlib").Path(sys.argv[1]), "train")
x = torch.from_numpy(x[:6000]).float().div_(255.0); y = torch.from_numpy(y[:6000]).long()
p = TrainParams(epochs=2, device="cpu")
result = train(p, x[:5000], y[:5000], x[5000:], y[5000:], progress=False)
h = hashlib.sha256()
for k, v in result.model.state_dict().items():
    h.update(k.encode()); h.update(v.numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), h.hexdigest())
"""


def train_hash(threads: int, **env: str) -> tuple[str, str]:
    """(CPU capability in use, weights hash) of a run in a fresh process."""
    full = {k: v for k, v in os.environ.items() if k not in numerics.PINS}
    full.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **env})
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(mnist_dir())],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    assert out[1] == str(threads)
    return out[0], out[2]


def cpu_capabilities() -> list[str]:
    """The ATen capabilities this CPU can run, from its flags (avx2 at least, on x86-64)."""
    flags = Path("/proc/cpuinfo").read_text()
    caps = ["avx2"] if " avx2" in flags else []
    if " avx512f" in flags and " avx512bw" in flags and " avx512vl" in flags:
        caps.append("avx512")
    return caps


@pytest.mark.slow
def test_pinned_training_is_identical_at_1_and_2_threads():
    assert train_hash(1)[1] == train_hash(2)[1]


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_pinned_training_ignores_the_cpu_capability(capability):
    """The pins cap ATen at AVX2: a CPU that could run AVX-512 kernels gives the AVX2 bytes.
    Emulated here by asking ATen for each capability this CPU has."""
    if capability not in cpu_capabilities():
        pytest.skip(f"this CPU has no {capability}")
    pinned = train_hash(2)
    asked = train_hash(2, ATEN_CPU_CAPABILITY=capability)
    assert pinned[0] == "AVX2"
    assert asked[1] == pinned[1]


def test_pins_leave_a_users_own_values_alone():
    env = {"MKL_CBWR": "COMPATIBLE"}
    pins = numerics.pin(env)
    assert pins["MKL_CBWR"] == "COMPATIBLE"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert numerics.pin({numerics.SWITCH: "0"}) == {}
