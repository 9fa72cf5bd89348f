"""`digits sweep`: a hyperparameter search that many workers run together, on many machines.

One Optuna study (TPE, seeded) in a database all workers reach: by default a SQLite file beside
`mlflow.db` (one machine), or the team's PostgreSQL (`--storage postgresql://...`: every worker
on every machine runs the same command and they share the study). Optuna hands each worker its
own trials, and its heartbeat fails the trial of a worker that died, so the others go on.

Each trial is a DVC experiment of the train stage alone (`dvc exp run --temp -n STUDY-N -S
...`, in a temporary copy of the repository, so trials run side by side with `--jobs`): `dvc
exp show` lists it and `dvc exp apply` gives its model's bytes again. Its objective is the
validation accuracy of its last epoch, never a test figure. Its MLflow run (the train stage's
live run) is a child of the study's parent run, tagged with the study, the trial's number and
the worker. Trials register no model version and touch no alias: the best one reaches
`@champion` only by being applied, committed and gated on main (`--best` prints how).

The search space is `sweep.yaml` (`--space`, digits.sweep.space), checked before any trial."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

from digits.core.config import Params, load_params
from digits.core.errors import first_line, redact
from digits.core.files import repo_root
from digits.core.settings import DIGITS_SWEEP_GRACE, DIGITS_SWEEP_HEARTBEAT
from digits.sweep.space import SPACE_FILE, Dimension, SweepError, load_space
from digits.tracking.runs import SWEEP_ENV

CREATE_TRIES = 5  # opening a study on a database other workers are setting up at the same time


def storage_url(storage: str | None) -> str:
    """Optuna's database: the given URL (postgresql:// means psycopg 3, which this project
    installs), else a SQLite file beside mlflow.db."""
    if not storage:
        return f"sqlite:///{repo_root() / 'optuna.db'}"
    if storage.startswith("postgresql://"):
        return "postgresql+psycopg://" + storage.removeprefix("postgresql://")
    return storage


def open_study(name: str, storage: str | None, seed: int):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats are "experimental" in Optuna 5 (and have been since 2.9): said once, here
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    url = storage_url(storage)
    # seconds between a running trial's heartbeats, and after which a silent one is failed
    # (its worker died): DIGITS_SWEEP_HEARTBEAT, DIGITS_SWEEP_GRACE (the tests wait less)
    heartbeat, grace = DIGITS_SWEEP_HEARTBEAT.get(), DIGITS_SWEEP_GRACE.get()
    for attempt in range(CREATE_TRIES):
        try:
            rdb = optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace)
            return optuna.create_study(
                study_name=name,
                storage=rdb,
                sampler=optuna.samplers.TPESampler(seed=seed),
                direction="maximize",
                load_if_exists=True,
            )
        except (IntegrityError, ProgrammingError) as e:
            # workers that start together on an empty database each create Optuna's tables:
            # all but one lose that race (a duplicate type or table) and find them made
            if attempt + 1 == CREATE_TRIES:
                raise SweepError(f"study storage {redact(url)}: {first_line(e)}") from None
            time.sleep(1 + attempt)
        except Exception as e:  # SQLAlchemy's many errors for a database it cannot reach
            raise SweepError(f"study storage {redact(url)}: {first_line(e)}") from None
    raise AssertionError("unreachable")


def parent_run(study, params: Params) -> str:
    """The study's MLflow parent run. Workers that start together may each make one: every
    worker then takes the oldest (the same one for all) and deletes its own if it lost."""
    from digits.tracking.store import open_store

    store = open_store(params.mlflow.experiment)
    tag = (
        f"tags.`digits.sweep.study` = '{study.study_name}' and tags.`digits.sweep.parent` = 'true'"
    )

    def candidates(client) -> list:
        runs = client.search_runs([store.experiment_id], filter_string=tag)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    with store.writing() as client:
        existing = candidates(client)
        if existing:
            return existing[0].info.run_id
        mine = client.create_run(
            store.experiment_id,
            run_name=f"sweep {study.study_name}",
            tags={
                "digits.sweep.study": study.study_name,
                "digits.sweep.parent": "true",
                "mlflow.source.name": "digits sweep",
            },
        ).info.run_id
    with store.writing() as client:
        winner = candidates(client)[0].info.run_id
        if winner != mine:
            client.delete_run(mine)
    return winner


def _child_run(client, experiment_id: str, study: str, number: int):
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`digits.sweep.study` = '{study}' and tags.`digits.sweep.trial` = '{number}'"
        ),
    )
    return runs[0] if runs else None


def run_trial(trial, space: list[Dimension], params: Params, parent: str, root: Path) -> float:
    """One trial: its params drawn, the train stage run as a DVC experiment in a temporary
    copy, its validation accuracy read from its MLflow run."""
    from digits.tracking.store import open_store

    values = {d.key: d.suggest(trial) for d in space}
    name = f"{trial.study.study_name}-{trial.number}"
    worker = f"{socket.gethostname()}:{os.getpid()}"
    env = {
        **os.environ,
        SWEEP_ENV: json.dumps(
            {
                "parent": parent,
                "study": trial.study.study_name,
                "trial": trial.number,
                "worker": worker,
            }
        ),
    }
    sets = [a for k, v in values.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    # --temp: in a copy of the repository, so that --jobs trials run side by side; they take
    # the repository's lock in turn to record their experiments
    exp_run = ["exp", "run", "--temp", "-n", name, *sets, "train"]
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", *exp_run]
    trial.set_user_attr("dvc_experiment", name)
    trial.set_user_attr("worker", worker)
    print(f"sweep: trial {trial.number}: {name}: {values}", flush=True)
    proc = subprocess.Popen(cmd, cwd=root, env=env)  # in the worker's process group
    try:
        code = proc.wait()
    except BaseException:  # Ctrl+C (the trial got it too), SIGTERM: stop the trial, give up
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    if code != 0:
        raise SweepError(f"trial {trial.number}: `dvc exp run` exited {code}")
    store = open_store(params.mlflow.experiment)
    with store.reading() as client:
        run = _child_run(client, store.experiment_id, trial.study.study_name, trial.number)
        if run is None:
            raise SweepError(f"trial {trial.number}: no MLflow run of it in {store.uri}")
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
    if not history:
        raise SweepError(f"trial {trial.number}: its run {run.info.run_id} has no val_accuracy")
    trial.set_user_attr("mlflow_run", run.info.run_id)
    value = max(history, key=lambda m: m.step).value
    print(f"sweep: trial {trial.number}: val accuracy {value:.4f}", flush=True)
    return value


def check_pipeline_ran(root: Path) -> None:
    """A trial is a commit of the train stage over the repository's lock: `dvc exp apply` then
    checks out every stage's outputs, which it can only do for stages the lock has (and whose
    files are in the cache). So the pipeline runs, and its lock is committed, before a sweep."""
    try:
        stages = set(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
        locked = set((yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {}))
    except FileNotFoundError:
        locked = set()
    missing = sorted(stages - locked) if locked else ["any stage"]
    if locked and not missing:
        return
    raise SweepError(
        f"dvc.lock has no entry for {', '.join(missing)}: run the pipeline (`dvc repro`) and "
        "commit dvc.lock before a sweep (its trials build on them)"
    )


def run_sweep(args) -> int:
    root = repo_root()
    params = load_params(getattr(args, "params", "params.yaml"))
    space = load_space(root / (args.space or SPACE_FILE), params)
    check_pipeline_ran(root)
    study = open_study(args.study, args.storage, args.seed)
    parent = parent_run(study, params)
    if held(study) >= args.trials:
        print(f"sweep: study {args.study} already holds {args.trials} trials", flush=True)
        return print_summary(study)
    print(
        f"sweep: study {args.study} ({redact(storage_url(args.storage))}); MLflow parent run "
        f"{parent}; {args.trials} trials in all, {args.jobs} at a time here",
        flush=True,
    )
    try:
        study.optimize(
            lambda t: run_trial(t, space, params, parent, root),
            n_jobs=args.jobs,
            callbacks=[lambda study, _: held(study) >= args.trials and study.stop()],
            catch=(SweepError,),
        )
    except KeyboardInterrupt:
        print("sweep: stopped; this worker's running trials are failed", file=sys.stderr)
        return 130
    _finish_parent(params, parent)
    return print_summary(study)


def held(study) -> int:
    """Trials the study holds: finished (failed ones too: a dead worker's) and running, on
    any worker. Stopping on this count, not on the finished ones alone (Optuna's
    MaxTrialsCallback), keeps `--jobs` from starting trials past --trials."""
    import optuna

    s = optuna.trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(s.COMPLETE, s.FAIL, s.RUNNING)))


def _finish_parent(params: Params, parent: str) -> None:
    """The parent run ends when a worker has nothing left to do (again for each worker)."""
    from digits.tracking.store import open_store

    store = open_store(params.mlflow.experiment)
    with store.writing() as client:
        client.set_terminated(parent, "FINISHED")


def print_summary(study) -> int:
    import optuna

    trials = study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    said = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(f"sweep: study {study.study_name}: {len(trials)} trials ({said})")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        print(f"sweep: best so far: trial {best.number}, val accuracy {best.value:.4f}")
    return 0


def best(args) -> int:
    """`digits sweep --study NAME --best`: the best trial and how to carry it to @champion."""
    import optuna

    study = open_study(args.study, args.storage, args.seed)
    complete = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise SweepError(f"study {args.study}: no finished trial yet")
    t = study.best_trial
    exp = t.user_attrs.get("dvc_experiment", f"{args.study}-{t.number}")
    print(f"study {args.study}: best of {len(complete)} finished trials: trial {t.number}")
    print(f"  validation accuracy {t.value:.4f}")
    for key, value in t.params.items():
        print(f"  {key} = {value}")
    print(f"  DVC experiment {exp} (worker {t.user_attrs.get('worker', '?')}); MLflow run "
          f"{t.user_attrs.get('mlflow_run', '?')}")  # fmt: skip
    print("To make it the champion, through the gate, on the promotion branch:")
    print(f"  dvc exp pull origin {exp}    # if another machine's worker ran it")
    print(f"  dvc exp apply {exp}")
    print(f'  git commit -am "train: {exp} (digits sweep {args.study})"')
    print("  dvc repro                     # evaluate, then the gate moves @champion if it passes")
    return 0


def main(args) -> int:
    if args.trials is not None and args.trials < 1:
        raise SweepError(f"--trials: expected a positive number, got {args.trials}")
    if args.jobs < 1:
        raise SweepError(f"--jobs: expected a positive number, got {args.jobs}")
    if args.best:
        return best(args)
    if args.trials is None:
        raise SweepError("--trials: how many trials the study should hold (or --best)")
    return run_sweep(args)
