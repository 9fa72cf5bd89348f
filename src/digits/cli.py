"""`digits <command>`: the command line over the library.

The pipeline's stages (`digits train`, ...) are what `dvc repro` runs through pipeline/*.py;
the other commands use what the pipeline made. Each command imports its module only when it
runs. A project error (`DigitsError`) is printed as one line naming the culprit, exit status 1;
anything else is a bug and shows its traceback."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from digits.core import numerics, settings
from digits.core.errors import DigitsError
from digits.stages.runner import STAGES, exit_now, run_stage

STAGE_HELP = {
    "download": "fetch the four MNIST .gz files (MNIST_MIRROR) into data/raw, MD5-checked",
    "preprocess": "parse IDX, split off the validation set, write data/processed",
    "train": "train the network; write models/model.safetensors and the history",
    "evaluate": "test metrics, figures, MLflow run and a new registered model version",
    "gate": "check the new version against the gates and @champion; promote or reject",
}


def build_parser() -> argparse.ArgumentParser:
    # --params is accepted before or after the command: `digits --params p.yaml train`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--params", default=argparse.SUPPRESS, help="params file (default: params.yaml)"
    )
    parser = argparse.ArgumentParser(
        prog="digits",
        description="The MNIST pipeline's stages, as `dvc repro` runs them, and the "
        "commands that use its models.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        sub.add_parser(name, parents=[common], help=STAGE_HELP[name])
    # -- commands beyond the stages: each adds its parser here and sets `handler` --
    p = sub.add_parser(
        "promote",
        parents=[common],
        help="make an approved version @champion by hand; who, when and why become its tags",
    )
    p.add_argument("version", metavar="VERSION", nargs="?", help="the registered version, e.g. 7")
    p.add_argument(
        "--rollback",
        action="store_true",
        help="instead of VERSION: put back the champion before the current one",
    )
    p.add_argument("--reason", required=True, help="why (recorded on the version)")
    p.set_defaults(handler=_promote)
    model_help = (
        "MLflow model URI (default: models:/<mlflow.registered_model of params.yaml>@champion "
        "in the configured store)"
    )
    p = sub.add_parser("predict", help="read the digit, or the number, in image files")
    p.add_argument(
        "images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... of a digit or a number each"
    )
    p.add_argument("--model", help=model_help)
    p.add_argument("--json", action="store_true", help="one JSON object per line, all ten probs")
    _log_options(p)
    p.set_defaults(handler=_predict)
    p = sub.add_parser("app", help="a page to draw a digit and see what the model thinks")
    p.add_argument("--model", help=model_help)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default: 127.0.0.1; another needs --public)",
    )
    p.add_argument(
        "--public",
        action="store_true",
        help="allow a --host other than loopback: the page and API open to the network",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one)")
    p.add_argument(
        "--rate-limit",
        type=float,
        default=20.0,
        metavar="PER_SECOND",
        help="/predict and /feedback requests a second per client address, in each worker; "
        "past it a 429 (default 20; 0: no limit)",
    )
    p.add_argument(
        "--rate-burst",
        type=int,
        default=40,
        metavar="N",
        help="requests a client may send at once before the limit applies (default 40)",
    )
    p.add_argument(
        "--workers", type=int, help="processes serving requests (default: the cores, at most 4)"
    )
    p.add_argument(
        "--follow-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often each worker asks the store where the alias points; a move is served "
        "within this (default 2; 0: never follow)",
    )
    _log_options(p)
    p.add_argument(
        "--log-retention-days",
        type=float,
        default=30.0,
        metavar="DAYS",
        help="answers older than this are deleted from the log (default 30)",
    )
    p.set_defaults(handler=_app)
    p = sub.add_parser(
        "sweep",
        parents=[common],
        help="a hyperparameter search many workers share (Optuna; each trial a DVC experiment)",
    )
    p.add_argument("--study", required=True, help="the study's name: the same on every worker")
    p.add_argument("--trials", type=int, help="trials the study should hold, all workers together")
    p.add_argument("--jobs", type=int, default=1, help="trials at once on this machine (default 1)")
    p.add_argument(
        "--storage",
        help="the study's database, e.g. postgresql://optuna@db-host/optuna (password: PGPASSWORD"
        " or ~/.pgpass); default: sqlite optuna.db beside mlflow.db (one machine)",
    )
    p.add_argument("--space", help="the search space file (default: sweep.yaml)")
    p.add_argument("--seed", type=int, default=0, help="the TPE sampler's seed (default 0)")
    p.add_argument("--best", action="store_true", help="print the best trial and how to use it")
    p.set_defaults(handler=_sweep)
    p = sub.add_parser(
        "monitor",
        parents=[common],
        help="a window of the prediction log against the version's reference; exit 1 on alert",
    )
    p.add_argument("--version", help="the registered version (default: the served @champion)")
    p.add_argument(
        "--since",
        help="a duration back (24h, 90m, 7d) or an ISO 8601 time (default: "
        "monitor.window of params.yaml)",
    )
    p.add_argument("--until", help="the window's end, the same forms (default: now)")
    p.add_argument("--reference", help="a reference file (default: the version's own, in MLflow)")
    p.add_argument("--report", default="monitor.html", help="the HTML report (monitor.html)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-track", action="store_true", help="do not log the run to MLflow")
    _log_options(p, logging=False)
    p.set_defaults(handler=_monitor)
    p = sub.add_parser("feedback", help="review corrections and export the approved ones")
    fsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = fsub.add_parser(
        "review", parents=[common], help="list pending corrections; approve or reject them"
    )
    q.add_argument("--approve", type=int, nargs="+", metavar="ID", help="corrections to approve")
    q.add_argument("--reject", type=int, nargs="+", metavar="ID", help="corrections to reject")
    q.add_argument("--no-rule", action="store_true", help="do not apply feedback.min_sources' rule")
    q.add_argument("--all", action="store_true", help="list decided corrections too")
    q.add_argument("--images", action="store_true", help="draw each piece in the terminal")
    _log_options(q, logging=False)
    q.set_defaults(handler=_feedback_review)
    q = fsub.add_parser("export", help="approved corrections -> a DVC-tracked .npz")
    q.add_argument("--out", default="feedback/examples.npz", help="(default feedback/examples.npz)")
    q.add_argument("--no-dvc", action="store_true", help="write the file only, no `dvc add`")
    _log_options(q, logging=False)
    q.set_defaults(handler=_feedback_export)
    p = sub.add_parser(
        "server", help="the team's MLflow server: PostgreSQL + proxied artifacts (docs/team.md)"
    )
    p.add_argument(
        "--backend-store-uri",
        help="PostgreSQL URI, e.g. postgresql://mlflow@db-host/mlflow (password: PGPASSWORD "
        "or ~/.pgpass); default: a throwaway local cluster, deleted on exit",
    )
    p.add_argument(
        "--artifacts-destination",
        help="folder or s3://bucket/path where the server keeps artifacts (required with "
        "--backend-store-uri; default: a temp folder deleted on exit)",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000; 0: a free one)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (default 2)")
    p.add_argument(
        "--admin-password-file",
        metavar="FILE",
        help="the admin's password in a file only you can read (default: "
        "MLFLOW_AUTH_ADMIN_PASSWORD; there is no default password)",
    )
    p.add_argument(
        "--auth-database-uri",
        help="where users and permissions live (default: the backend store's database; a "
        "second database in the throwaway cluster)",
    )
    p.add_argument(
        "--auth-cache-seconds",
        type=int,
        default=60,
        metavar="N",
        help="a worker trusts a login it has checked for N seconds, sparing the password hash "
        "on every request (default 60; 0: check every request; docs/team.md)",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="no logins: anyone who reaches the server may change anything (loopback only)",
    )
    p.add_argument(
        "mlflow_args",
        nargs=argparse.REMAINDER,
        help="`user add NAME --role reader|developer|release` (a login, as the admin; "
        "`user add -h`), or after --: more `mlflow server` options",
    )
    p.set_defaults(handler=_server)
    return parser


def _log_options(p: argparse.ArgumentParser, logging: bool = True) -> None:
    p.add_argument(
        "--log-db",
        metavar="URL",
        help="the prediction log: a SQLAlchemy URL such as postgresql://user@host/db "
        "(password: PGPASSWORD or ~/.pgpass) or a SQLite file; default: predictions.db beside "
        "mlflow.db",
    )
    if logging:
        p.add_argument("--no-log", action="store_true", help="do not log the answers")


def _monitor(args) -> int:
    from digits.monitor.command import main as monitor

    return monitor(args)


def _feedback_review(args) -> int:
    from digits.monitor.feedback import review_main

    return review_main(args)


def _feedback_export(args) -> int:
    from digits.monitor.feedback import export_main

    return export_main(args)


def _predict(args) -> int:
    from digits.serve.predict import main as predict

    return predict(args)


def _app(args) -> int:
    from digits.serve.app import main as app

    return app(args)


def _server(args) -> int:
    from digits.team.server import main as server

    return server(args)


def _sweep(args) -> int:
    from digits.sweep.study import main as sweep

    return sweep(args)


def _promote(args) -> int:
    from digits.gate.promote import main as promote

    return promote(args)


def main(argv: list[str] | None = None) -> int:
    numerics.pin()  # before any command imports torch
    settings.client_defaults()  # before any MLflow call
    args = build_parser().parse_args(argv)
    if args.command in STAGES:
        return run_stage(args.command, getattr(args, "params", "params.yaml"))
    try:
        return args.handler(args)
    except DigitsError as e:
        print(f"digits {args.command}: error: {e}", file=sys.stderr)
        return 1


def entry() -> NoReturn:
    """The `digits` command: `main`, then the process ends at once, its exit handlers run
    and its output flushed (digits.stages.runner.exit_now)."""
    exit_now(main())


if __name__ == "__main__":
    entry()
