"""Temperature scaling and the calibration error: the fit lowers the validation NLL and keeps
every prediction, the ECE is what a hand computation gives, and a calibrated model file carries
its temperature and threshold to every reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digits.model import calibration
from digits.model.inference import Classifier, calibrated, read_model_file, softmax
from digits.model.network import build_mlp, save_model


def overconfident(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a 90%-accurate classifier that claims far more: the right class (or, for one
    image in ten, a wrong one) gets a large margin."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    picked = np.where(rng.random(n) < 0.9, y, (y + rng.integers(1, 10, n)) % 10)
    logits = rng.normal(0, 1, (n, 10)).astype(np.float32)
    logits[np.arange(n), picked] += 8.0
    return logits, y


def test_temperature_lowers_the_nll_and_keeps_every_prediction():
    logits, y = overconfident()
    t = calibration.fit_temperature(logits, y)
    assert t > 1.5  # over-confident: the fit softens
    assert calibration.nll(logits, y, t) < calibration.nll(logits, y) - 0.1
    # a minimum: either side is worse
    for other in (t * 0.9, t * 1.1):
        assert calibration.nll(logits, y, other) > calibration.nll(logits, y, t)
    assert np.array_equal(calibrated(logits, t).argmax(1), logits.argmax(1))
    # and an under-confident model is sharpened
    assert calibration.fit_temperature(logits / 8, y) < 0.5


def test_ece_is_the_hand_computed_gap():
    # 4 images, 2 bins: confidences 0.3, 0.4 (bin 1: one right) and 0.8, 0.9 (bin 2: both right)
    probs = np.zeros((4, 10))
    for i, (c, k) in enumerate([(0.3, 0), (0.4, 1), (0.8, 2), (0.9, 3)]):
        probs[i] = (1 - c) / 9
        probs[i, k] = c
    y = np.array([0, 5, 2, 3])
    # bin (0, 0.5]: accuracy 0.5, confidence 0.35; bin (0.5, 1]: accuracy 1, confidence 0.85
    want = 0.5 * abs(0.5 - 0.35) + 0.5 * abs(1.0 - 0.85)
    assert calibration.ece(probs, y, bins=2) == pytest.approx(want)
    rows = calibration.reliability(probs, y, bins=2)
    assert [r["count"] for r in rows] == [2, 2]
    assert rows[1]["accuracy"] == 1.0 and rows[1]["confidence"] == pytest.approx(0.85)
    # calibration lowers it on the over-confident model
    logits, y = overconfident()
    t = calibration.fit_temperature(logits, y)
    before, after = calibration.ece(softmax(logits), y), calibration.ece(calibrated(logits, t), y)
    assert after < 0.6 * before


def test_a_model_file_carries_its_calibration(tmp_path):
    torch.manual_seed(0)
    model = build_mlp((16,))
    plain, cal = tmp_path / "plain.safetensors", tmp_path / "cal.safetensors"
    save_model(model, plain, (16,), 0.0)
    save_model(model, cal, (16,), 0.0, {"temperature": 2.5, "threshold": 0.6})
    x = np.random.default_rng(0).random((50, 784), dtype=np.float32)
    a, b = Classifier.from_file(plain), Classifier.from_file(cal)
    assert (a.temperature, a.threshold) == (1.0, 0.0)  # an uncalibrated file refuses nothing
    assert (b.temperature, b.threshold) == (2.5, 0.6)
    assert np.array_equal(a.logits(x), b.logits(x))
    np.testing.assert_allclose(b.probabilities(x), softmax(a.logits(x) / 2.5), atol=1e-6)
    said = b.answers(x)
    refused = said.confidence < 0.6
    assert refused.any()  # an untrained net on noise: low confidence
    assert np.array_equal(said.digit[refused], np.full(refused.sum(), -1))
    assert np.array_equal(said.digit[~refused], said.guess[~refused])
    assert (a.answers(x).digit >= 0).all()
    # the calibration is the header's extra entry, in no reader's way: the tensors are the same
    plain_t, cal_t = read_model_file(plain).tensors, read_model_file(cal).tensors
    assert plain_t.keys() == cal_t.keys()
    assert all(np.array_equal(plain_t[k], cal_t[k]) for k in plain_t)
