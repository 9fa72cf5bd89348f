"""Training checkpoints: the whole training state after every epoch, so that a killed run resumes
exactly where it left off and ends with the bytes an uninterrupted run gives.

A checkpoint is one safetensors file: the model's and optimizer's tensors and torch's RNG states
as tensors, everything else (epoch, history, scheduler, optimizer settings, the MLflow run it
logs to) as JSON in the header. Loading it runs no pickle at all, so a planted file can only
fail to parse. It belongs to one run, named by `fingerprint(params, data)`: a checkpoint of
other params or data is refused, never resumed by mistake."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from digits.core.config import TrainParams
from digits.core.errors import DigitsError
from digits.core.files import atomic_path

FORMAT = 1


class CheckpointError(DigitsError):
    pass


def fingerprint(p: TrainParams, data_digest: str) -> str:
    """Identity of a training run: its params and its data."""
    blob = json.dumps({"train": p.model_dump(mode="json"), "data": data_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(kw_only=True)
class State:
    """What a checkpoint holds."""

    epoch: int
    history: list[dict]  # the finished epochs' rows (digits.core.reports.Epoch as dicts)
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None = None
    run_id: str = ""  # the MLflow run the training logs to ("" when it logs nowhere)
    extra: dict = field(default_factory=dict)


class Checkpoint:
    """The checkpoint file of one run (`key`: its fingerprint). `run_id` goes into every save:
    the MLflow run a resumed training continues."""

    def __init__(self, path: Path, key: str, run_id: str = ""):
        self.path, self.key, self.run_id = Path(path), key, run_id

    def load(self) -> State | None:
        """The saved state, None when there is none; CheckpointError for a file that is not
        this run's checkpoint."""
        return load(self.path, self.key) if self.path.exists() else None

    def save(self, state: State) -> None:
        state.run_id = self.run_id
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save(self.path, self.key, state)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def save(path: Path, key: str, state: State) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state.model.items()}
    opt_state = {}
    for index, values in state.optimizer["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
        opt_state[str(index)] = sorted(values)
    tensors["rng.cpu"] = state.rng_cpu
    if state.rng_cuda is not None:
        tensors["rng.cuda"] = state.rng_cuda
    header = {
        "format": FORMAT,
        "fingerprint": key,
        "epoch": state.epoch,
        "history": state.history,
        "optimizer_groups": state.optimizer["param_groups"],
        "optimizer_state": opt_state,
        "scheduler": state.scheduler,
        "run_id": state.run_id,
        "extra": state.extra,
    }
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"checkpoint": json.dumps(header)})


def load(path: Path, key: str) -> State:
    """The checkpoint at `path`, if it belongs to the run `key`; else CheckpointError."""
    from safetensors import SafetensorError, safe_open

    fix = "delete it to start over"
    try:
        with safe_open(str(path), "pt") as f:
            header = json.loads((f.metadata() or {})["checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"{path}: not a training checkpoint ({why}); {fix}") from None
    if header.get("format") != FORMAT or header.get("fingerprint") != key:
        raise CheckpointError(
            f"{path}: checkpoint belongs to another run (params or data differ); {fix}"
        )
    try:
        optimizer = {
            "param_groups": header["optimizer_groups"],
            "state": {
                int(i): {n: tensors[f"optimizer.{i}.{n}"] for n in names}
                for i, names in header["optimizer_state"].items()
            },
        }
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        return State(
            epoch=int(header["epoch"]),
            history=list(header["history"]),
            model=model,
            optimizer=optimizer,
            scheduler=header["scheduler"],
            rng_cpu=tensors["rng.cpu"],
            rng_cuda=tensors.get("rng.cuda"),
            run_id=str(header.get("run_id", "")),
            extra=dict(header.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: incomplete checkpoint ({e!r}); {fix}") from None


def capture(epoch: int, history: list[dict], model, opt, sched, run_id: str = "") -> State:
    cuda = next(model.parameters()).is_cuda
    return State(
        epoch=epoch,
        history=history,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict() if sched is not None else {},
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state() if cuda else None,
        run_id=run_id,
    )


def restore(state: State, model, opt, sched, device: torch.device) -> None:
    """Put model, optimizer, schedule and RNG back as they were after `state.epoch`."""
    model.load_state_dict(state.model)
    opt.load_state_dict(state.optimizer)
    if sched is not None:
        sched.load_state_dict(state.scheduler)
    torch.set_rng_state(state.rng_cpu)
    if device.type == "cuda" and state.rng_cuda is not None:
        torch.cuda.set_rng_state(state.rng_cuda)
