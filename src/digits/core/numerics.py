"""Bit-for-bit reproducible arithmetic on any x86-64 CPU with AVX2, Intel or AMD, any core count,
at the machine's speed.

The math libraries pick kernels by CPU and split sums by thread count, so the same params on two
machines gave two models. The pins:
- The matrix products (all of training's and scoring's FLOPs) run in numpy's bundled OpenBLAS
  (`digits.core.blas`), forced onto its Haswell kernels (AVX2 + FMA) on every CPU: OpenBLAS picks a
  core type's kernels and blocking from compile-time tables, not from the CPU it finds, so the
  same core type gives the same bytes on Intel and AMD. They run at about the machine's AVX2 rate;
  MKL's one vendor-neutral mode (`MKL_CBWR=COMPATIBLE`, SSE2) ran at a third of it.
- OpenBLAS on exactly two threads (1, 2 and 4 threads give three different results: the work is
  split differently). The environment variable is capped at the core count, so `blas.pin_threads`
  also sets two at run time, which a 1-core machine honours.
- torch (ATen) on one thread: its reductions split by thread count, and its OpenMP threads spin
  on the cores OpenBLAS's threads need (measured: 6,000 samples/s instead of 90,000).
- ATen's and oneDNN's vector code capped at AVX2, numpy's at X86_V3 (AVX2): the same code on
  AVX-512 CPUs. MKL, which torch still calls for a few small products (the augmentation's
  sampling grid), stays on its vendor-neutral COMPATIBLE branch.
The libraries read these variables once, when they load: `pin()` must run before numpy or torch
is imported, so every entry point (the stage scripts, `digits`, the tests, the benchmarks) calls
it first. A value the user set already wins (and is recorded in the run's `numerics.*` tags).

`DIGITS_PORTABLE_NUMERICS=0` turns the pins off: torch's own `nn.Linear` on MKL at full speed
(results then depend on the CPU). What cannot be pinned: GPUs, other torch, numpy or OpenBLAS
builds (the lock file pins them), ARM, CPUs without AVX2."""

from __future__ import annotations

import os
from collections.abc import MutableMapping

BLAS_THREADS = 2
PINS: dict[str, str] = {
    "OPENBLAS_CORETYPE": "Haswell",  # numpy's OpenBLAS: its AVX2 kernels on every CPU
    "OPENBLAS_NUM_THREADS": str(BLAS_THREADS),  # also set at run time (blas.pin_threads)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy's own loops: AVX2
    "OMP_NUM_THREADS": "1",  # ATen: one thread, the same sums on any core count
    "MKL_NUM_THREADS": "1",  # MKL's threads (torch matches its own to MKL's when it loads)
    "MKL_CBWR": "COMPATIBLE",  # MKL: the one code path that is the same on Intel and AMD
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels: AVX2 even on AVX-512 CPUs
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (the corruption suite's blur): AVX2 at most
}
# Not for the bytes, for speed: OpenBLAS's idle threads spin for 2^n cycles before they sleep
# (default n = 28: a tenth of a second), taking the core the trainer's batch producer runs on
# between two products (digits.model.batches). 2^4 cycles: they sleep at once. Measured, a
# training epoch 17% shorter on 2 cores; the products' bytes do not depend on it.
SPEED: dict[str, str] = {"OPENBLAS_THREAD_TIMEOUT": "4"}
SWITCH = "DIGITS_PORTABLE_NUMERICS"
# OpenBLAS core types with the Haswell kernels (Zen is an alias: measured, the same bytes)
PORTABLE_CORETYPES = ("Haswell", "Zen")


def enabled(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the portable numerics are on (the default)."""
    env = os.environ if environ is None else environ
    return env.get(SWITCH, "1") != "0"


def pin(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the pins (unless the user set them, or turned them off); return those in force.

    Must run before numpy or torch is imported: afterwards the libraries have read them."""
    env = os.environ if environ is None else environ
    if not enabled(env):
        return {}
    for key, value in {**PINS, **SPEED}.items():
        env.setdefault(key, value)
    return {key: env[key] for key in PINS}
