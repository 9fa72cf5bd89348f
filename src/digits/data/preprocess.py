"""IDX parsing, the train/validation split, and loading the processed arrays as tensors.

The processed files keep pixels as uint8 (exact, a quarter of float32's size); `load_split`
scales them to float32 in [0, 1] in one vectorised step when a stage reads them."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from digits.core.errors import DigitsError
from digits.core.files import atomic_path, write_text
from digits.core.files import file_digest as file_digest  # re-exported: the stages, predict
from digits.core.mnist import COLS, NUM_CLASSES, NUM_PIXELS, ROWS

IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # uint8 data, 3 dims / 1 dim


if TYPE_CHECKING:
    from digits.core.config import Params


class DataError(DigitsError):
    pass


def read_idx(path: str | Path, kind: str) -> np.ndarray:
    """Parse an IDX file (.gz or raw). kind: 'images' -> (N, 784) uint8, 'labels' -> (N,) uint8."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated, corrupt or non-gzip file
        raise DataError(f"{path}: cannot read ({e})") from None
    ndim, magic = (3, IMAGE_MAGIC) if kind == "images" else (1, LABEL_MAGIC)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    got_magic = int.from_bytes(raw[:4], "big")
    if got_magic != magic:
        raise DataError(
            f"{path}: wrong magic number 0x{got_magic:08x}, expected 0x{magic:08x} (IDX {kind})"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if kind == "images" and dims[1:] != [ROWS, COLS]:
        raise DataError(f"{path}: wrong dimensions {dims}, expected [N, {ROWS}, {COLS}]")
    expected = int(np.prod(dims))
    payload = len(raw) - header
    if payload != expected:
        what = "truncated" if payload < expected else "trailing bytes in"
        raise DataError(f"{path}: {what} payload: {payload} bytes, header says {expected}")
    arr = np.frombuffer(raw, np.uint8, offset=header)
    if kind == "labels":
        if arr.size and arr.max() >= NUM_CLASSES:
            bad = int(np.argmax(arr >= NUM_CLASSES))
            raise DataError(f"{path}: label {arr[bad]} at index {bad} is outside 0-9")
        return arr.copy()
    return arr.reshape(dims[0], NUM_PIXELS).copy()


def read_pair(raw_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz", "images")
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz", "labels")
    if len(images) != len(labels):
        raise DataError(f"{raw_dir}/{prefix}-*: {len(images)} images but {len(labels)} labels")
    return images, labels


def split(x: np.ndarray, y: np.ndarray, val_size: int, seed: int):
    """Stratified train/validation split: each digit keeps its share in both parts.

    The same draws as scikit-learn's `train_test_split(x, y, test_size=val_size, stratify=y,
    random_state=seed)` (tests/test_data.py checks it), in numpy: importing scikit-learn took
    2 of the preprocess stage's 3 seconds. Returns train_x, val_x, train_y, val_y."""
    rng = np.random.RandomState(seed)
    counts = np.bincount(y, minlength=NUM_CLASSES)
    present = np.flatnonzero(counts)  # np.unique's classes, sorted
    counts = counts[present]
    if counts.min() < 2:
        raise DataError(f"cannot stratify: digit(s) {present[counts < 2].tolist()} have one image")
    by_class = np.split(np.argsort(y, kind="stable"), np.cumsum(counts)[:-1])
    n_train = _approximate_mode(counts, len(y) - val_size, rng)
    n_val = _approximate_mode(counts - n_train, val_size, rng)
    train: list[int] = []
    val: list[int] = []
    for members, k_train, k_val in zip(by_class, n_train, n_val, strict=True):
        shuffled = members[rng.permutation(len(members))]
        train.extend(shuffled[:k_train])
        val.extend(shuffled[k_train : k_train + k_val])
    train_idx, val_idx = rng.permutation(train), rng.permutation(val)
    return x[train_idx], x[val_idx], y[train_idx], y[val_idx]


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `draws` each class gets, in proportion to `counts`: the floors, plus one
    each for the largest remainders, ties broken at random (scikit-learn's
    `_approximate_mode`, draw for draw)."""
    continuous = counts / counts.sum() * draws
    floored = np.floor(continuous)
    need = int(draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if need <= 0:
            break
        (tied,) = np.where(remainder == value)
        add = min(len(tied), need)
        floored[rng.choice(tied, size=add, replace=False)] += 1
        need -= add
    return floored.astype(int)


def check_arrays(name: str, x: np.ndarray, y: np.ndarray) -> None:
    """The processed data's contract: uint8 (N, 784) images, uint8 labels 0-9, every class."""
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != NUM_PIXELS:
        raise DataError(f"{name}: images {x.dtype}{x.shape}, expected uint8 (N, {NUM_PIXELS})")
    if y.dtype != np.uint8 or y.shape != (len(x),):
        raise DataError(f"{name}: labels {y.dtype}{y.shape}, expected uint8 ({len(x)},)")
    counts = np.bincount(y, minlength=NUM_CLASSES)
    if len(counts) > NUM_CLASSES or counts.min() == 0:
        raise DataError(f"{name}: label counts {counts.tolist()}, expected every digit 0-9")


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    # a file object: np.savez would append .npz to a bare name
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy's stubs: allow_pickle first


def preprocess(
    raw_dir: Path, train_out: Path, test_out: Path, summary_out: Path, val_size: int, seed: int
) -> dict:
    x, y = read_pair(raw_dir, "train")
    test_x, test_y = read_pair(raw_dir, "t10k")
    if not 0 < val_size < len(x):
        raise DataError(
            f"params.yaml: data.val_size: {val_size} must be below the {len(x)} training images"
        )
    train_x, val_x, train_y, val_y = split(x, y, val_size, seed)
    parts = {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}
    for name, (px, py) in parts.items():
        check_arrays(name, px, py)
    # Stratification check: each class's share of val stays within 1 point of its share of train.
    share = {n: np.bincount(py, minlength=NUM_CLASSES) / len(py) for n, (_, py) in parts.items()}
    drift = float(np.abs(share["val"] - share["train"]).max())
    if drift > 0.01:
        raise DataError(f"validation split is not stratified (class share off by {drift:.3f})")
    save_arrays(train_out, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y)
    save_arrays(test_out, test_x=test_x, test_y=test_y)
    summary = {
        name: {
            "count": len(py),
            "class_counts": np.bincount(py, minlength=NUM_CLASSES).tolist(),
            "pixel_mean": round(float(px.mean()) / 255, 6),
        }
        for name, (px, py) in parts.items()
    }
    write_text(summary_out, json.dumps(summary, indent=2) + "\n")
    return summary


def load_split(path: Path, *names: str) -> list:
    """Load `name` pairs from a processed .npz: images as float32 tensors in [0, 1], labels as
    int64 tensors, after checking the processed data's contract."""
    import torch

    with np.load(path, allow_pickle=False) as f:
        out = []
        for name in names:
            x, y = f[f"{name}_x"], f[f"{name}_y"]
            check_arrays(f"{path}:{name}", x, y)
            out += [torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y).long()]
    return out


def load_arrays(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Split `name` of a processed .npz as numpy: float32 images in [0, 1], int64 labels (for
    the stages that score with digits.model.inference and need no torch)."""
    with np.load(path, allow_pickle=False) as f:
        x, y = f[f"{name}_x"], f[f"{name}_y"]
    check_arrays(f"{path}:{name}", x, y)
    return x.astype(np.float32) / np.float32(255.0), y.astype(np.int64)


def load_labels(path: Path, name: str) -> np.ndarray:
    """The labels of split `name` as int64, without the images (or torch): for the gate."""
    with np.load(path, allow_pickle=False) as f:
        y = f[f"{name}_y"]
    if y.dtype != np.uint8 or y.ndim != 1 or (y.size and y.max() >= NUM_CLASSES):
        raise DataError(f"{path}:{name}: labels {y.dtype}{y.shape}, expected uint8 (N,) in 0-9")
    return y.astype(np.int64)


def run(params: Params) -> dict:
    """The `preprocess` stage: data/raw -> data/processed/{train,test}.npz + reports/data.json."""
    from digits.core.files import DATA_SUMMARY, RAW_DIR, TEST_DATA, TRAIN_DATA

    summary = preprocess(
        RAW_DIR, TRAIN_DATA, TEST_DATA, DATA_SUMMARY, params.data.val_size, params.data.seed
    )
    print("preprocess: " + ", ".join(f"{k} {v['count']}" for k, v in summary.items()))
    return summary
