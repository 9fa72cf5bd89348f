"""How the default recipe was chosen: candidate training recipes, each trained once and judged
on the validation split alone (the test set only reports, in the evaluate stage).

    python benchmarks/recipe_search.py                       # the candidates below
    python benchmarks/recipe_search.py --only robust-50 --epochs 40

For each candidate it prints, all on validation data: accuracy; the worst accuracy over the
corruption suite applied to the validation digits (digits.scoring.robustness); the calibration error
after temperature scaling, fitted on one half of the validation digits and measured on the
other; and the share of validation outliers (digits.data.outliers' training generator with seeds
the trainer never draws) accepted at 95% of validation digits (FPR95). And the training's
wall time, which the default recipe must keep within 1.2x of the former default's train stage
(benchmarks/pipeline_time.py measures that)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# on top of params.yaml's train section
CANDIDATES: dict[str, dict] = {
    "former-default": {  # bf8a237's params.yaml: plain batches, no outlier exposure
        "epochs": 25,
        "batch_size": 512,
        "lr": 0.005,
        "augment": {"enabled": False},
        "outliers": {"enabled": False},
    },
    "robust-32": {"epochs": 32},
    "robust-32-oe-1/8": {"epochs": 32, "outliers": {"share": 0.125}},
    "robust-35-oe-1/8": {"epochs": 35, "outliers": {"share": 0.125}},
    "robust-32-no-oe": {"epochs": 32, "outliers": {"enabled": False}},
    "robust-32-lr-0.016": {"epochs": 32, "lr": 0.016},
    "robust-33-milder": {"epochs": 33, "augment": {"erase": 10, "warp_elastic": 0.6}},
    "robust-33-ls-0.05": {"epochs": 33, "label_smoothing": 0.05},
    "robust-32-batch-512": {"epochs": 32, "batch_size": 512, "lr": 0.008},
    "robust-33-no-noise": {"epochs": 33, "augment": {"noise_std": 0.0}},
    "robust-38-warp-0.6": {"epochs": 38, "augment": {"warp_share": 0.6}},
    "robust-36": {"epochs": 36},
    "robust-50-warp-0.6": {"epochs": 50, "augment": {"warp_share": 0.6}},
    "robust-60": {"epochs": 60},
    "robust-60-no-oe": {"epochs": 60, "outliers": {"enabled": False}},
    "robust-60-oe-weight-0.2": {"epochs": 60, "outliers": {"weight": 0.2}},
    "robust-60-warp-0.6": {"epochs": 60, "augment": {"warp_share": 0.6}},
    "robust-60-photometric-0.16": {"epochs": 60, "augment": {"photometric_prob": 0.16}},
    "robust-50-warp-0.6-photometric-0.16": {
        "epochs": 50,
        "augment": {"warp_share": 0.6, "photometric_prob": 0.16},
    },
    "robust-50-warp-0.6-oe-1/8": {
        "epochs": 50,
        "augment": {"warp_share": 0.6},
        "outliers": {"share": 0.125},
    },
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def main() -> int:
    from digits.core import numerics

    numerics.pin()
    import numpy as np
    import torch

    from digits.core.config import load_params, parse_params
    from digits.data import outliers
    from digits.data.preprocess import load_split
    from digits.model import calibration, ood
    from digits.model.inference import calibrated
    from digits.model.network import predict_logits
    from digits.scoring.robustness import corruption_accuracies
    from digits.stages.train import outlier_pool, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="candidate names (default: all)")
    ap.add_argument("--epochs", type=int, help="override every candidate's epochs")
    ap.add_argument("--set", action="append", default=[], help="KEY=JSON over train, e.g. lr=0.01")
    args = ap.parse_args()

    base = load_params(ROOT / "params.yaml").model_dump(mode="json")
    data_file = ROOT / "data/processed/train.npz"
    if not data_file.exists():
        sys.exit("recipe_search: no data/processed/train.npz: run `dvc repro preprocess` first")
    data = load_split(data_file, "train", "val")
    val_x, val_y = data[2], data[3]
    val_np = val_x.numpy()
    # validation outliers: the training generator (its fonts), seeds the trainer never uses
    val_outliers = np.concatenate(
        list(outliers.outlier_set("train", 200, data[0][:5000].numpy(), seed=10_000).values())
    )
    names = args.only or list(CANDIDATES)
    print("| candidate | epochs | val acc | val worst corruption | val ECE | val FPR95 | train s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        over = CANDIDATES.get(name, {})
        for item in args.set:
            key, value = item.split("=", 1)
            node = over
            *parents, last = key.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[last] = json.loads(value)
        if args.epochs:
            over = {**over, "epochs": args.epochs}
        params = parse_params({**base, "train": merge(base["train"], over)})
        p = params.train
        pool = outlier_pool(p, data[0]) if p.outliers.enabled else None
        t0 = time.perf_counter()
        result = train(p, data, outliers=pool, progress=False)
        seconds = time.perf_counter() - t0
        logits = predict_logits(result.model, val_x).numpy()
        y = val_y.numpy()
        half = len(y) // 2
        temperature = calibration.fit_temperature(logits[:half], y[:half])
        probs = calibrated(logits, temperature)
        accuracy = float((probs.argmax(1) == y).mean())
        val_ece = calibration.ece(probs[half:], y[half:])

        def predict(images, temperature=temperature, model=result.model):
            with torch.inference_mode():
                out = predict_logits(model, torch.as_tensor(images)).numpy()
            return calibrated(out, temperature)

        worst = corruption_accuracies(predict, val_np, y)
        fpr = ood.fpr_at_tpr(ood.score(probs), ood.score(predict(val_outliers)))
        print(
            f"| {name} {' '.join(args.set)} | {p.epochs} | {accuracy:.4f} | {worst.worst:.4f} "
            f"({worst.worst_corruption()[0]}) | {val_ece:.4f} | "
            f"{fpr:.4f} | {seconds:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
