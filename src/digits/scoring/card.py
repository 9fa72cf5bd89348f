"""A model card for every registered version, in the Hugging Face format (YAML metadata with a
`model-index` of results, then Markdown; what `huggingface_hub.ModelCard` reads and writes):
what the model is for and what it refuses, the data it was trained and tested on with their
hashes, every figure of the evaluate stage (MNIST test, calibration, the outlier suite, the
corruption suite, the sets outside MNIST), its known limits, and how it was gated.

The gate stage writes it, once it has judged the version, to `reports/model_card.md` (its DVC
output beside reports/gate.json: no wall clock, no store names or version numbers in it, so
every store gets the same bytes for the same model and thresholds), logs it into the run that
registered the version, and puts its gist in the version's MLflow description, under the gate's
words (`attach`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from digits.core.files import write_text

if TYPE_CHECKING:
    from digits.core.config import Params
    from digits.core.metrics import Evaluation

MODEL_CARD = Path("reports/model_card.md")
# the official MNIST files, as digits.data.download verifies them (by their MD5s in
# digits.core.mnist) and as they have been since 1998
MNIST_SHA256 = {
    f"{name}-ubyte.gz": sha
    for name, sha in (
        ("train-images-idx3", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        ("train-labels-idx1", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        ("t10k-images-idx3", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        ("t10k-labels-idx1", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    )
}
CARD_MARK = "<!-- digits model card -->"  # where the card starts in a version's description
DESCRIPTION_LIMIT = 4900  # a version's description in MLflow's SQL stores: 5,000 at most


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def metadata(params: Params, ev: Evaluation, wild: dict) -> dict:
    """The YAML front matter: tags and the `model-index` of results (values as fractions)."""
    assert ev.calibration and ev.ood and ev.robustness
    name = params.mlflow.registered_model
    worst_name, worst = ev.robustness.worst_corruption()

    def result(task: str, dataset: str, split: str, metrics: list[tuple[str, str, float]]):
        return {
            "task": {"type": "image-classification", "name": task},
            "dataset": {"type": dataset, "name": dataset, "split": split},
            "metrics": [{"type": t, "value": float(v), "name": n} for t, n, v in metrics],
        }

    results = [
        result(
            "Handwritten digit classification",
            "mnist",
            "test",
            [
                ("accuracy", "Test accuracy", ev.metrics.accuracy),
                ("loss", "Test cross-entropy (calibrated)", ev.metrics.loss),
                ("f1", "Macro F1", ev.metrics.macro_f1),
                ("ece", "Expected calibration error (15 bins)", ev.calibration.ece),
                ("accuracy", f"Worst corruption accuracy ({worst_name})", worst),
                ("accuracy", "Mean corruption accuracy", ev.robustness.mean),
                ("auroc", "Outlier suite AUROC", ev.ood.auroc),
                ("fpr95", "Outlier suite FPR95", ev.ood.fpr95),
                ("refused", "Test digits refused", ev.ood.refused_digits),
            ],
        )
    ]
    for set_name, f in wild["digits"]["sets"].items():
        results.append(
            result(
                "Digit reading outside MNIST",
                f"digits-wild-{set_name}",
                "report",
                [("read", "Read right", f["read"]), ("refused", "Refused", f["refused"])],
            )
        )
    results.append(
        result(
            "Refusing non-digits outside MNIST",
            "digits-wild-non-digits",
            "report",
            [
                ("refused", "Non-digits refused", wild["non_digits"]["refused"]),
                ("auroc", "AUROC, wild digits vs non-digits", wild["auroc"]),
            ],
        )
    )
    return {
        "language": "en",
        "library_name": "pytorch",
        "pipeline_tag": "image-classification",
        "tags": ["mnist", "mlp", "calibrated", "out-of-distribution-detection", "dvc", "mlflow"],
        "datasets": ["mnist"],
        "metrics": ["accuracy", "ece", "auroc"],
        "model-index": [{"name": name, "results": results}],
    }


def render(
    params: Params,
    ev: Evaluation,
    wild: dict,
    *,
    checks: Sequence[Any],
    branch: str,
    model_sha256: str,
    data_sha256: dict[str, str],
    sources_sha256: dict[str, str],
) -> str:
    """The card's text. `checks`: the gate's absolute checks (digits.gate.policy.Check: gate,
    metric, value, op, threshold, passed); `branch`: the promotion branch whose thresholds they
    are; `data_sha256`: the processed files' hashes ({"train.npz": ..., ...});
    `sources_sha256`: the wild sets' source files' (digits.data.wild.source_sha256)."""
    assert ev.calibration and ev.ood and ev.robustness
    t = params.train
    front = yaml.safe_dump(metadata(params, ev, wild), sort_keys=False, allow_unicode=True)
    sizes = "-".join(str(s) for s in (784, *t.hidden_sizes, 10))
    worst_name, worst = ev.robustness.worst_corruption()
    worst_set = min(wild["digits"]["sets"], key=lambda k: wild["digits"]["sets"][k]["read"])
    out = [
        f"---\n{front}---",
        f"# {params.mlflow.registered_model}: handwritten digits, and when it is not a digit",
        f"A {sizes} multilayer perceptron (ReLU) trained on MNIST with warp and photometric "
        f"augmentation and outlier exposure, its probabilities calibrated by temperature "
        f"scaling (T = {ev.calibration.temperature}), and a refusal threshold: an image whose "
        f'best digit scores below {ev.ood.threshold} is answered "not a digit". '
        f"Model file sha256 `{model_sha256}`.",
        "## Intended use",
        "Reading one line of separate handwritten digits, dark on plain light paper (a photo or a "
        "scan; `digits predict` cuts a number into digits), or one digit drawn on the page of "
        "`digits app`. It refuses, rather than names a digit for, blank paper, letters, symbols, "
        "shapes, scribbles and textures much of the time (figures below); a refused image is an "
        "answer, not an error.",
        "## Known limits",
        "\n".join(
            [
                "- Touching or overlapping digits are cut as one and read as one (or refused).",
                "- Several lines of digits are not supported: one line only.",
                "- Colour is thrown away (grayscale); coloured ink on coloured paper, or light ink "
                "on dark paper with a light border, may invert or vanish.",
                "- Digits outside MNIST's look are read less well than MNIST's own: see "
                f'"Outside MNIST" ({worst_set} digits most of all: '
                f"{_pct(wild['digits']['sets'][worst_set]['read'])} read right).",
                "- Refusal is not a guarantee: some shapes, signs and photo crops are read as "
                "digits, with a calibrated probability that is meaningful only for MNIST-like "
                "digits.",
            ]
        ),
        "## Training data",
        _data_table(data_sha256, params),
        "## Results on MNIST's test set",
        _table(
            ["measure", "value"],
            [
                ["accuracy", _pct(ev.metrics.accuracy)],
                ["cross-entropy (calibrated)", f"{ev.metrics.loss:.4f}"],
                ["macro F1", f"{ev.metrics.macro_f1:.4f}"],
                [
                    "expected calibration error, after / before temperature scaling",
                    f"{_pct(ev.calibration.ece)} / {_pct(ev.calibration.ece_before or 0)}",
                ],
                ["worst corruption", f"{_pct(worst)} ({worst_name})"],
                ["mean corruption", _pct(ev.robustness.mean)],
                ["outlier suite AUROC / FPR95", f"{ev.ood.auroc:.4f} / {_pct(ev.ood.fpr95)}"],
                ["test digits refused", _pct(ev.ood.refused_digits)],
                ["outlier suite refused", _pct(ev.ood.refused_outliers)],
            ],
        ),
        "Recall per digit: "
        + ", ".join(f"{d}: {_pct(c.recall)}" for d, c in ev.metrics.per_class.items())
        + ".",
        "### The corruption suite (test digits, corrupted)",
        _table(
            ["corruption", "accuracy"],
            [[k, _pct(v)] for k, v in ev.robustness.corruptions.items()],
        ),
        f"### The outlier suite ({ev.ood.outliers} generated non-digits), refused per kind",
        _table(["kind", "refused"], [[k, _pct(v)] for k, v in ev.ood.refused.items()]),
        "## Outside MNIST",
        "The report halves of the project's own sets (`digits.data.wild`, never trained on; the "
        "validation halves are for choosing), at the model's threshold:",
        _table(
            ["digits", "images", "read right", "refused", "misread"],
            [
                [k, str(f["images"]), _pct(f["read"]), _pct(f["refused"]), _pct(f["misread"])]
                for k, f in wild["digits"]["sets"].items()
            ]
            + [
                [
                    "**all**",
                    str(wild["digits"]["images"]),
                    _pct(wild["digits"]["read"]),
                    _pct(wild["digits"]["refused"]),
                    _pct(wild["digits"]["misread"]),
                ]
            ],
        ),
        _table(
            ["non-digits", "images", "refused"],
            [
                [k, str(f["images"]), _pct(f["refused"])]
                for k, f in wild["non_digits"]["sets"].items()
            ]
            + [
                [
                    "**all**",
                    str(wild["non_digits"]["images"]),
                    _pct(wild["non_digits"]["refused"]),
                ]
            ],
        ),
        f"AUROC of telling these digits from these non-digits by the score: {wild['auroc']:.4f}. "
        "Sources (besides MNIST and matplotlib's and Pillow's fonts): "
        + ", ".join(f"{k} sha256 `{v}`" for k, v in sources_sha256.items())
        + ".",
        "## How it was gated",
        "The gate stage (docs/gate.md) judged it by the thresholds committed on the promotion "
        f"branch (`{branch}`), and against the champion of its store (McNemar's exact test, "
        "one-sided) and the high-water mark, which differ between stores: the version's MLflow "
        "description says how those went and what the gate decided. The absolute gates:",
        _table(
            ["gate", "judges", "value", "threshold", "passed"],
            [
                [
                    f"`{c.gate}`",
                    c.metric,
                    f"{c.value:{c.fmt}}",
                    f"{c.op} {c.threshold:{c.fmt}}",
                    "yes" if c.passed else "**no**",
                ]
                for c in checks
            ],
        ),
        "Only a clean pipeline run of the promotion branch that passes every gate moves "
        "`@champion`.",
    ]
    return "\n\n".join(out) + "\n"


def _table(head: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(head) - 1)
    lines = [head, align, *rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


def _data_table(data_sha256: dict[str, str], params: Params) -> str:
    rows = [[f"MNIST `{k}` (official)", f"`{v}`"] for k, v in MNIST_SHA256.items()]
    rows += [[f"processed `{k}`", f"`{v}`"] for k, v in data_sha256.items()]
    return (
        f"MNIST's 60,000 training digits, of which {params.data.val_size} (stratified, seed "
        f"{params.data.seed}) are held out for validation (the temperature and the refusal "
        "threshold are chosen on them); generated non-digits for outlier exposure "
        "(`digits.data.outliers`, DejaVu fonts only). Tested on MNIST's 10,000 test digits, "
        "read by the evaluate stage only. sha256 of the files:\n\n"
        + _table(["file", "sha256"], rows)
    )


def write(text: str, path: Path = MODEL_CARD) -> None:
    write_text(path, text)


def make(params: Params, checks: Sequence[Any], *, branch: str) -> str:
    """The gate stage's call: the card of the model file judged, from the evaluate stage's
    figures (reports/metrics.json, reports/wild.json) and the processed data's hashes, written
    to reports/model_card.md."""
    import json

    from digits.core.files import METRICS, MODEL, TEST_DATA, TRAIN_DATA, file_digest
    from digits.core.metrics import Evaluation
    from digits.data.wild import source_sha256
    from digits.scoring.wild import WILD_METRICS

    text = render(
        params,
        Evaluation.from_dict(json.loads(METRICS.read_text())),
        json.loads(WILD_METRICS.read_text()),
        checks=checks,
        branch=branch,
        model_sha256=file_digest(MODEL),
        data_sha256={p.name: file_digest(p) for p in (TRAIN_DATA, TEST_DATA)},
        sources_sha256=source_sha256(),
    )
    write(text)
    return text


def short(card: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card's gist for a version's description, at most `limit` characters: without the
    YAML front matter, the data's hashes, the per-digit, per-corruption and per-kind figures,
    the sources and the gate table (all in the artifact); then cut at a line if still long."""
    body = card.split("\n---\n", 1)[1] if card.startswith("---\n") else card
    dropped = ("## Training data", "### The corruption", "### The outlier", "## How it was gated")
    parts = [p for p in re.split(r"\n(?=#{2,3} )", body) if not p.lstrip().startswith(dropped)]
    paragraphs = "\n".join(parts).strip().split("\n\n")
    kept = [p for p in paragraphs if not p.startswith(("Recall per digit", "AUROC of telling"))]
    text = "\n\n".join(kept)
    tail = "\n\nThe whole card: the artifact `model_card.md` of the run that registered it."
    if len(text) + len(tail) > limit:
        text = text[: max(0, limit - len(tail))].rsplit("\n", 1)[0]
    return text + tail


def attach(store: Any, name: str, version: str, run_id: str, path: Path = MODEL_CARD) -> None:
    """The card into the run that registered the version (artifact `model_card.md`), and its
    short form into the version's description."""
    text = path.read_text()
    with store.writing() as client:
        client.log_artifact(run_id, str(path))
        current = client.get_model_version(name, version).description or ""
        head = current.split(CARD_MARK, 1)[0].strip()
        room = DESCRIPTION_LIMIT - len(head) - len(CARD_MARK) - 4
        body = f"{CARD_MARK}\n\n{short(text, room)}"
        client.update_model_version(name, version, f"{head}\n\n{body}" if head else body)
