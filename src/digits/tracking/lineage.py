"""What an MLflow run says about where it came from: its name and tags (commit, branch,
uncommitted files, DVC experiment), its description (how its params differ from the promotion
branch's), and its data as MLflow datasets (the processed splits, with their sha256 and the
official MNIST files they were made from).

Pure functions of what the caller hands in (an `Origin` from digits.core.provenance, the params, the
splits' digests), but for the description, which reads the promotion branch's params.yaml and
the uncommitted params diff from git."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlflow.data.dataset import Dataset
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.schema import TensorDatasetSchema
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from digits.core import provenance
from digits.core.config import Params, flat_params, flatten, parse_params
from digits.core.errors import DigitsError
from digits.core.mnist import NUM_PIXELS, OFFICIAL_MIRRORS, RESOURCES
from digits.core.provenance import Origin

GIT_OUTPUT_LINES = 60  # of a params.yaml diff quoted in a run's description
MAX_TAG_VALUE = 8000  # MLflow's limit on a tag's value (the description is a tag)


def run_tags(origin: Origin) -> dict[str, str]:
    """Where the run came from, as tags (MLflow's own source tags included)."""
    tags = {
        "dvc_exp_name": origin.experiment,
        "git_commit": origin.commit,
        "git_dirty": str(bool(origin.changed)).lower(),
        "mlflow.source.name": "dvc repro",
    }
    if origin.branch:
        tags["git_branch"] = origin.branch
    if origin.commit:
        tags["mlflow.source.git.commit"] = origin.commit
    return tags


def params_differences(
    params: Params, root: Path, ref: str
) -> list[tuple[str, object, object]] | None:
    """(key, this run's value, value at `ref`) for every param that differs from params.yaml
    as committed at `ref`; None when `ref` has no params.yaml. Keys `ref` leaves out count at
    their defaults; a file this code cannot parse (another version's keys) is compared as is."""
    try:
        raw = provenance.committed_params(root, ref)
    except DigitsError:
        return None
    if raw is None:
        return None
    try:
        theirs = flat_params(parse_params(raw, f"{ref}:params.yaml"))
    except DigitsError:
        theirs = flatten(raw)
    ours = flat_params(params)
    missing = "(absent)"
    return [
        (k, ours.get(k, missing), theirs.get(k, missing))
        for k in sorted(ours.keys() | theirs.keys())
        if ours.get(k, missing) != theirs.get(k, missing)
    ]


def description(origin: Origin, params: Params, root: Path) -> str:
    """Markdown for the run page: where the run came from and how its params differ from
    the promotion branch's (and, when params.yaml has uncommitted changes, the diff)."""
    if not origin.commit:
        return "Not run from a git repository: no commit to name."
    lines = []
    if origin.experiment:
        base = provenance.short(root, origin.baseline) if origin.baseline else ""
        lines.append(f"DVC experiment `{origin.experiment}` (baseline commit `{base or '?'}`).")
    else:
        lines.append(f"Commit `{origin.label}` ({origin.commit}).")
    if origin.changed:
        shown = ", ".join(f"`{p}`" for p in origin.changed[:10])
        more = f" and {len(origin.changed) - 10} more" if len(origin.changed) > 10 else ""
        lines.append(f"Run with uncommitted changes to {shown}{more}.")

    branch = params.gates.promotion_branch
    ref = provenance.branch_ref(root, branch)
    diffs = params_differences(params, root, ref) if ref else None
    lines.append("")
    if diffs is None:
        lines.append(f"No `params.yaml` on the promotion branch `{branch}` to compare with.")
    elif not diffs:
        lines.append(f"Params: as on the promotion branch `{branch}`.")
    else:
        lines += [f"Params that differ from the promotion branch `{branch}`:", ""]
        lines += [f"| param | this run | {branch} |", "| --- | --- | --- |"]
        lines += [f"| `{k}` | {a} | {b} |" for k, a, b in diffs]

    if "params.yaml" in origin.changed:
        body = provenance.params_diff(root).splitlines()
        if len(body) > GIT_OUTPUT_LINES:
            body = [*body[:GIT_OUTPUT_LINES], "... (cut)"]
        lines += ["", "Uncommitted changes to `params.yaml` (`git diff HEAD`):", "", "```diff"]
        lines += [*body, "```"]
    return "\n".join(lines)[:MAX_TAG_VALUE]


class MnistFiles(HTTPDatasetSource):
    """The official MNIST files a split was made from, with their MD5s (digits.core.mnist)."""

    def __init__(self, url: str, files: dict[str, str]):
        super().__init__(url)
        self.files = files

    def to_dict(self) -> dict:
        return {**super().to_dict(), "files": self.files}


class ProcessedSplit(Dataset):
    """A split of the processed data as an MLflow dataset, described without loading it: the
    digest is its file's sha256 (the first 8 hex digits, as short as MLflow's own digests so the
    runs table shows it whole; all 64 are in the profile), the source is the official files,
    shape and dtype are the schema and profile."""

    def __init__(self, name: str, sha256: str, prefix: str, rows: int):
        files = {f: md5 for f, md5 in RESOURCES if f.startswith(prefix + "-")}
        self.sha256, self.rows = sha256, rows
        super().__init__(MnistFiles(OFFICIAL_MIRRORS[0], files), name=name, digest=sha256[:8])

    def _compute_digest(self) -> str:  # the digest is always given
        return self.sha256[:8]

    @property
    def profile(self) -> dict:
        return {
            "num_rows": self.rows,
            "features_shape": [self.rows, NUM_PIXELS],
            "targets_shape": [self.rows],
            "sha256": self.sha256,
        }

    @property
    def schema(self) -> TensorDatasetSchema:
        images = TensorSpec(np.dtype(np.uint8), (-1, NUM_PIXELS), "images")
        labels = TensorSpec(np.dtype(np.uint8), (-1,), "labels")
        return TensorDatasetSchema(Schema([images]), Schema([labels]))

    def to_dict(self) -> dict:
        return {
            **super().to_dict(),
            "schema": json.dumps(self.schema.to_dict()),
            "profile": json.dumps(self.profile),
        }

    def as_input(self, context: str) -> DatasetInput:
        """The dataset as a run input in `context` (training, validation or testing): the
        entity made from its public `to_dict()`, as MLflow's own (private) conversion does."""
        d = self.to_dict()
        entity = DatasetEntity(
            name=d["name"],
            digest=d["digest"],
            source_type=d["source_type"],
            source=d["source"],
            schema=d["schema"],
            profile=d["profile"],
        )
        return DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])


def training_inputs(sha256: str, train_rows: int, val_rows: int) -> list[DatasetInput]:
    """The train and validation splits (one file, train.npz) as inputs of the training run."""
    return [
        ProcessedSplit("mnist-train", sha256, "train", train_rows).as_input("training"),
        ProcessedSplit("mnist-val", sha256, "train", val_rows).as_input("validation"),
    ]


def test_input(sha256: str, rows: int) -> DatasetInput:
    return ProcessedSplit("mnist-test", sha256, "t10k", rows).as_input("testing")
