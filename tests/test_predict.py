"""`digits predict` and the preprocessing it shares with the page: MNIST test digits made to look
like a user's pictures (dark ink on paper, off-centre, another scale, RGB, JPEG and PNG) must be
read as well as the clean digits, through the real CLI and a real registered model."""

from __future__ import annotations

import io
import json
import re
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digits.data.imaging import MAX_BYTES, ImageError, preprocess, read_image
from digits.data.preprocess import read_pair
from helpers import glyph_image, imported, mnist_dir, photo_like, run

DIGITS = str(Path(sys.executable).parent / "digits")  # the installed command


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    return read_pair(mnist_dir(), "t10k")


def predict_cli(args: list[str], cwd: Path, env: dict) -> tuple[int, list[str], list[str]]:
    proc = run([DIGITS, "predict", *args], cwd, env={**env, "OMP_NUM_THREADS": "1"}, check=False)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr.splitlines()


def centre_of_mass(x: np.ndarray) -> tuple[float, float]:
    img = x.reshape(28, 28)
    idx = np.arange(28)
    return (img.sum(1) @ idx) / img.sum(), (img.sum(0) @ idx) / img.sum()


# --- the preprocessing ------------------------------------------------------------------------


def test_an_mnist_digit_comes_out_as_it_went_in(mnist_test):
    """MNIST digits already are what preprocess makes: 20 px box, centre of mass at (14, 14)."""
    x, _ = mnist_test
    out = np.stack([preprocess(Image.fromarray(v.reshape(28, 28))) for v in x[:200]])
    assert out.shape == (200, 784) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert np.abs(out - x[:200] / 255).mean() < 0.01
    for v in out[:20]:
        cy, cx = centre_of_mass(v)
        assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5


def test_a_photo_like_digit_becomes_the_mnist_digit(mnist_test):
    x, _ = mnist_test
    rng = np.random.default_rng(1)
    for fmt in ("PNG", "JPEG"):
        diffs = []
        for v in x[:30]:
            out = preprocess(read_image(photo_like(v, rng, fmt), "photo"))
            diffs.append(np.abs(out - v / 255).mean())
            ink = out.reshape(28, 28) > 0.25
            rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
            assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)
        # measured: mean 0.024 (PNG) / 0.026 (JPEG), worst of 300 0.09 (a one-pixel shift);
        # an MNIST digit differs from a blank field by 0.13 on average
        assert np.mean(diffs) < 0.035 and max(diffs) < 0.12, fmt


def test_transparent_background_counts_as_paper():
    """A canvas exported without a white fill: black strokes on transparent pixels."""
    strokes = Image.new("L", (120, 160), 0)
    strokes.paste(255, (50, 20, 70, 140))  # a thick vertical bar: a "1"
    rgba = Image.new("RGBA", strokes.size, (0, 0, 0, 0))
    rgba.putalpha(strokes)  # black where drawn, transparent elsewhere
    on_white = Image.new("L", strokes.size, 255)
    on_white.paste(0, (50, 20, 70, 140))
    np.testing.assert_allclose(preprocess(rgba), preprocess(on_white), atol=1e-6)
    assert preprocess(rgba).max() == pytest.approx(1.0)


def test_a_phone_photo_stored_sideways_is_turned_upright(mnist_test, tmp_path):
    """Phones store the sensor's pixels plus an EXIF Orientation tag; 6 = turn 90° clockwise."""
    upright = Image.open(io.BytesIO(photo_like(mnist_test[0][0], np.random.default_rng(2))))
    upright.save(tmp_path / "upright.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.rotate(90, expand=True).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    want = preprocess(read_image(tmp_path / "upright.jpg"))
    got = preprocess(read_image(tmp_path / "sideways.jpg"))
    assert np.abs(got - want).mean() < 0.02
    ignored = preprocess(Image.open(tmp_path / "sideways.jpg"))  # the tag not applied
    assert np.abs(ignored - want).mean() > 0.05


def png_header(width: int, height: int) -> bytes:
    """The start of a PNG that says it is width x height: enough for Pillow to open it (the
    pixels would come after the empty IDAT chunk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "no such file"),
        ("empty.png", b"", "empty file"),
        ("notes.png", b"shopping list: eggs, milk", "not an image"),
        ("folder.png", "dir", "is a folder"),
        ("huge.png", "sparse", "MiB limit"),
        ("giant.png", png_header(8000, 7000), "megapixel limit"),
        ("truncated.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not an image"),
        ("blank.png", "blank", "no ink"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.endswith(".png") else "",
)
def test_bad_images_are_refused_with_their_name(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "sparse":
        with open(path, "wb") as f:
            f.truncate(MAX_BYTES + 1)  # a sparse file: no disk used
    elif content == "blank":
        Image.new("RGB", (300, 200), (250, 250, 245)).save(path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError) as err:
        preprocess(read_image(path), str(path))
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# --- the command, with a real registered model ------------------------------------------------


@pytest.mark.slow  # the champion fixture trains a model (once per session)
def test_predict_reports_each_file_and_goes_on_after_bad_ones(champion, mnist_test, tmp_path):
    x, y = mnist_test
    rng = np.random.default_rng(3)
    good = []
    for i in range(3):
        path = tmp_path / f"digit{i}.{'jpg' if i % 2 else 'png'}"
        path.write_bytes(photo_like(x[i], rng, "JPEG" if i % 2 else "PNG"))
        good.append(path.name)
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (64, 64), 255).save(tmp_path / "blank.png")
    files = [good[0], "missing.png", good[1], "notes.png", "blank.png", good[2]]

    code, out, err = predict_cli(files, tmp_path, champion["env"])
    assert code == 1  # two files could not be read
    assert [line.split(":")[0] for line in out] == [good[0], good[1], "blank.png", good[2]]
    assert out[2] == "blank.png: not a digit (no ink)"  # an answer, not an error
    for line, label in zip([out[0], out[1], out[3]], y[:3], strict=True):
        digit, prob = line.split(": ")[1].split(" ")
        assert int(digit) == label
        assert 10 <= float(prob.strip("(%)")) <= 100
    assert len(err) == 2, err
    for bad, line in zip(["missing.png", "notes.png"], err, strict=True):
        assert line.startswith(f"digits predict: error: {bad}: ")


@pytest.mark.slow
def test_a_first_call_asks_the_store_directly_without_mlflow(champion, mnist_test, tmp_path):
    """The champion resolved by reading the SQLite store (digits.tracking.resolve), its weights
    read in place: no MLflow import, not even the first time (an empty model cache)."""
    x, y = mnist_test
    (tmp_path / "digit.png").write_bytes(photo_like(x[0], np.random.default_rng(5)))
    env = {**champion["env"], "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PYTHONPROFILEIMPORTTIME": "1"}  # fmt: skip
    code, out, err = predict_cli(["digit.png"], tmp_path, env)
    assert code == 0 and out[0].startswith(f"digit.png: {y[0]} ("), (out, err[-20:])
    modules = imported("\n".join(err))
    assert "digits.model.inference" in modules and "numpy" in modules
    assert not {m for m in modules if m.split(".")[0] in ("mlflow", "torch")}


@pytest.mark.slow
def test_a_letter_is_not_a_digit_and_a_digit_is(champion, mnist_test, tmp_path):
    """The champion refuses what holds no digit, in words and in JSON, with its best guess."""
    x, y = mnist_test
    (tmp_path / "letter.png").write_bytes(glyph_image("K"))
    (tmp_path / "digit.png").write_bytes(photo_like(x[0], np.random.default_rng(5)))
    Image.new("L", (64, 64), 255).save(tmp_path / "blank.png")
    code, out, err = predict_cli(["letter.png", "digit.png"], tmp_path, champion["env"])
    assert code == 0 and err == []
    assert re.fullmatch(r"letter\.png: not a digit \(best guess \d, \d{1,2}%\)", out[0]), out
    assert out[1].startswith(f"digit.png: {y[0]} (")
    code, out, _ = predict_cli(["--json", "letter.png", "digit.png", "blank.png"], tmp_path,
                               champion["env"])  # fmt: skip
    letter, digit, blank = (json.loads(line) for line in out)
    assert letter["digit"] is None and 0 <= letter["guess"] <= 9
    assert letter["confidence"] < champion["classifier"].threshold
    assert letter["confidence"] == max(letter["probabilities"])
    assert digit["digit"] == digit["guess"] == y[0]
    assert digit["confidence"] >= champion["classifier"].threshold
    model = {"name": "mnist-mlp", "version": champion["version"], "uri": champion["model_uri"]}
    assert re.fullmatch(r"[0-9a-f]{32}", blank.pop("prediction_id"))
    assert blank == {
        **{"file": "blank.png", "digit": None, "guess": None, "confidence": 0.0},
        **{"probabilities": None, "number": None, "reading": "", "digits": []},
        "model": model,
    }


@pytest.mark.slow
def test_answers_name_their_model_and_go_to_the_log(champion, mnist_test, tmp_path):
    """--json names the registered model, version and URI; every answer is appended to the
    prediction log with its id, answer and the 28x28 bytes the model saw; --no-log logs none."""
    import sqlite3

    x, y = mnist_test
    rng = np.random.default_rng(8)
    (tmp_path / "digit.png").write_bytes(photo_like(x[0], rng))
    (tmp_path / "two.png").write_bytes(photo_like(x[1], rng))
    db = tmp_path / "log" / "answers.db"
    db.parent.mkdir()
    args = ["--json", "--log-db", str(db), "digit.png", "two.png"]
    code, out, err = predict_cli(args, tmp_path, champion["env"])
    assert code == 0 and err == [], err
    rows = [json.loads(line) for line in out]
    model = {"name": "mnist-mlp", "version": champion["version"], "uri": champion["model_uri"]}
    assert [r["model"] for r in rows] == [model, model]
    with sqlite3.connect(db) as conn:
        logged = conn.execute(
            "SELECT id, source, model_name, model_version, model_uri, digit, reading, pieces, "
            "inputs FROM predictions ORDER BY at"
        ).fetchall()
    assert [r[0] for r in logged] == [r["prediction_id"] for r in rows]
    for (_, source, name, version, uri, digit, reading, pieces, seen), r, picture in zip(
        logged, rows, ("digit.png", "two.png"), strict=True
    ):
        assert (source, name, version, uri) == ("predict", "mnist-mlp", model["version"],
                                                 model["uri"])  # fmt: skip
        assert (digit, reading, pieces) == (r["digit"], r["reading"], 1)
        expected = np.round(preprocess(read_image(str(tmp_path / picture))) * 255)
        np.testing.assert_array_equal(np.frombuffer(seen, np.uint8), expected.astype(np.uint8))

    code, out, err = predict_cli(["--json", "--no-log", "--log-db", str(db), "digit.png"],
                                 tmp_path, champion["env"])  # fmt: skip
    assert code == 0 and "prediction_id" not in json.loads(out[0])
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM predictions").fetchone() == (2,)

    # a log that cannot be written is a warning: the answers are given all the same
    code, out, err = predict_cli(["--log-db", str(tmp_path / "no" / "such" / "dir.db"),
                                  "digit.png"], tmp_path, champion["env"])  # fmt: skip
    assert code == 0 and out[0].startswith(f"digit.png: {y[0]} (")
    assert len(err) == 1 and err[0].startswith("digits predict: warning: prediction log sqlite:")
    assert err[0].endswith("the answers above were not logged")


@pytest.mark.slow
def test_photo_like_digits_are_read_as_well_as_clean_ones(champion, mnist_test, tmp_path):
    """1,000 MNIST test digits, each as a PNG and as a JPEG "photo": the accuracy of
    `digits predict` on each format is within 1 point of the same model's on the clean digits."""
    x, y = mnist_test
    n = 1000
    rng = np.random.default_rng(4)
    names = []
    for i in range(n):
        for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
            (tmp_path / f"{i:04d}.{ext}").write_bytes(photo_like(x[i], rng, fmt))
            names.append(f"{i:04d}.{ext}")
    code, out, err = predict_cli(["--json", *names], tmp_path, champion["env"])
    assert code == 0 and err == []
    rows = [json.loads(line) for line in out]
    assert [r["file"] for r in rows] == names  # one object per image, in order
    whole = [r for r in rows if len(r["digits"]) == 1]
    assert len(whole) >= 0.995 * len(rows)  # a photo of one digit is one digit (a rare stray
    rows = whole  # stroke of MNIST's own makes two: tests/test_segment.py)
    for r in rows:
        assert len(r["probabilities"]) == 10
        assert sum(r["probabilities"]) == pytest.approx(1, abs=1e-4)
        assert r["guess"] == int(np.argmax(r["probabilities"]))
        assert r["digit"] in (r["guess"], None)
    digits = {r["file"]: r["guess"] for r in rows}  # refused or not: its reading
    assert all(r["number"] in (str(r["guess"]), None) for r in rows)

    clean = champion["classifier"].probabilities(x[:n].astype(np.float32) / 255).argmax(1)
    clean_acc = (clean == y[:n]).mean()
    assert clean_acc > 0.95  # a real model, so the comparison means something
    for ext in ("png", "jpg"):
        got = np.array([digits.get(f"{i:04d}.{ext}", -1) for i in range(n)])
        acc = (got == y[:n]).mean()
        assert acc >= clean_acc - 0.01, f"{ext}: {acc:.3f} vs clean {clean_acc:.3f}"


@pytest.mark.slow
def test_no_store_is_one_line_and_creates_none(tmp_path):
    (tmp_path / "d.png").write_bytes(b"never read")
    code, out, err = predict_cli(["d.png"], tmp_path, {"MLFLOW_TRACKING_URI": ""})  # default
    assert code == 1 and out == []
    assert err == [
        f"digits predict: error: no MLflow store at {tmp_path / 'mlflow.db'}: "
        "train a model first (`dvc repro`), or set MLFLOW_TRACKING_URI to the store "
        "holding it"
    ]
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "predictions.db").exists()


@pytest.mark.slow
def test_an_unknown_model_is_one_line(champion, tmp_path):
    (tmp_path / "d.png").write_bytes(b"never read")
    code, out, err = predict_cli(
        ["--model", "models:/no-such-model@champion", "d.png"], tmp_path, champion["env"]
    )
    assert code == 1 and out == []
    assert len(err) == 1 and err[0].startswith("digits predict: error: model models:/no-such")
