"""Where a forced `dvc repro` spends its time: each stage's wall time, the part of it spent
importing modules, and the share that is training; what the live MLflow logging costs per
epoch; and the train stage against the former default's (a baseline commit's train stage,
timed the same way in the same run).

    python benchmarks/pipeline_time.py                      # baseline: bf8a237
    python benchmarks/pipeline_time.py --baseline HEAD~3    # or none: --baseline ""

It copies the working tree (tracked and untracked, not ignored files) into a fresh git repo in
a temp folder, as a new clone would be, fetches MNIST into it from $MNIST_MIRROR / $MNIST_DIR /
../shared/mnist with `dvc repro preprocess` (not timed), then times `dvc repro --force` (every
stage) and a no-op `dvc repro`. Each stage process is measured from inside by a sitecustomize
hook: wall time from interpreter start to exit, and the time spent in `import` statements.

The targets (docs/performance.md): the whole forced run at most 1.5x the train stage's own wall
time; the train stage at most 1.2x the baseline's (the default params and code of that
commit, on its own numerics, in a fresh copy with the same data)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Loaded by every Python process of the run (PYTHONPATH); records only the stage scripts.
PROBE = r"""
import atexit, builtins, json, os, sys, time
_t0 = time.perf_counter()
_script = next((a for a in sys.orig_argv if a.startswith("pipeline/")), None)
if _script:
    _real_import, _spent, _depth = builtins.__import__, [0.0], [0]

    def _timed_import(*args, **kwargs):
        if _depth[0]:
            return _real_import(*args, **kwargs)
        _depth[0] += 1
        start = time.perf_counter()
        try:
            return _real_import(*args, **kwargs)
        finally:
            _spent[0] += time.perf_counter() - start
            _depth[0] -= 1

    builtins.__import__ = _timed_import

    @atexit.register
    def _report():
        row = {"script": _script, "wall": time.perf_counter() - _t0, "imports": _spent[0]}
        with open(os.environ["DIGITS_STAGE_TIMES"], "a") as f:
            f.write(json.dumps(row) + "\n")
"""


def sh(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def mirror() -> str:
    for c in (os.environ.get("MNIST_MIRROR"), os.environ.get("MNIST_DIR")):
        if c:
            return c
    return str(ROOT.parent / "shared" / "mnist")


def copy_worktree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=dest, check=True)
    subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "x"],
        cwd=dest,
        check=True,
    )


def baseline_train(rev: str, data: Path, probe_dir: Path, env: dict) -> float:
    """The train stage of commit `rev` (its code, params and pins), timed as the stages here
    are: from interpreter start to exit, by the same probe."""
    with tempfile.TemporaryDirectory(prefix="pipeline-baseline-") as tmp:
        root = Path(tmp)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
        (root / "data/processed").mkdir(parents=True, exist_ok=True)
        shutil.copy2(data, root / "data/processed/train.npz")
        times = root / "times.jsonl"
        run_env = {
            **env,
            "PYTHONPATH": f"{root / 'src'}{os.pathsep}{probe_dir}",
            "DIGITS_STAGE_TIMES": str(times),
            "MLFLOW_TRACKING_URI": "",
        }
        sh([sys.executable, "pipeline/train.py"], root, run_env)
        return json.loads(times.read_text().splitlines()[-1])["wall"]


def logging_cost(project: Path) -> tuple[float, int]:
    """(seconds the live run's epoch logging took in all, epochs) from the run's metrics."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mnist")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
    epochs = len(client.get_metric_history(run.info.run_id, "val_accuracy"))
    return run.data.metrics.get("training/logging_seconds", float("nan")), epochs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="bf8a237", help="commit whose train stage to compare")
    args = ap.parse_args()
    bin_dir = str(Path(sys.executable).parent)
    with tempfile.TemporaryDirectory(prefix="pipeline-time-") as tmp:
        project, probe_dir = Path(tmp) / "project", Path(tmp) / "probe"
        project.mkdir()
        probe_dir.mkdir()
        (probe_dir / "sitecustomize.py").write_text(PROBE)
        copy_worktree(project)
        times = Path(tmp) / "times.jsonl"
        env = {
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "MNIST_MIRROR": mirror(),
            "MLFLOW_TRACKING_URI": "",
            "DVC_NO_ANALYTICS": "1",
        }
        dvc = [sys.executable, "-m", "dvc"]
        print("setting up: fresh copy, MNIST fetched and preprocessed (not timed) ...", flush=True)
        sh([*dvc, "repro", "preprocess"], project, env)
        timed = {**env, "PYTHONPATH": str(probe_dir), "DIGITS_STAGE_TIMES": str(times)}
        total = sh([*dvc, "repro", "--force"], project, timed)
        noop = sh([*dvc, "repro"], project, env)
        rows = [json.loads(line) for line in times.read_text().splitlines()]
        logged, epochs = logging_cost(project)
        base = None
        if args.baseline:
            print(f"timing the train stage of {args.baseline} (same data, same probe) ...")
            base = baseline_train(
                args.baseline, project / "data/processed/train.npz", probe_dir, env
            )

    by_stage = {Path(r["script"]).stem: r for r in rows}
    train = by_stage["train"]["wall"]
    print(f"\nforced `dvc repro` of the default pipeline: {total:.1f} s\n")
    print("| stage | wall s | imports s | share of the run |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in by_stage.items():
        print(f"| {name} | {r['wall']:.1f} | {r['imports']:.1f} | {r['wall'] / total:.0%} |")
    other = total - sum(r["wall"] for r in rows)
    print(f"| DVC itself (hashing, lock, start-up) | {other:.1f} | | {other / total:.0%} |")
    print(
        f"\ntraining is {train / total:.0%} of the run; run / train stage = "
        f"{total / train:.2f}x (target <= 1.5x); no-op `dvc repro`: {noop:.2f} s"
    )
    print(
        f"live MLflow logging: {logged:.2f} s for {epochs} epochs "
        f"({1000 * logged / max(epochs, 1):.1f} ms per epoch)"
    )
    if base is not None:
        print(
            f"train stage {train:.1f} s vs {args.baseline}'s {base:.1f} s: "
            f"{train / base:.2f}x (target <= 1.2x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
