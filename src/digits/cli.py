"""`digits <stage>`: the command line over the library. Each DVC stage runs one of these
through its thin script in pipeline/; users can run them by hand too.

Every known failure (bad params, bad data, unreachable mirror or tracking server) ends as one
line on stderr naming the culprit, and exit status 1: no traceback for a user's mistake."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from digits.config import ConfigError, load_params


def _known_errors() -> tuple[type[Exception], ...]:
    from digits.data import DataError
    from digits.download import DownloadError
    from digits.gate import GateFailed
    from digits.tracking import TrackingError
    from digits.train import CheckpointError

    return DataError, DownloadError, CheckpointError, TrackingError, GateFailed, ValueError


def stage_download(params) -> None:
    """fetch the four MNIST .gz files (MNIST_MIRROR) into data/raw, MD5-checked"""
    from digits.download import download
    from digits.files import RAW_DIR

    download(RAW_DIR)


def stage_preprocess(params) -> None:
    """parse IDX, split off the validation set, write data/processed"""
    from digits.data import preprocess
    from digits.files import DATA_SUMMARY, RAW_DIR, TEST_DATA, TRAIN_DATA

    summary = preprocess(
        RAW_DIR, TRAIN_DATA, TEST_DATA, DATA_SUMMARY, params.data.val_size, params.data.seed
    )
    print("preprocess: " + ", ".join(f"{k} {v['count']}" for k, v in summary.items()))


def stage_train(params) -> None:
    """train the network, write models/model.safetensors and the history"""
    from digits.train import run

    run(params)


def stage_evaluate(params) -> None:
    """test metrics, figures, MLflow run and a new registered model version"""
    from digits.evaluate import run

    run(params)


def stage_gate(params) -> None:
    """check the new version against the gates and @champion; promote or reject"""
    from digits.gate import run

    run(params)


COMMANDS: dict[str, Callable] = {
    "download": stage_download,
    "preprocess": stage_preprocess,
    "train": stage_train,
    "evaluate": stage_evaluate,
    "gate": stage_gate,
}


def run_command(name: str, params_file: str = "params.yaml") -> int:
    # params first, before the heavy imports: a bad file stops the stage at once, before any work
    try:
        params = load_params(params_file)
    except ConfigError as e:
        print(f"digits {name}: error: {e}", file=sys.stderr)
        return 1
    try:
        COMMANDS[name](params)
    except _known_errors() as e:
        print(f"digits {name}: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="digits", description=__doc__.splitlines()[0])
    # --params is accepted before or after the command: `digits --params p.yaml train`
    # or `digits train --params p.yaml`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params", default=argparse.SUPPRESS, help="params file (default: params.yaml)"
    )
    parser = argparse.ArgumentParser(
        prog="digits",
        description="Run one stage of the MNIST pipeline, as `dvc repro` does.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        sub.add_parser(name, parents=[common], help=fn.__doc__)
    args = parser.parse_args(argv)
    return run_command(args.command, getattr(args, "params", "params.yaml"))


if __name__ == "__main__":
    sys.exit(main())
