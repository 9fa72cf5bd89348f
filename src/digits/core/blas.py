"""The matrix products of training and scoring: numpy's bundled OpenBLAS, on the kernels and
thread count that `digits.core.numerics` pins, so that they give the same bytes on every x86-64 CPU
with AVX2 (see numerics for why, and what was measured).

numpy only, no torch: the model's torch layers (`digits.model.network.PortableLinear`) and the
torch-free inference (`digits.model.inference`) both multiply here."""

from __future__ import annotations

import os
import sys

import numpy as np

from digits.core import numerics

_threads_pinned = False


def portable() -> bool:
    """True when the products must be the portable ones (the pins are on)."""
    return numerics.enabled()


def pin_threads() -> None:
    """OpenBLAS on the pinned thread count, set at run time: OpenBLAS caps
    OPENBLAS_NUM_THREADS at the core count, and 1 and 2 threads give different bytes, so a
    1-core machine would otherwise compute another model. Once per process; a no-op when the
    pins are off."""
    global _threads_pinned
    if _threads_pinned or not portable():
        return
    from threadpoolctl import ThreadpoolController

    threads = int(os.environ.get("OPENBLAS_NUM_THREADS", numerics.BLAS_THREADS))
    for lib in ThreadpoolController().select(internal_api="openblas").lib_controllers:
        if lib.num_threads != threads:
            lib.set_num_threads(threads)
        if lib.architecture not in numerics.PORTABLE_CORETYPES:
            why = os.environ.get("OPENBLAS_CORETYPE")
            why = f"OPENBLAS_CORETYPE={why}" if why else "numpy was loaded before the pins"
            print(
                f"digits: warning: numpy's OpenBLAS runs its {lib.architecture} kernels, not "
                f"Haswell ({why}): results will differ from other machines'",
                file=sys.stderr,
            )
    _threads_pinned = True


def use_threads(threads: int) -> None:
    """OpenBLAS on `threads` threads from now on, whatever the pins say: for a server whose
    processes each answer one request at a time (digits.serve.app), where two threads per process
    spin against each other for the cores and gain nothing on one picture's products."""
    global _threads_pinned
    from threadpoolctl import ThreadpoolController

    ThreadpoolController().select(internal_api="openblas").limit(limits=threads)
    _threads_pinned = True  # and pin_threads leaves it so


def _blasable(a: np.ndarray) -> np.ndarray:
    """float32, and laid out so that numpy hands it to OpenBLAS (C- or Fortran-contiguous):
    numpy multiplies any other layout with its own loop, which is neither fast nor pinned."""
    a = np.asarray(a, dtype=np.float32)
    if a.flags.c_contiguous or a.flags.f_contiguous:
        return a
    return np.ascontiguousarray(a)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for 2-D float32 arrays, through OpenBLAS's sgemm on the pinned kernels."""
    pin_threads()
    return np.matmul(_blasable(a), _blasable(b))


def describe() -> str:
    """OpenBLAS's version, kernels and threads, e.g. "0.3.31 Haswell, 2 threads"."""
    from threadpoolctl import ThreadpoolController

    pin_threads()
    libs = ThreadpoolController().select(internal_api="openblas").lib_controllers
    return "; ".join(f"{lib.version} {lib.architecture}, {lib.num_threads} threads" for lib in libs)
