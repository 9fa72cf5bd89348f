"""Reading whole numbers: strips of MNIST test digits as photos (strips) are cut into
their digits, left to right, the pieces of one digit kept together and specks dropped; a single
digit is read exactly as before; a letter in a number is shown as not a digit."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digits.data.imaging import preprocess, read_image
from digits.data.preprocess import read_idx
from digits.data.segment import read_pieces, segment
from helpers import glyph_image, mnist_dir, photo_like, run
from strips import strip

DIGITS_CMD = [str(Path(sys.executable).parent / "digits"), "predict"]


@pytest.fixture(scope="module")
def mnist_test():
    d = mnist_dir()
    x = read_idx(d / "t10k-images-idx3-ubyte.gz", "images")
    y = read_idx(d / "t10k-labels-idx1-ubyte.gz", "labels")
    return x, y


def ink_of(*boxes: tuple[int, int, int, int], shape=(60, 200)) -> np.ndarray:
    ink = np.zeros(shape, np.float32)
    for top, left, bottom, right in boxes:
        ink[top:bottom, left:right] = 1.0
    return ink


def test_pieces_of_one_digit_are_merged_and_specks_dropped():
    # a 5: its top bar apart from its body, over it; a 1 beside them; a speck far off
    ink = ink_of((10, 20, 14, 40), (18, 20, 40, 38), (10, 60, 40, 66), (50, 150, 52, 152))
    pieces = segment(ink)
    assert [p.box for p in pieces] == [(10, 20, 40, 40), (10, 60, 40, 66)]
    assert all(p.image.shape == (784,) and p.image.max() > 0.5 for p in pieces)
    assert segment(np.zeros((30, 30), np.float32)) == []


def test_a_neighbour_reaching_into_the_box_is_not_part_of_a_digit():
    # an L whose foot reaches under the next digit's box: the next digit is cut without it
    ink = ink_of((10, 10, 40, 14), (36, 10, 40, 60), (10, 40, 30, 44))
    # the foot overlaps the stroke at 40-44 by its whole width: one digit by the rule
    assert len(segment(ink)) == 1
    ink = ink_of((10, 10, 40, 14), (36, 10, 40, 30), (10, 50, 32, 54))
    first, second = segment(ink)
    assert first.box[3] <= second.box[1]


def test_a_single_digit_is_read_exactly_as_before(mnist_test):
    x, _ = mnist_test
    rng = np.random.default_rng(0)
    for i in range(20):
        img = read_image(photo_like(x[i], rng), "d")
        (piece,) = read_pieces(img, "d")
        assert np.array_equal(piece.image, preprocess(img, "d"))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_strips_are_cut_into_their_digits(mnist_test, k):
    x, _ = mnist_test
    rng = np.random.default_rng(k)
    right = 0
    for n in range(25):
        picked = rng.integers(len(x), size=k)
        img = read_image(strip(x[picked], rng, "JPEG" if n % 2 else "PNG"), "strip")
        pieces = read_pieces(img, "strip")
        right += len(pieces) == k
        lefts = [p.box[1] for p in pieces]
        assert lefts == sorted(lefts)
        # boxes in the picture's own pixels
        assert all(0 <= p.box[0] < p.box[2] <= img.height for p in pieces)
    assert right >= 24  # the count of digits found, in all but a rare strip


@pytest.mark.slow  # the champion fixture trains a model (once per session)
def test_predict_reads_a_number_and_shows_a_letter_in_it(champion, mnist_test, tmp_path):
    x, y = mnist_test
    rng = np.random.default_rng(7)
    picked = np.flatnonzero(y == 2)[:1].tolist() + np.flatnonzero(y == 0)[:1].tolist()
    picked += np.flatnonzero(y == 6)[:1].tolist()
    (tmp_path / "206.png").write_bytes(strip(x[picked], rng))
    # a number with a letter in it: the letter drawn between two digits
    page = Image.open(io.BytesIO(strip(x[picked[:2]], rng, scale=3))).convert("L")
    wide = Image.new("L", (page.width + 120, page.height), 244)
    wide.paste(page, (0, 0))
    letter = Image.open(io.BytesIO(glyph_image("K", side=90))).convert("L")
    wide.paste(letter, (page.width - 40, (page.height - 90) // 2))
    wide.save(tmp_path / "20K.png")
    proc = run([*DIGITS_CMD, "--json", "206.png", "20K.png"], tmp_path, env=champion["env"])
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert first["number"] == "206" and first["reading"] == "206"
    assert [d["digit"] for d in first["digits"]] == [2, 0, 6]
    assert all(len(d["box"]) == 4 and len(d["probabilities"]) == 10 for d in first["digits"])
    assert second["number"] is None and second["reading"].endswith("?")
    assert second["digits"][-1]["digit"] is None
    text = run([*DIGITS_CMD, "206.png", "20K.png"], tmp_path, env=champion["env"]).stdout
    lines = text.splitlines()
    assert lines[0].startswith("206.png: 206 (2 ") and lines[0].count("%") == 3
    assert "not a digit (best guess" in lines[1]
