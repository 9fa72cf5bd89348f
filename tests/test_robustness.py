"""The corruption suite: the same seed gives the same bytes, each corruption changes images the
way its severity table says (checked on shapes whose answer is known, and on real MNIST
digits), and a model's accuracies are reported per corruption with their mean and worst."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digits.data.preprocess import read_idx
from digits.scoring.figures import plot_robustness
from digits.scoring.robustness import CORRUPTIONS, RobustnessError, corrupt, corruption_accuracies
from helpers import mnist_dir

SEEDED = {"gaussian_noise", "impulse_noise", "rotate", "shear", "scale", "translate", "occlusion"}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The first 500 official test digits, as the evaluate stage sees them."""
    d = mnist_dir()
    x = read_idx(d / "t10k-images-idx3-ubyte.gz", "images")[:500]
    y = read_idx(d / "t10k-labels-idx1-ubyte.gz", "labels")[:500]
    return x.astype(np.float32) / 255, y.astype(np.int64)


def images(n: int = 200, value: float = 0.0) -> np.ndarray:
    return np.full((n, 784), value, np.float32)


def square(n: int = 200, top: int = 10, left: int = 10, side: int = 8) -> np.ndarray:
    """White squares on black, away from the border."""
    x = np.zeros((n, 28, 28), np.float32)
    x[:, top : top + side, left : left + side] = 1.0
    return x.reshape(n, 784)


def centre_of_mass(x: np.ndarray) -> np.ndarray:
    """(N, 2): (row, column) of each image's ink."""
    im = x.reshape(-1, 28, 28)
    r = np.arange(28, dtype=np.float64)
    ink = im.sum((1, 2))
    return np.stack([(im.sum(2) * r).sum(1) / ink, (im.sum(1) * r).sum(1) / ink], 1)


def test_every_corruption_is_deterministic_and_keeps_the_contract(digits):
    x, _ = digits
    assert len(CORRUPTIONS) >= 12
    for name in CORRUPTIONS:
        a, b = corrupt(name, x, seed=0), corrupt(name, x, seed=0)
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == x.shape
        assert a.tobytes() == b.tobytes(), name
        assert a.min() >= 0 and a.max() <= 1, name
        assert not np.array_equal(a, x), f"{name} left the images unchanged"
        if name in SEEDED:  # the seed matters where something is drawn at random
            assert not np.array_equal(a, corrupt(name, x, seed=1)), name
        # torch in, torch out, same values
        t = corrupt(name, torch.from_numpy(x), seed=0)
        assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), a), name
    assert np.array_equal(x, digits[0]), "the input was modified in place"


def test_gaussian_noise_has_the_stated_sigma():
    grey = corrupt("gaussian_noise", images(value=0.5), seed=0)
    noise = grey - 0.5
    assert abs(noise.mean()) < 0.005
    assert 0.265 < noise.std() < 0.285  # sigma 0.3 clipped at +-0.5 (1.67 sigma): 0.274
    black = corrupt("gaussian_noise", images(), seed=0)
    assert 0.48 < (black == 0).mean() < 0.52  # the negative half is clipped away


def test_impulse_noise_sets_ten_percent_of_pixels_to_black_or_white():
    out = corrupt("impulse_noise", images(value=0.5), seed=0)
    assert 0.045 < (out == 1).mean() < 0.055
    assert 0.045 < (out == 0).mean() < 0.055
    assert ((out == 0) | (out == 1) | (out == 0.5)).all()


def test_blur_spreads_ink_without_adding_any(digits):
    x, _ = digits
    out = corrupt("blur", x)
    assert out.max(1).mean() < x.max(1).mean() - 0.1  # peaks come down
    assert ((out > 0.05).sum(1) > (x > 0.05).sum(1)).all()  # edges spread
    assert np.allclose(out.sum(1), x.sum(1), rtol=0.02)  # ink is kept (digits avoid borders)


def test_strokes_thicker_and_thinner(digits):
    x, _ = digits
    thick, thin = corrupt("thick", x), corrupt("thin", x)
    assert (thick >= x).all() and (thin <= x).all()
    assert thick.sum() > 1.6 * x.sum()
    assert thin.sum() < 0.6 * x.sum()
    assert (thin.sum(1) > 0.1 * x.sum(1)).all() and (thin.max(1) > 0.3).all()  # not erased
    # on a square: 3x3 dilation grows it a pixel each side, 2x2 erosion shrinks it by one
    assert (corrupt("thick", square(side=8)).sum(1) == 100).all()
    assert (corrupt("thin", square(side=8)).sum(1) == 49).all()


def test_rotation_moves_ink_about_the_centre_both_ways():
    bar = np.zeros((400, 28, 28), np.float32)
    bar[:, 4:24, 13:15] = 1.0  # a vertical bar through the centre
    out = corrupt("rotate", bar.reshape(400, 784), seed=0).reshape(400, 28, 28)
    com = centre_of_mass(out.reshape(400, 784))
    assert np.allclose(com, 13.5, atol=0.2)  # about the centre
    # the top of the bar leans left or right by sin(20 deg) * 9 px ~ 3 px
    top = out[:, 5:9].sum(1)
    lean = (top * np.arange(28)).sum(1) / top.sum(1) - 13.5
    assert (np.abs(np.abs(lean) - 3.1) < 0.6).all()
    assert 150 < (lean > 0).sum() < 250  # either direction, about half each
    assert np.allclose(out.sum((1, 2)), bar.sum((1, 2)), rtol=0.03)


def test_shear_slants_a_square_and_keeps_its_ink():
    x = square(side=10, top=9, left=9)
    out = corrupt("shear", x, seed=0)
    assert np.allclose(out.sum(1), x.sum(1), rtol=0.03)
    changed = np.abs(out - x).sum(1)
    assert (changed > 10).all()  # tan(20 deg) * 5 px ~ 1.8 px of slant at the edges
    assert np.allclose(centre_of_mass(out), centre_of_mass(x), atol=0.3)


def test_scale_zooms_by_the_stated_factors():
    x = square(side=10, top=9, left=9)
    ratio = corrupt("scale", x, seed=0).sum(1) / x.sum(1)
    small, large = np.abs(ratio - 0.64) < 0.05, np.abs(ratio - 1.44) < 0.05
    assert (small | large).all() and small.any() and large.any()


def test_translation_moves_the_centre_of_mass_by_three_pixels():
    x = square(side=8, top=10, left=10)
    shift = centre_of_mass(corrupt("translate", x, seed=0)) - centre_of_mass(x)
    assert np.allclose(np.abs(shift).sum(1), 3.0, atol=1e-4)  # along one axis, 3 px
    assert set(map(tuple, np.round(shift).astype(int))) == {(3, 0), (-3, 0), (0, 3), (0, -3)}


def test_contrast_brightness_and_occlusion(digits):
    x, _ = digits
    low = corrupt("contrast", x)
    assert np.allclose(low.std(1), 0.3 * x.std(1), rtol=1e-3)
    assert np.allclose(low.mean(1), x.mean(1), atol=1e-4)
    bright = corrupt("brightness", x)
    assert np.allclose(bright, np.minimum(x + 0.3, 1.0))
    white = images(value=1.0)
    hidden = corrupt("occlusion", white, seed=0).reshape(-1, 28, 28) == 0
    assert (hidden.sum((1, 2)) == 36).all()  # one 6x6 square each
    assert not hidden[:, :4].any() and not hidden[:, 24:].any()  # inside the central box
    assert not hidden[:, :, :4].any() and not hidden[:, :, 24:].any()
    rows = hidden.any(2).argmax(1)
    assert len(set(rows.tolist())) > 5  # at different places


def test_accuracies_of_trivial_models(digits, tmp_path):
    x, y = digits
    seen = []

    def always_three(batch):
        seen.append(type(batch))
        probs = np.zeros((len(batch), 10), np.float32)
        probs[:, 3] = 1
        return probs

    result = corruption_accuracies(always_three, x, y)
    share = round(float((y == 3).mean()), 6)
    assert set(result.corruptions) == set(CORRUPTIONS)
    assert all(a == share for a in result.corruptions.values())
    assert result.mean == result.worst == share
    assert seen == [np.ndarray] * len(CORRUPTIONS)  # numpy in, numpy to the model

    # a model that counts ink: thick strokes push everything to "bright", and so on: the
    # accuracies differ, the mean and worst follow from them, and torch output is accepted
    def by_ink(batch):
        ink = torch.as_tensor(batch).mean(1, keepdim=True)
        return torch.softmax(-((ink * 60 - torch.arange(10)) ** 2), 1)

    result = corruption_accuracies(by_ink, torch.from_numpy(x), torch.from_numpy(y))
    accs = list(result.corruptions.values())
    assert len(set(accs)) > 3
    assert result.worst == min(accs)
    assert result.mean == round(float(np.mean(accs)), 6)
    png = plot_robustness(result, 0.5, tmp_path / "robustness.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_requests_name_the_culprit():
    with pytest.raises(RobustnessError, match="'fog': unknown"):
        corrupt("fog", images())
    with pytest.raises(RobustnessError, match=r"shape \(3, 28, 28\), expected \(N, 784\)"):
        corrupt("blur", np.zeros((3, 28, 28), np.float32))


@pytest.mark.slow
def test_the_gate_scores_a_registered_versions_corruptions(tmp_path):
    """What the gate's min_corruption_accuracy reads when a version's score record lacks the
    corruption accuracies: the version's files, downloaded from a real registry, scored on the
    processed test set, as users load it; the gate checks the worst only above 0."""
    import os

    import mlflow

    from digits.core.config import GateParams
    from digits.data.preprocess import save_arrays
    from digits.gate.policy import checks
    from digits.scoring.registered import VersionScorer
    from digits.scoring.scorer import Suites
    from helpers import register_champion, served_probabilities

    d = mnist_dir()
    x = read_idx(d / "t10k-images-idx3-ubyte.gz", "images")[:1000]
    y = read_idx(d / "t10k-labels-idx1-ubyte.gz", "labels")[:1000]
    save_arrays(tmp_path / "test.npz", test_x=x, test_y=y)
    reg = register_champion(tmp_path / "store", epochs=2)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(reg["tracking_uri"])
    try:
        client = mlflow.MlflowClient()
        scorer = VersionScorer(
            client, "mnist-mlp", tmp_path / "test.npz", "sha", Suites(robustness=True)
        )
        score = scorer.score(reg["version"])
    finally:
        mlflow.set_tracking_uri(previous)
    result = score.evaluation.robustness
    assert result is not None
    off = checks(GateParams(), score, comparison=None, high=None)
    strict = checks(GateParams(min_corruption_accuracy=0.99), score, comparison=None, high=None)
    loose = checks(GateParams(min_corruption_accuracy=0.05), score, comparison=None, high=None)
    assert "min_corruption_accuracy" not in [c.gate for c in off]
    assert strict[-1].gate == loose[-1].gate == "min_corruption_accuracy"
    assert strict[-1].value == loose[-1].value == result.worst
    assert not strict[-1].passed and loose[-1].passed
    assert result.worst_corruption()[0] in strict[-1].metric
    direct = corruption_accuracies(
        lambda im: served_probabilities(reg["pyfunc"].predict(im)), x.astype(np.float32) / 255, y
    )
    assert result == direct  # what users load scores the same
    name, acc = result.worst_corruption()
    assert acc == result.worst == min(result.corruptions.values())
    assert result.corruptions[name] == acc
    assert 0.3 < result.mean < 0.98  # a 2-epoch model: well above chance, hurt by some
