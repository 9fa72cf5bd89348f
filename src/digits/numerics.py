"""Bit-for-bit reproducible arithmetic on any x86-64 CPU with AVX2, Intel or AMD, any core count.

The same params on two CPUs gave two models, because the math libraries pick kernels by CPU,
and split sums by thread count: MKL's sgemm (the matmuls) by vendor, instruction set and thread
count, ATen's own kernels (element-wise ops, reductions, the fused Adam step) by "CPU capability"
and thread count, oneDNN by its own ISA probe. The pins:
- MKL's COMPATIBLE branch (SSE2 without the approximate rcpps/rsqrtps): the only branch MKL
  honours on non-Intel CPUs. `AVX2` is Intel-only: on an AMD CPU MKL silently falls back to its
  AUTO branch, so an AMD and an Intel machine trained different models (measured).
- ATen and oneDNN capped at AVX2: the same vector code on AVX-512 CPUs.
- Two threads for MKL and ATen: COMPATIBLE has no thread-independent (STRICT) mode, and ATen
  splits large reductions by thread; 1 and 2 threads agree, 4 and 16 do not (measured), so a
  16-core machine must not use 16.
The libraries read these variables once, when they load: `pin()` must run before
`import torch`, so every entry point (the stage scripts, `digits`, the tests, the benchmarks)
calls it first. A value the user set already wins.

`DIGITS_PORTABLE_NUMERICS=0` turns the pins off (for speed experiments; results then depend on
the CPU). What cannot be pinned: GPUs, other torch/MKL builds, ARM, CPUs without AVX2."""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

PINS: dict[str, str] = {
    "MKL_CBWR": "COMPATIBLE",  # MKL: the one code path that is the same on Intel and AMD
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels: AVX2 even on AVX-512 CPUs
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (some convolutions and matmuls): AVX2 at most
    "OMP_NUM_THREADS": "2",  # ATen's threads: sums split the same way on any core count
    "MKL_NUM_THREADS": "2",  # MKL's threads (torch matches its own to MKL's when it loads)
}
SWITCH = "DIGITS_PORTABLE_NUMERICS"


def pin(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the pins (unless the user set them, or turned them off); return those in force.

    Must run before torch is imported: afterwards the libraries have read their settings."""
    env = os.environ if environ is None else environ
    if env.get(SWITCH, "1") == "0":
        return {}
    for key, value in PINS.items():
        env.setdefault(key, value)
    return {key: env[key] for key in PINS}


def pinned_too_late() -> bool:
    """True when torch was loaded before `pin()`: its libraries ignore later changes."""
    return "torch" in sys.modules


def pin_or_reexec() -> None:
    """For scripts that import torch at their top (the benchmarks): set the pins and, if torch
    is already loaded without them, run the script again in a fresh process that has them."""
    before = {k: os.environ.get(k) for k in PINS}
    pinned = pin()
    if pinned_too_late() and any(before[k] != v for k, v in pinned.items()):
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def describe() -> dict[str, str]:
    """The numeric environment, as MLflow tags: enough to explain why two runs differ."""
    import torch

    mkl = ""
    if torch.backends.mkl.is_available():
        for line in torch.__config__.show().splitlines():
            if "Math Kernel Library" in line:
                mkl = line.split("Library Version", 1)[-1].strip(" :")
                break
    return {
        "numerics.torch": torch.__version__,
        "numerics.mkl": mkl,
        "numerics.cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numerics.threads": str(torch.get_num_threads()),
        "numerics.pins": ",".join(f"{k}={os.environ[k]}" for k in PINS if k in os.environ) or "off",
    }
