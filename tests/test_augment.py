"""The accurate profile's batch augmentation (augment.method "warp"): the fast sampling grid is
the one affine_grid + bicubic interpolate would give, a warp with no randomness is the identity,
each photometric change reaches exactly its share of the batch, training with it is
reproducible to the byte, and the default augmentation is unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from digits.core.config import parse_params
from digits.data.preprocess import load_split, preprocess
from digits.model.augment import BatchWarp, augment_batch, grid_basis, make_augment
from digits.model.network import save_model
from digits.stages.train import train
from helpers import make_fake_mnist

CPU = torch.device("cpu")
STILL = {"degrees": 0.0, "translate": 0.0, "scale": [1.0, 1.0]}  # a warp that moves nothing


def augment(**kw):
    return parse_params({"train": {"augment": {"enabled": True, "method": "warp", **kw}}}).train


def digits_like(n: int = 60) -> torch.Tensor:
    """Rings of different sizes, centred: smooth shapes with ink away from the border."""
    r = torch.arange(28, dtype=torch.float32) - 13.5
    dist = (r[:, None] ** 2 + r[None, :] ** 2).sqrt()
    radius = torch.linspace(4, 8, n)[:, None, None]
    return (1 - (dist - radius).abs() / 1.5).clamp(0, 1).reshape(n, 784)


def test_grid_basis_is_affine_grid_plus_bicubic_upsampling():
    theta = torch.randn(5, 2, 3)
    basis = grid_basis(4, CPU)
    fast = (theta @ basis[:3]).transpose(1, 2)  # (5, 784, 2)
    ref = nn.functional.affine_grid(theta, (5, 1, 28, 28), align_corners=False).view(5, 784, 2)
    assert torch.allclose(fast, ref, atol=1e-5)
    field = torch.randn(3, 16)
    ref = nn.functional.interpolate(
        field.view(3, 1, 4, 4), (28, 28), mode="bicubic", align_corners=True
    )
    assert torch.allclose(field @ basis[3:], ref.view(3, 784), atol=1e-5)


def test_still_warp_is_the_identity_and_the_default_augmentation_is_unchanged():
    x = digits_like()
    out = augment_batch(x, make_augment(augment(**STILL).augment), 8)
    assert torch.allclose(out, x, atol=1e-5)
    # the transforms.v2 path: no shear unless asked for (so its random draws, and its models'
    # bytes, are what they were before `shear` existed)
    default = parse_params({"train": {"augment": {"enabled": True}}}).train.augment
    assert default.method == "groups"
    affine = make_augment(default).transforms[0]
    assert affine.shear is None


def test_warp_is_random_per_image_and_reproducible():
    p = augment(degrees=15.0, shear=10.0, warp_elastic=1.0).augment
    x = digits_like(2)[:1].repeat(50, 1)  # 50 copies of one image
    torch.manual_seed(0)
    a = BatchWarp(p)(x)
    torch.manual_seed(0)
    b = BatchWarp(p)(x)
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) == 50  # every copy warped its own way
    ratio = a.sum(1) / x.sum(1)  # moved, zoomed and bent, not lost
    assert ((ratio > 0.5) & (ratio < 1.5)).all()


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_each_change_reaches_its_share_of_the_batch(prob):
    x = digits_like(60)
    torch.manual_seed(1)
    out = BatchWarp(augment(**STILL, brightness=0.5, photometric_prob=prob).augment)(x)
    changed = ~torch.isclose(out, x, atol=1e-5).all(1)
    assert changed.sum() == round(prob * 60)
    if 0 < prob < 1:  # one slice of the (already shuffled) batch
        idx = changed.nonzero().squeeze(1)
        assert torch.equal(idx, torch.arange(idx[0], idx[0] + len(idx)))
    assert (out[changed] >= x[changed]).all()  # brightness only lifts


def test_strokes_thicken_thin_and_blur_a_third_each():
    x = digits_like(60)
    torch.manual_seed(2)
    out = BatchWarp(augment(**STILL, strokes=True, photometric_prob=1.0).augment)(x)
    thick, thin, blurred = out.split(20)
    ink = x.sum(1)
    assert (thick.sum(1) >= ink[:20] - 1e-3).all() and (thick.sum(1) > ink[:20]).any()
    assert (thin.sum(1) <= ink[20:40] + 1e-3).all() and (thin.sum(1) < ink[20:40]).any()
    assert (blurred.max(1).values <= x[40:].max(1).values + 1e-5).all()


def test_noise_erase_and_contrast_change_what_they_should():
    x = digits_like(60)
    torch.manual_seed(3)
    out = BatchWarp(augment(**STILL, noise_std=0.5, photometric_prob=1.0).augment)(x)
    assert (out - x).std() > 0.05 and out.min() >= 0 and out.max() <= 1
    out = BatchWarp(augment(**STILL, erase=8, photometric_prob=1.0).augment)(x)
    assert (out <= x + 1e-5).all() and ((out == 0) & (x > 0.1)).any(1).float().mean() > 0.5
    out = BatchWarp(augment(**STILL, contrast=0.5, photometric_prob=1.0).augment)(x)
    ratio = out.max(1).values / x.max(1).values
    assert (ratio <= 1 + 1e-6).all() and (ratio >= 0.5 - 1e-6).all() and ratio.std() > 0.05


def test_training_with_the_warp_is_reproducible(tmp_path):
    raw = make_fake_mnist(tmp_path / "raw", n_train=400, n_test=20)
    out = tmp_path / "processed"
    preprocess(raw, out / "train.npz", out / "test.npz", tmp_path / "d.json", val_size=100, seed=0)
    data = load_split(out / "train.npz", "train", "val")
    kw = {
        "enabled": True,
        "method": "warp",
        "shear": 5.0,
        "warp_elastic": 1.0,
        "noise_std": 0.3,
        "strokes": True,
        "erase": 6,
        "contrast": 0.5,
        "brightness": 0.3,
    }
    base = {"epochs": 2, "batch_size": 32, "device": "cpu", "hidden_sizes": [32], "augment": kw}
    p = parse_params({"train": base}).train
    files = []
    for name in ("a", "b"):
        result = train(p, data, progress=False)
        files.append(tmp_path / f"{name}.safetensors")
        save_model(result.model, files[-1], p.hidden_sizes, p.dropout)
    assert files[0].read_bytes() == files[1].read_bytes()
    plain = train(parse_params({"train": {**base, "augment": {}}}).train, data, progress=False)
    save_model(plain.model, tmp_path / "plain.safetensors", p.hidden_sizes, p.dropout)
    assert (tmp_path / "plain.safetensors").read_bytes() != files[0].read_bytes()
