"""`digits <stage>`: the command line over the library. Each DVC stage runs one of these
through its thin script in pipeline/; users can run them by hand too.

Every known failure (bad params, bad data, unreachable mirror or tracking server) ends as one
line on stderr naming the culprit, and exit status 1: no traceback for a user's mistake."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

def _known_errors() -> tuple[type[Exception], ...]:
    from digits.config import ConfigError
    from digits.data import DataError
    from digits.download import DownloadError
    from digits.gate import GateFailed
    from digits.train import CheckpointError
    from digits.tracking import TrackingError
    return (ConfigError, DataError, DownloadError, CheckpointError, TrackingError, GateFailed,
            ValueError)


def stage_download(params) -> None:
    from digits.download import download
    from digits.files import RAW_DIR
    download(RAW_DIR)


def stage_preprocess(params) -> None:
    from digits.data import preprocess
    from digits.files import DATA_SUMMARY, RAW_DIR, TEST_DATA, TRAIN_DATA
    summary = preprocess(RAW_DIR, TRAIN_DATA, TEST_DATA, DATA_SUMMARY,
                         params.data.val_size, params.data.seed)
    print("preprocess: " + ", ".join(f"{k} {v['count']}" for k, v in summary.items()))


def stage_train(params) -> None:
    from digits.train import run
    run(params)


def stage_evaluate(params) -> None:
    from digits.evaluate import run
    run(params)


def stage_gate(params) -> None:
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
    from digits.config import load_params
    try:
        params = load_params(params_file)  # first: a bad params file stops before any work
        COMMANDS[name](params)
    except _known_errors() as e:
        print(f"digits {name}: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="digits", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        sub.add_parser(name, help=(COMMANDS[name].__doc__ or f"run the {name} stage"))
    args = parser.parse_args(argv)
    return run_command(args.command, args.params)


if __name__ == "__main__":
    sys.exit(main())
