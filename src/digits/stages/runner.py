"""Running one DVC stage: pin the numerics, read and check params, call the stage's `run`.

Each stage lives in its own library module (`STAGES`), imported only when that stage runs, so
a stage process loads just the code that `dvc.yaml` lists as its deps: editing the gate does
not retrain. A project error (`DigitsError`) ends as one line on stderr and exit status 1; any
other exception is a bug and keeps its traceback."""

from __future__ import annotations

import atexit
import importlib
import os
import sys
from typing import NoReturn

from digits.core import numerics, settings
from digits.core.errors import DigitsError

# stage name -> the module whose `run(params)` it calls
STAGES: dict[str, str] = {
    "download": "digits.data.download",
    "preprocess": "digits.data.preprocess",
    "train": "digits.stages.train",
    "evaluate": "digits.stages.evaluate",
    "gate": "digits.stages.gate",
}


def run_stage(name: str, params_file: str = "params.yaml") -> int:
    """Run stage `name`; return the exit status (0, 1 after a one-line error, 130 when
    interrupted)."""
    numerics.pin()  # before anything imports numpy or torch
    settings.client_defaults()  # before any MLflow call
    from digits.core.config import load_params

    try:
        # params first: a bad file stops the stage before any heavy import or work
        params = load_params(params_file)
        importlib.import_module(STAGES[name]).run(params)
    except DigitsError as e:
        print(f"digits {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl+C, or SIGTERM (digits.tracking.runs.Terminated)
        print(f"digits {name}: stopped ({e or 'interrupted'})", file=sys.stderr)
        return 130
    return 0


def exit_now(code: int) -> NoReturn:
    """End the process with `code` without tearing down the interpreter: the exit handlers
    (logging, MLflow's) run and the output is flushed, then os._exit. Freeing torch, MLflow,
    SQLAlchemy and matplotlib at exit took 1-3 s per stage (a tenth of a forced `dvc repro`)
    and a second of a 2-second `digits predict`, and does nothing a finished command needs: its
    outputs are closed and renamed into place by then.

    The standard library has no public call that runs the exit handlers now; CPython's
    `atexit._run_exitfuncs` is what a normal exit runs first. Where it is missing (another
    Python), this is a normal exit."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(name: str) -> NoReturn:
    """`pipeline/<name>.py`: run the stage, then end the process at once (`exit_now`). A bug
    (any other exception) still ends with its traceback and a normal exit."""
    exit_now(run_stage(name))
