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

from digits.core import numerics
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


def main(name: str) -> NoReturn:
    """`pipeline/<name>.py`: run the stage, then end the process without tearing down the
    interpreter. Freeing torch, MLflow and matplotlib at exit took 1-3 s per stage (a tenth of
    a forced `dvc repro`) and does nothing a finished stage needs: its outputs are closed and
    renamed into place by then, and the exit handlers (logging, MLflow) still run here. A bug
    (any other exception) still ends with its traceback and a normal exit."""
    code = run_stage(name)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
