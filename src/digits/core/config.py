"""params.yaml, validated: every stage calls `load_params()` first, so a typo or a bad value
stops the pipeline before any work, with one line naming the key and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from digits.core.errors import DigitsError


class ConfigError(DigitsError):
    """A bad params file; str() is the one-line message shown to the user."""


class _Strict(BaseModel):
    # forbid: an unknown key is an error, not silently ignored; strict: "0.1" is not a float.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(_Strict):
    val_size: int = Field(5000, ge=10, le=30000)
    seed: int = Field(42, ge=0)


class AugmentParams(_Strict):
    enabled: bool = False
    degrees: float = Field(10.0, ge=0, le=180)
    translate: float = Field(0.1, ge=0, le=0.5)
    scale: tuple[float, float] = (0.9, 1.1)
    elastic_alpha: float = Field(0.0, ge=0)
    elastic_sigma: float = Field(5.0, gt=0)
    group_size: int = Field(8, ge=1)
    # method "groups": the transforms.v2 above, one random draw per group of `group_size`.
    # method "warp": every image its own affine + elastic warp, all in one grid_sample per
    # batch (elastic field drawn at warp_grid x warp_grid and upsampled), then the photometric
    # changes below; the elastic_* keys and group_size are not used. See train.BatchWarp.
    method: Literal["groups", "warp"] = "groups"
    shear: float = Field(0.0, ge=0, le=45)  # degrees, both methods; 0 = none
    warp_elastic: float = Field(0.0, ge=0, le=5)  # std of the field's displacement, in pixels
    warp_grid: int = Field(4, ge=2, le=28)  # control points per side of the elastic field
    warp_share: float = Field(1.0, gt=0, le=1)  # share of each batch warped (the costly part)
    photometric_prob: float = Field(0.5, ge=0, le=1)  # chance of each change below, per image
    noise_std: float = Field(0.0, ge=0, le=1)  # Gaussian noise, std ~ U(0, noise_std)
    contrast: float = Field(0.0, ge=0, lt=1)  # ink scaled by U(1 - contrast, 1)
    brightness: float = Field(0.0, ge=0, le=1)  # background lifted by U(0, brightness)
    strokes: bool = False  # dilate, erode or blur (one of the three, chosen per image)
    erase: int = Field(0, ge=0, le=20)  # a black square up to this many pixels a side

    @field_validator("scale")
    @classmethod
    def _scale_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("expected [low, high] with 0 < low <= high")
        return v


class OutlierParams(_Strict):
    """Outlier exposure (digits.data.outliers): generated non-digits in every batch, taught to give
    every digit the same probability, so that the network says "not a digit" for them."""

    enabled: bool = False
    share: float = Field(0.25, gt=0, le=1)  # outliers per batch, as a share of the batch size
    weight: float = Field(0.5, gt=0, le=10)  # weight of their loss (cross-entropy to uniform)
    per_kind: int = Field(400, ge=1, le=20000)  # the pool: images of each kind, warped anew


class TrainFeedbackParams(_Strict):
    """Approved corrections (feedback/examples.npz, less its hold-out) in training."""

    # copies of each approved example added to the training set; 0 = off (the model's bytes
    # are then those of a run without feedback)
    weight: int = Field(0, ge=0, le=1000)


class TrainParams(_Strict):
    hidden_sizes: tuple[int, ...] = Field((256, 128, 64, 32), min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(25, ge=1, le=10000)
    batch_size: int = Field(512, ge=1)
    lr: float = Field(0.005, gt=0, le=10)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["none", "onecycle", "cosine"] = "onecycle"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    augment: AugmentParams = AugmentParams()
    outliers: OutlierParams = OutlierParams()
    feedback: TrainFeedbackParams = TrainFeedbackParams()
    # the refusal threshold: the calibrated probability below which this share of the
    # validation digits falls; a test image whose best digit scores below it is "not a digit"
    refuse_val_share: float = Field(0.01, ge=0, lt=0.5)

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(s < 1 for s in v):
            raise ValueError("expected a non-empty list of positive layer sizes")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("expected two numbers in [0, 1)")
        return v


class EvaluateParams(_Strict):
    batch_size: int = Field(10000, ge=1)
    misclassified_shown: int = Field(36, ge=0, le=400)
    outliers_per_kind: int = Field(500, ge=10, le=20000)  # the suite's size (digits.data.outliers)


class MlflowParams(_Strict):
    experiment: str = Field("mnist", min_length=1)
    registered_model: str = Field("mnist-mlp", min_length=1)


class GateParams(_Strict):
    min_accuracy: float = Field(0.98, ge=0, le=1)
    max_loss: float = Field(0.2, gt=0)
    min_class_recall: float = Field(0.95, ge=0, le=1)
    max_accuracy_drop: float = Field(0.002, ge=0, le=1)
    # worst accuracy over digits.scoring.robustness' corrupted test sets; 0 = off (costs nothing)
    min_corruption_accuracy: float = Field(0.0, ge=0, le=1)
    max_ece: float = Field(1.0, gt=0, le=1)  # expected calibration error on test; 1 = off
    # the outlier suite (digits.data.outliers): outliers accepted at 95% of test digits (FPR95),
    # and the share of test digits the model's threshold refuses; 1 = off
    max_ood_fpr95: float = Field(1.0, gt=0, le=1)
    max_refused_digits: float = Field(1.0, gt=0, le=1)
    # outside MNIST (digits.data.wild's report halves, reports/wild.json): the worst digit set's
    # share read right (0 = off) and refused (1 = off), the non-digits' share refused (0 = off)
    min_wild_read: float = Field(0.0, ge=0, le=1)
    max_wild_refused: float = Field(1.0, gt=0, le=1)
    min_wild_refused_non_digits: float = Field(0.0, ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=1)  # McNemar's one-sided test vs the champion
    # Only a clean pipeline run of this branch moves @champion, and the gate judges by the gates
    # committed on it. Read from HEAD's committed params.yaml, so `-S` cannot redirect it.
    promotion_branch: str = Field("main", pattern=r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")


class MonitorParams(_Strict):
    """`digits monitor` (digits.monitor.drift): when a window of the prediction log alerts."""

    window: str = Field("24h", pattern=r"^\d+(\.\d+)?[smhdw]$")  # default --since
    min_pieces: int = Field(200, ge=1)  # a smaller window is reported, never alerts on drift
    alpha: float = Field(0.01, gt=0, lt=1)  # family-wise false-alarm level (Bonferroni)
    min_psi: float = Field(0.1, ge=0)  # effect floor of a shift (population stability index)
    max_refusal_change: float = Field(0.02, ge=0, le=1)  # refusal rate's absolute change floor
    min_corrections: int = Field(20, ge=1)  # corrected answers needed to judge their accuracy
    min_corrected_accuracy: float = Field(0.0, ge=0, le=1)  # on corrected answers; 0 = off


class FeedbackParams(_Strict):
    """Corrections as training data (`digits feedback`): when a correction is approved without
    a person, and the share of the exported set held out for evaluate and the gate."""

    min_sources: int = Field(2, ge=1)  # distinct client addresses agreeing on a label
    holdout_share: float = Field(0.3, ge=0, lt=1)  # by content hash: never trained on


class Params(_Strict):
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    gates: GateParams = GateParams()
    monitor: MonitorParams = MonitorParams()
    feedback: FeedbackParams = FeedbackParams()


def _describe(err) -> str:  # pydantic's ErrorDetails
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg[0].lower()}{msg[1:]}, got {err['input']!r}"


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise ConfigError naming the first bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    # YAML gives lists; the model declares tuples (immutable, hashable), so convert first.
    try:
        return Params.model_validate(_lists_to_tuples(raw))
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {_describe(errors[0])}{more}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    return parse_params(read_yaml(path), str(path))


def read_yaml(path: Path, error: type[DigitsError] = ConfigError, holds: str = "") -> object:
    """The YAML document in `path`; `error` (one line naming the file) when it is missing or
    not YAML. `holds` says what the file is for, in the missing file's message."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: file not found" + (f"; it holds {holds}" if holds else "")) from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'lr': 0.002}} -> {'train.lr': 0.002}: the form MLflow logs and DVC shows
    (tuples as lists)."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def flat_params(params: Params) -> dict[str, object]:
    return flatten(params.model_dump())


def _lists_to_tuples(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _lists_to_tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_lists_to_tuples(v) for v in obj)
    return obj
