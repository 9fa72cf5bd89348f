"""The trainer's batch producer (digits.model.batches): a thread that makes the batches ahead
gives the same bytes as making them in line, hands the producer's errors to the trainer, and
stops when the trainer stops."""

from __future__ import annotations

import threading

import pytest
import torch

from digits.core.config import parse_params
from digits.model import batches
from digits.model.augment import make_augment
from service import wait_for

PARAMS = {
    "epochs": 2,
    "batch_size": 32,
    "device": "cpu",
    "hidden_sizes": [32],
    "augment": {"enabled": True, "method": "warp", "shear": 5.0, "warp_elastic": 1.0,
                "noise_std": 0.3, "strokes": True, "erase": 6},
    "outliers": {"enabled": True, "share": 0.25, "per_kind": 4},
}  # fmt: skip


def data(n: int = 200):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, 784, generator=g), torch.randint(10, (n,), generator=g)
    return x, y, x[:50], y[:50]


def producers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "digits-batches"]


def test_prefetch_gives_every_item_in_order():
    assert list(batches.prefetch(iter(range(100)), depth=3)) == list(range(100))
    assert not producers()


def test_the_producers_error_reaches_the_consumer_at_its_place():
    def items():
        yield 1
        yield 2
        raise ValueError("bad batch")

    got = []
    with pytest.raises(ValueError, match="bad batch"):
        got.extend(batches.prefetch(items()))
    assert got == [1, 2] and not producers()


def test_a_consumer_that_stops_early_stops_the_producer():
    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    gen = batches.prefetch(endless(), depth=2)
    assert [next(gen) for _ in range(5)] == [0, 1, 2, 3, 4]
    gen.close()
    wait_for("the producer thread to end", lambda: not producers())
    assert len(made) <= 5 + 2 + 1  # what was taken, the queue, and one in the producer's hand


def test_a_batch_is_its_digits_then_the_outliers_all_augmented():
    p = parse_params({"train": PARAMS}).train
    x, y, _, _ = data()
    pool = torch.zeros(10, 784)
    torch.manual_seed(0)
    made = list(batches.epoch_batches(x, y, p, outliers=pool))  # no augmentation
    assert [len(b[1]) for b in made] == [32] * 6 + [8]
    assert [len(b[0]) for b in made] == [40] * 6 + [10]  # a quarter more: the outliers
    seen = torch.cat([b[1] for b in made])
    assert sorted(seen.tolist()) == sorted(y.tolist())  # every digit once
    assert all(b[0][len(b[1]) :].eq(0).all() for b in made)
    torch.manual_seed(0)
    warped = list(batches.epoch_batches(x, y, p, outliers=pool, augment=make_augment(p.augment)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(made, warped, strict=True))
    assert not torch.equal(made[0][0], warped[0][0])


def test_batches_made_in_a_thread_train_the_bytes_made_in_line(monkeypatch):
    """Fails if the producer draws anything out of the in-line order (or from another
    generator): the model and the generator's state after training are compared."""
    import digits.stages.train as stage

    p = parse_params({"train": PARAMS}).train
    pool = torch.rand(40, 784, generator=torch.Generator().manual_seed(2))
    threads = []
    real = stage.prefetch

    def spy(items):
        threads.append(True)
        return real(items)

    def trained(prefetch) -> tuple[bytes, torch.Tensor]:
        monkeypatch.setattr(stage, "prefetch", prefetch)
        result = stage.train(p, data(), outliers=pool, progress=False)
        weights = b"".join(v.numpy().tobytes() for v in result.model.state_dict().values())
        return weights, torch.get_rng_state()

    threaded = trained(spy)
    in_line = trained(lambda items: items)
    assert threads == [True, True]  # one producer per epoch
    assert threaded[0] == in_line[0]
    assert torch.equal(threaded[1], in_line[1])  # what a checkpoint saves
