"""The search space of `digits sweep`: `sweep.yaml`, one params.yaml key a line, each a range
(`{low, high}`, `log: true` for a log scale, `step` for a grid) or `{choices: [...]}`.

Checked by the same machinery as params.yaml (a strict pydantic schema, `Range` or `Choices`
per key) and against params.yaml's own: a key that is not a param, a range that is not one (a
float range for an int param, a range for a bool), a value the param refuses, each stop the
sweep with one line naming it, culprit first, before any trial runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from digits.core.config import Params, flat_params, parse_params, read_yaml
from digits.core.errors import DigitsError

SPACE_FILE = "sweep.yaml"


class SweepError(DigitsError):
    pass


@dataclass(frozen=True)
class Dimension:
    key: str  # a params.yaml key, dotted
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            assert self.low is not None and self.high is not None
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        assert self.low is not None and self.high is not None
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list:
        """The values to check against params.yaml: the choices, or the range's ends."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.integer:
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


def _with(params: dict, key: str, value: Any) -> dict:
    out = json.loads(json.dumps(params))
    node = out
    *parents, last = key.split(".")
    for k in parents:
        node = node[k]
    node[last] = value
    return out


class _Strict(BaseModel):
    # as params.yaml's schema (digits.core.config): an unknown field is an error, "0.1" no number
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Range(_Strict):
    """{low, high}: numbers from low to high, on a log scale (`log: true`) or a grid (`step`)."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _sane(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low {self.low:g} is not below high {self.high:g}")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        return self

    def dimension(self, key: str, current: object) -> Dimension:
        """The range for the param `key` whose value is now `current` (its type decides)."""
        if isinstance(current, bool) or not isinstance(current, int | float):
            raise ValueError(f"a range for a {type(current).__name__} param")
        integer = isinstance(current, int)
        if integer and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(f"{key} takes whole numbers, got {self.low:g} and {self.high:g}")
        return Dimension(key, self.low, self.high, self.log, self.step, None, integer)


class Choices(_Strict):
    """{choices: [...]}: one of these values."""

    choices: list[Any] = Field(min_length=1)

    def dimension(self, key: str, current: object) -> Dimension:
        return Dimension(key, choices=tuple(self.choices))


def _kind(spec: object) -> str:
    return "choices" if isinstance(spec, dict) and "choices" in spec else "range"


Spec = Annotated[
    Annotated[Range, Tag("range")] | Annotated[Choices, Tag("choices")], Discriminator(_kind)
]
Space = TypeAdapter(dict[str, Spec])


def _describe(err: Any, raw: dict) -> str:
    """pydantic's first error as "<key>: <what was expected>"."""
    loc = err["loc"]
    key, kind, field = loc[0], loc[1] if len(loc) > 1 else "", loc[2:]
    spec = raw.get(key)
    if err["type"] in ("model_type", "dict_type"):
        return f"{key}: expected {{low, high}} or {{choices: [...]}}"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown field {field[0]!r}"
    if kind == "choices":
        return f"{key}: expected {{choices: [a non-empty list]}}"
    if field and field[0] in ("low", "high"):
        return f"{key}: expected numbers low and high, got {spec}"
    msg = err["msg"].removeprefix("Value error, ")
    if not field:
        return f"{key}: {msg}"
    return f"{key}: {field[0]}: {msg[0].lower()}{msg[1:]}, got {err['input']!r}"


def load_space(path: Path, params: Params) -> list[Dimension]:
    """The search space in `path`, checked against the params it varies."""
    raw = read_yaml(path, SweepError, holds="the search space")
    if not isinstance(raw, dict) or not raw or not all(isinstance(k, str) for k in raw):
        raise SweepError(f"{path}: expected a mapping of params.yaml keys to ranges or choices")
    try:
        specs = Space.validate_python(raw)
    except ValidationError as e:
        # an unknown field first: a typo ("hi") is what makes a required one missing
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        raise SweepError(f"{path}: {_describe(errors[0], raw)}") from None
    known = flat_params(params)
    base = params.model_dump(mode="json")
    space = []
    for key, spec in specs.items():
        if key not in known:
            raise SweepError(f"{path}: {key}: not a key of params.yaml (e.g. train.lr)")
        try:
            dim = spec.dimension(key, known[key])
        except ValueError as e:
            raise SweepError(f"{path}: {key}: {e}") from None
        for v in dim.values():  # every value must be one params.yaml accepts
            try:
                parse_params(_with(base, key, v), f"{path}: {key}={v!r}")
            except DigitsError as e:
                raise SweepError(str(e)) from None
        space.append(dim)
    return space
