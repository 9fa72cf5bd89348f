"""The metric gate and champion/challenger promotion in the MLflow model registry.

The challenger is the version the evaluate stage just registered. Both it and the current
champion are loaded from the registry and scored here, on the same test set in the same
process, so the comparison never trusts numbers stored when the champion was registered.

Passing every gate moves the alias `champion` to the challenger and `previous` to the version
it replaces; each version gets `validation_status` = approved / rejected (with the reasons)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from digits.errors import DigitsError
from digits.metrics import compute_metrics, worst_recall

CHAMPION, PREVIOUS = "champion", "previous"


class GateFailed(DigitsError):
    """Raised after the report is written, when at least one gate failed."""


@dataclass
class Check:
    gate: str
    metric: str
    value: float
    threshold: float
    op: str  # ">=" or "<="
    note: str = ""

    @property
    def passed(self) -> bool:
        # rounding: a value equal to the threshold as printed passes
        v, t = round(self.value, 6), round(self.threshold, 6)
        return v >= t if self.op == ">=" else v <= t

    def reason(self) -> str:
        return f"{self.gate}: {self.metric} {self.value:.4f} not {self.op} {self.threshold:.4f}"


def score(model_uri: str, x: np.ndarray, y: np.ndarray) -> dict:
    """Load a registered model with pyfunc (probabilities out) and score it on (x, y) with the
    same metric code as the evaluate stage."""
    import mlflow.pyfunc

    return compute_metrics(mlflow.pyfunc.load_model(model_uri).predict(x), y)


def checks(gates, new: dict, champion: dict | None, champion_version: str | None) -> list[Check]:
    worst_digit, worst = worst_recall(new)
    out = [
        Check("min_accuracy", "accuracy", new["accuracy"], gates.min_accuracy, ">="),
        Check("max_loss", "loss", new["loss"], gates.max_loss, "<="),
        Check(
            "min_class_recall",
            f"recall of digit {worst_digit} (worst)",
            worst,
            gates.min_class_recall,
            ">=",
        ),
    ]
    if champion is not None:
        out.append(
            Check(
                "max_accuracy_drop",
                "accuracy vs champion",
                new["accuracy"],
                champion["accuracy"] - gates.max_accuracy_drop,
                ">=",
                f"champion v{champion_version}: {champion['accuracy']:.4f}, "
                f"drop allowed {gates.max_accuracy_drop}",
            )
        )
    return out


def report(
    name: str, version: str, results: list[Check], champion_version: str | None, promoted: bool
) -> str:
    lines = [f"# Gate report: {name} version {version}", ""]
    lines.append("| gate | metric | value | threshold | result |")
    lines.append("|---|---|---|---|---|")
    for c in results:
        limit = f"{c.op} {c.threshold:.4f}" + (f" ({c.note})" if c.note else "")
        lines.append(
            f"| {c.gate} | {c.metric} | {c.value:.4f} | {limit} | "
            f"{'pass' if c.passed else 'FAIL'} |"
        )
    lines.append("")
    failed = [c for c in results if not c.passed]
    if failed:
        lines.append(
            f"**REJECTED**: {len(failed)} gate(s) failed: "
            + ", ".join(c.gate for c in failed)
            + ". The champion is unchanged"
            + (f" (version {champion_version})." if champion_version else " (none).")
        )
    elif promoted:
        lines.append(
            f"**APPROVED**: version {version} is now `@{CHAMPION}`"
            + (
                f"; version {champion_version} is `@{PREVIOUS}`."
                if champion_version
                else " (the first champion)."
            )
        )
    else:
        lines.append(f"**APPROVED**: version {version} was already `@{CHAMPION}`.")
    return "\n".join(lines) + "\n"


def run(params) -> list[Check]:
    """The `gate` stage / `digits gate` command. Raises GateFailed (exit 1) on any failure."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from digits import tracking
    from digits.data import load_split
    from digits.files import GATE_REPORT, RUN_INFO, TEST_DATA, write_text

    info = json.loads(Path(RUN_INFO).read_text())
    name, version = info["registered_model"], info["version"]
    tracking.connect(params.mlflow.experiment)
    client = MlflowClient(tracking.tracking_uri())
    test_x, test_y = load_split(TEST_DATA, "test")
    x, y = test_x.numpy(), test_y.numpy()

    try:
        champ_version = client.get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:  # no champion yet
        champ_version = None
    already = champ_version == version
    new = score(f"models:/{name}/{version}", x, y)
    champion = None
    if champ_version is not None and not already:
        champion = score(f"models:/{name}/{champ_version}", x, y)

    results = checks(params.gates, new, champion, champ_version)
    failed = [c for c in results if not c.passed]
    with tracking.store_lock():
        if failed:
            client.set_model_version_tag(name, version, "validation_status", "rejected")
            client.set_model_version_tag(
                name, version, "validation_reasons", "; ".join(c.reason() for c in failed)
            )
        else:
            client.set_model_version_tag(name, version, "validation_status", "approved")
            if not already:
                if champ_version is not None:
                    client.set_registered_model_alias(name, PREVIOUS, champ_version)
                client.set_registered_model_alias(name, CHAMPION, version)
    text = report(
        name,
        version,
        results,
        None if already else champ_version,
        promoted=not failed and not already,
    )
    write_text(GATE_REPORT, text)
    print(text)
    if failed:
        raise GateFailed("failed gates: " + "; ".join(c.reason() for c in failed))
    return results
