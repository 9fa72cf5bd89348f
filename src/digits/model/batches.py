"""One epoch's training batches, made on the second core while the first one trains.

A step is two kinds of work. The matrix products (digits.core.blas) keep both cores busy; the
rest of the step (gathering the batch, drawing outliers, the augmentation) is torch on one
thread, and it used to run between the products, with the other core idle. `prefetch` runs the
batch producer in a thread, a batch or two ahead, so that it fills those gaps (torch releases
the GIL in its kernels), at a lower priority than the products (`NICE`), and
digits.core.numerics has OpenBLAS's idle threads sleep at once rather than spin
(`OPENBLAS_THREAD_TIMEOUT`), so that they leave the core to it between two products.

Same bytes as making each batch in line: every random draw of an epoch (the order, the
outliers, the augmentation) happens in the producer, in the order the in-line loop made them,
on torch's global generator, and the trainer draws nothing while the producer runs (`prefetch`
is only used when the step itself draws nothing: no dropout). The producer finishes its epoch
before the trainer's last step, so the generator's state that a checkpoint saves at the end of
an epoch is the one the in-line loop would have saved."""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from digits.core.config import TrainParams
from digits.model.augment import augment_batch

T = TypeVar("T")


def epoch_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    p: TrainParams,
    *,
    augment=None,
    outliers: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) per batch of one pass over (x, y) in a fresh random order. With
    `outliers`, each batch's images end with `p.outliers.share` of its size in non-digits drawn
    from them (more rows than labels: the trainer gives those the uniform target); with
    `augment`, the whole batch is augmented. Every batch is a new tensor that the trainer owns."""
    perm = torch.randperm(len(x), device=x.device)
    for idx in perm.split(p.batch_size):
        b = len(idx)
        k = round(p.outliers.share * b) if outliers is not None else 0
        xb = torch.empty(b + k, x.shape[1], dtype=x.dtype, device=x.device)
        torch.index_select(x, 0, idx, out=xb[:b])  # one copy, no torch.cat
        if outliers is not None and k:
            pick = torch.randint(len(outliers), (k,), device=x.device)
            torch.index_select(outliers, 0, pick, out=xb[b:])
        if augment is not None:
            xb = augment_batch(xb, augment, p.augment.group_size, owned=True)
        yield xb, y[idx]


_DONE = object()
# The producer's thread yields to the products: at the same priority it takes a core from
# OpenBLAS's second thread in the middle of a product, and the product waits for it. Niceness
# 10 (not 19: on a busy machine it still gets a tenth of a core against a normal process).
# Measured on 2 cores, an epoch 0.95 s at 10 against 1.05 s at 0 (1.24 s in line).
NICE = 10


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced in a background thread up to `depth` ahead. An exception in the
    producer is raised here, at the item it would have been; a consumer that stops early
    stops the producer too."""
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        """False once the consumer has gone (the queue may stay full forever)."""
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        if sys.platform == "linux":  # a thread's own niceness (elsewhere: the process's)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((_DONE, e))

    thread = threading.Thread(target=produce, name="digits-batches", daemon=True)
    thread.start()
    try:
        while True:
            item, error = out.get()
            if error is not None:
                raise error
            if item is _DONE:
                break
            yield item
    finally:
        stop.set()
        thread.join()
