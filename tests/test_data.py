"""IDX parsing (every malformed file is a DataError naming it) and the preprocess step
(stratified split, the processed files' contract, nothing written from a bad input)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from digits.data.preprocess import (
    DataError,
    check_arrays,
    load_split,
    preprocess,
    read_idx,
    read_pair,
    split,
)
from helpers import make_fake_mnist, write_idx

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
LABELS = np.array([0, 1, 2, 3, 9, 5, 0], dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_round_trip(tmp_path, suffix):
    imgs = read_idx(write_idx(tmp_path / f"images{suffix}", IMAGES), "images")
    labels = read_idx(write_idx(tmp_path / f"labels{suffix}", LABELS), "labels")
    assert imgs.dtype == np.uint8 and imgs.shape == (7, 784)
    np.testing.assert_array_equal(imgs, IMAGES.reshape(7, 784))
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, LABELS)
    assert imgs.flags.writeable  # a copy, not a view of the read-only file buffer


def _gz(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(gzip.compress(data, mtime=0))
    return p


def _good_image_bytes() -> bytes:
    return (
        (0x803).to_bytes(4, "big")
        + b"".join(d.to_bytes(4, "big") for d in IMAGES.shape)
        + IMAGES.tobytes()
    )


def bad_wrong_magic(tmp_path):
    return write_idx(tmp_path / "x-images.gz", IMAGES, magic=0x0801), "images", "magic"


def bad_labels_as_images(tmp_path):
    return write_idx(tmp_path / "x-labels.gz", np.tile(LABELS, 5)), "images", "magic"


def bad_dimensions(tmp_path):
    return write_idx(tmp_path / "x-images.gz", IMAGES[:, :27, :]), "images", "[7, 27, 28]"


def bad_truncated_payload(tmp_path):
    return _gz(tmp_path, "x-images.gz", _good_image_bytes()[:-100]), "images", "truncated"


def bad_trailing_bytes(tmp_path):
    return _gz(tmp_path, "x-images.gz", _good_image_bytes() + b"\0"), "images", "trailing"


def bad_truncated_header(tmp_path):
    return _gz(tmp_path, "x-images.gz", _good_image_bytes()[:10]), "images", "header"


def bad_truncated_gzip(tmp_path):
    p = write_idx(tmp_path / "x-images.gz", IMAGES)
    p.write_bytes(p.read_bytes()[:-200])
    return p, "images", "cannot read"


def _flip(p, start, stop):
    data = bytearray(p.read_bytes())
    for i in range(start, stop):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))
    return p


def bad_corrupt_gzip_data(tmp_path):
    # bytes flipped in the payload: gzip's CRC check fails
    return _flip(write_idx(tmp_path / "x-images.gz", IMAGES), 40, 60), "images", "cannot read"


def bad_corrupt_deflate_stream(tmp_path):
    # bytes flipped in the first deflate block's header (right after gzip's 10-byte header):
    # zlib itself fails, before any CRC check
    return _flip(write_idx(tmp_path / "x-images.gz", IMAGES), 10, 14), "images", "cannot read"


def bad_not_gzip(tmp_path):
    p = tmp_path / "x-images.gz"
    p.write_bytes(b"<html>404 not found</html>")
    return p, "images", "cannot read"


def bad_missing_file(tmp_path):
    return tmp_path / "nope-images.gz", "images", "cannot read"


def bad_label_10(tmp_path):
    return (
        write_idx(tmp_path / "x-labels.gz", np.array([1, 2, 10, 3], np.uint8)),
        "labels",
        "label 10 at index 2",
    )


BAD_FILES = [
    bad_wrong_magic,
    bad_labels_as_images,
    bad_dimensions,
    bad_truncated_payload,
    bad_trailing_bytes,
    bad_truncated_header,
    bad_truncated_gzip,
    bad_corrupt_gzip_data,
    bad_corrupt_deflate_stream,
    bad_not_gzip,
    bad_missing_file,
    bad_label_10,
]


@pytest.mark.parametrize("make_bad", BAD_FILES, ids=[f.__name__[4:] for f in BAD_FILES])
def test_bad_idx_raises_data_error_naming_file(tmp_path, make_bad):
    path, kind, words = make_bad(tmp_path)
    with pytest.raises(DataError) as err:
        read_idx(path, kind)
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg
    assert words in msg, msg
    assert "\n" not in msg


def test_image_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", IMAGES)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", LABELS[:5])
    with pytest.raises(DataError, match="7 images but 5 labels"):
        read_pair(tmp_path, "train")


def test_check_arrays_contract():
    x = np.zeros((20, 784), np.uint8)
    y = (np.arange(20) % 10).astype(np.uint8)
    check_arrays("ok", x, y)
    with pytest.raises(DataError, match="expected uint8 \\(N, 784\\)"):
        check_arrays("f", x.astype(np.float32), y)
    with pytest.raises(DataError, match="expected every digit"):
        check_arrays("c", x, np.where(y == 7, 0, y).astype(np.uint8))


# --- preprocess ------------------------------------------------------------------------------


def _outs(tmp_path):
    out = tmp_path / "out"
    return out / "processed/train.npz", out / "processed/test.npz", out / "reports/data.json"


def test_preprocess_fake_data(tmp_path):
    raw = make_fake_mnist(tmp_path / "raw", n_train=1000, n_test=200)
    train_out, test_out, summary_out = _outs(tmp_path)
    summary = preprocess(raw, train_out, test_out, summary_out, val_size=200, seed=3)

    with np.load(train_out, allow_pickle=False) as f:
        assert sorted(f.files) == ["train_x", "train_y", "val_x", "val_y"]
        tx, ty, vx, vy = f["train_x"], f["train_y"], f["val_x"], f["val_y"]
    with np.load(test_out, allow_pickle=False) as f:
        assert sorted(f.files) == ["test_x", "test_y"]
        sx, sy = f["test_x"], f["test_y"]
    assert tx.shape == (800, 784) and vx.shape == (200, 784) and sx.shape == (200, 784)
    assert ty.shape == (800,) and vy.shape == (200,) and sy.shape == (200,)
    assert {a.dtype for a in (tx, ty, vx, vy, sx, sy)} == {np.dtype(np.uint8)}

    # stratified: each digit's share of val is its share of train within 1 point
    share_t = np.bincount(ty, minlength=10) / len(ty)
    share_v = np.bincount(vy, minlength=10) / len(vy)
    assert np.abs(share_t - share_v).max() <= 0.01

    # a partition of the original training set: nothing lost, nothing duplicated
    orig_x = read_idx(raw / "train-images-idx3-ubyte.gz", "images")
    orig_y = read_idx(raw / "train-labels-idx1-ubyte.gz", "labels")
    ours = sorted(map(bytes, np.concatenate([np.c_[tx, ty], np.c_[vx, vy]])))
    assert ours == sorted(map(bytes, np.c_[orig_x, orig_y]))
    # the test set is untouched, in order
    np.testing.assert_array_equal(sy, read_idx(raw / "t10k-labels-idx1-ubyte.gz", "labels"))

    assert json.loads(summary_out.read_text()) == json.loads(json.dumps(summary))
    assert {k: v["count"] for k, v in summary.items()} == {"train": 800, "val": 200, "test": 200}
    assert summary["val"]["class_counts"] == [20] * 10

    # the loader scales to [0, 1] float32 and int64 labels
    x, y = load_split(train_out, "val")[:2]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.max()) == 1.0 and float(x.min()) >= 0.0
    torch.testing.assert_close(x, torch.from_numpy(vx).float() / 255)


def test_preprocess_is_deterministic(tmp_path):
    raw = make_fake_mnist(tmp_path / "raw")
    a = _outs(tmp_path / "a")
    b = _outs(tmp_path / "b")
    preprocess(raw, *a, val_size=100, seed=1)
    preprocess(raw, *b, val_size=100, seed=1)
    for pa, pb in zip(
        a, b, strict=True
    ):  # byte-identical: DVC sees no change, training is not rerun
        assert pa.read_bytes() == pb.read_bytes()
    c = _outs(tmp_path / "c")
    preprocess(raw, *c, val_size=100, seed=2)
    assert c[0].read_bytes() != a[0].read_bytes()  # the seed does choose the split


def _corrupt_test_labels(raw):
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.full(100, 11, np.uint8))
    return "t10k-labels-idx1-ubyte.gz", "outside 0-9"


def _truncate_train_images(raw):
    p = raw / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:1000])
    return "train-images-idx3-ubyte.gz", "cannot read"


def _missing_class(raw):
    labels = read_idx(raw / "t10k-labels-idx1-ubyte.gz", "labels")
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.where(labels == 4, 5, labels))
    return "test", "expected every digit"


@pytest.mark.parametrize("corrupt", [_corrupt_test_labels, _truncate_train_images, _missing_class])
def test_failed_preprocess_writes_nothing(tmp_path, fake_raw, corrupt):
    culprit, words = corrupt(fake_raw)
    outs = _outs(tmp_path)
    with pytest.raises(DataError) as err:
        preprocess(fake_raw, *outs, val_size=100, seed=0)
    assert culprit in str(err.value) and words in str(err.value)
    out_root = tmp_path / "out"
    left = [p for p in out_root.rglob("*") if p.is_file()] if out_root.exists() else []
    assert left == []  # neither outputs nor temp files


def test_val_size_larger_than_data(tmp_path, fake_raw):
    outs = _outs(tmp_path)
    with pytest.raises(DataError, match=r"data\.val_size: 600 must be below the 600"):
        preprocess(fake_raw, *outs, val_size=600, seed=0)
    assert not any(p.exists() for p in outs)


def test_failed_rerun_keeps_previous_outputs(tmp_path, fake_raw):
    outs = _outs(tmp_path)
    preprocess(fake_raw, *outs, val_size=100, seed=0)
    before = [p.read_bytes() for p in outs]
    _corrupt_test_labels(fake_raw)
    with pytest.raises(DataError):
        preprocess(fake_raw, *outs, val_size=100, seed=0)
    assert [p.read_bytes() for p in outs] == before
    assert sorted(p.name for p in outs[0].parent.iterdir()) == ["test.npz", "train.npz"]


@pytest.mark.parametrize(
    ("counts", "val_size", "seed"),
    [
        ([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949], 5000, 0),  # MNIST's
        ([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949], 5000, 7),
        ([10] * 10, 33, 3),  # equal remainders: the ties are broken by the random draws
        ([2, 3, 50, 7, 7, 7, 9, 11, 2, 30], 40, 1),
        ([4, 4, 4, 0, 9, 4, 4, 4, 4, 4], 12, 5),  # a digit missing
    ],
)
def test_split_draws_as_scikit_learn_does(counts, val_size, seed):
    """split() reimplements train_test_split(stratify=...) in numpy to keep scikit-learn's 2 s
    import out of the stage: same seed, same images in the same order."""
    from sklearn.model_selection import train_test_split

    y = np.repeat(np.arange(10, dtype=np.uint8), counts)
    y = y[np.random.default_rng(seed).permutation(len(y))]
    x = np.arange(len(y) * 2, dtype=np.int64).reshape(-1, 2)
    ours = split(x, y, val_size, seed)
    theirs = train_test_split(x, y, test_size=val_size, stratify=y, random_state=seed)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_split_refuses_a_digit_it_cannot_stratify():
    y = np.array([0, 0, 1, 1, 2, 3, 3], np.uint8)
    with pytest.raises(DataError, match=r"digit\(s\) \[2\] have one image"):
        split(np.zeros((7, 2)), y, 3, 0)
