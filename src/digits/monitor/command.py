"""`digits monitor`: a window of the prediction log against the version's reference.

    digits monitor                         # the served champion, the last `monitor.window`
    digits monitor --version 7 --since 2026-12-01T00:00:00Z --json
    digits monitor --log-db postgresql://digits@db-host/predictions --report monitor.html

Prints a short verdict (or, with --json, the summary), writes the HTML report, logs both to
MLflow as a run of the `<mlflow.experiment>-monitor` experiment tagged with the registered model
and version (and tags the version with its last monitoring run), and exits 1 on an alert, 0
otherwise: cron or CI can run it."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from digits.core.errors import DigitsError, first_line
from digits.monitor import drift, reference, window
from digits.monitor.logdb import log_url

EXPERIMENT_SUFFIX = "-monitor"
TAG_MONITOR = "digits.monitor"


class MonitorError(DigitsError):
    pass


def champion(store: str, name: str) -> str:
    """The version `models:/<name>@champion` names now."""
    from digits.tracking import resolve

    uri = f"models:/{name}@champion"
    found = resolve.lookup(store, uri)
    if found is not None:
        return found.version
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return str(MlflowClient(store, store).get_model_version_by_alias(name, "champion").version)
    except MlflowException as e:
        raise MonitorError(f"{uri}: no such version in {store} ({first_line(e)})") from None


def fetch_reference(store: str, name: str, version: str) -> dict:
    """The reference evaluate logged with the version (its run's `reference/reference.json`)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store, store)
    try:
        run_id = str(client.get_model_version(name, version).run_id)
        with tempfile.TemporaryDirectory(prefix="digits-monitor-") as tmp:
            path = client.download_artifacts(run_id, f"{reference.ARTIFACT}/reference.json", tmp)
            return reference.load(path)
    except (MlflowException, OSError) as e:
        raise MonitorError(
            f"{name} version {version} has no reference in {store} ({first_line(e)}); "
            "versions registered before the evaluate stage wrote one need --reference FILE"
        ) from None


def summarise(ref: dict, win: window.Window, params, name: str, version: str) -> dict:
    settings = params.monitor
    checks = (
        drift.compare(ref, win.digit, win.confidence, win.pixels, settings) if win.pieces else []
    )
    level = settings.alpha / max(len(checks), 1)
    reasons = []
    if win.pieces < settings.min_pieces:
        checks = [drift.Check(**{**asdict(c), "drifted": False}) for c in checks]
        note = f"{win.pieces} pieces, fewer than monitor.min_pieces = {settings.min_pieces}"
    else:
        note = None
        reasons = [c.reason() for c in checks if c.drifted]
    acc, count = window.accuracy(win)
    if (
        acc is not None
        and count >= settings.min_corrections
        and (acc < settings.min_corrected_accuracy)
    ):
        reasons.append(
            f"accuracy on {count} corrected answers {acc:.3f} < "
            f"monitor.min_corrected_accuracy {settings.min_corrected_accuracy}"
        )
    return {
        "alert": bool(reasons),
        "reasons": reasons,
        "note": note,
        "model": {"name": name, "version": str(version)},
        "window": {
            "start": win.start.isoformat(timespec="seconds"),
            "end": win.end.isoformat(timespec="seconds"),
            "answers": win.answers,
            "pieces": win.pieces,
        },
        "reference": {"pieces": ref["pieces"]},
        "corrections": {"count": count, "accuracy": acc},
        "level": level,
        "checks": [asdict(c) for c in checks],
        "params": settings.model_dump(),
    }


def track(store_uri: str, params, summary: dict, report: Path, seconds: float) -> str:
    """The monitoring run: metrics (pieces, alert, each check's p and effect), tags naming
    the registered model and version, the summary and report as artifacts; the version
    tagged with its latest monitoring run."""
    from mlflow.entities import Metric

    from digits.tracking.store import open_store

    name, version = summary["model"]["name"], summary["model"]["version"]
    store = open_store(params.mlflow.experiment + EXPERIMENT_SUFFIX, store_uri)
    now = int(time.time() * 1000)
    metrics = {
        "alert": float(summary["alert"]),
        "window/answers": summary["window"]["answers"],
        "window/pieces": summary["window"]["pieces"],
        "seconds": seconds,
    }
    for c in summary["checks"]:
        key = f"{c['kind']}/{c['name'].replace(' ', '_')}"
        metrics[f"{key}/p"], metrics[f"{key}/effect"] = c["p"], c["effect"]
    if summary["corrections"]["accuracy"] is not None:
        metrics["corrections/accuracy"] = summary["corrections"]["accuracy"]
    metrics["corrections/count"] = summary["corrections"]["count"]
    tags = {
        TAG_MONITOR: "true",
        "registered_model": name,
        "model_version": version,
        "window.start": summary["window"]["start"],
        "window.end": summary["window"]["end"],
        "alert": str(summary["alert"]).lower(),
        "mlflow.runName": f"monitor {name} v{version} {summary['window']['end']}",
    }
    with store.writing() as client:
        run = client.create_run(store.experiment_id, tags=tags)
        rid = run.info.run_id
        rows = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(rows), 900):
            client.log_batch(rid, metrics=rows[i : i + 900])
        with tempfile.TemporaryDirectory(prefix="digits-monitor-") as tmp:
            js = Path(tmp, "summary.json")
            js.write_text(json.dumps(summary, indent=1) + "\n")
            client.log_artifact(rid, str(js))
            client.log_artifact(rid, str(report))
        client.set_terminated(rid)
        client.set_model_version_tag(name, version, "monitor.last_run", rid)
        client.set_model_version_tag(name, version, "monitor.last_alert", tags["alert"])
    return rid


def main(args) -> int:
    from digits.core.config import load_params
    from digits.monitor import report as pages
    from digits.monitor import review
    from digits.tracking.store import tracking_uri

    started = time.perf_counter()
    params = load_params(getattr(args, "params", "params.yaml"))
    store = tracking_uri()
    name = params.mlflow.registered_model
    version = args.version or champion(store, name)
    ref = (
        reference.load(args.reference) if args.reference else fetch_reference(store, name, version)
    )
    now = window.now() if args.until is None else window.since(args.until, window.now())
    start = window.since(args.since or params.monitor.window, now)
    eng = review.engine(log_url(args.log_db, store))
    try:
        win = window.read(eng, name, version, start, now, review.rejected(eng))
    finally:
        eng.dispose()
    summary = summarise(ref, win, params, name, version)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(pages.render(summary))
    if not args.no_track:
        try:
            summary["mlflow_run"] = track(store, params, summary, out, summary["seconds"])
        except Exception as e:  # the verdict stands; a store that is down is said, not fatal
            print(
                f"digits monitor: warning: not logged to MLflow ({first_line(e)})", file=sys.stderr
            )
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        verdict = "ALERT" if summary["alert"] else "ok"
        print(
            f"digits monitor: {name} v{version}, {win.answers} answers ({win.pieces} pieces) "
            f"since {summary['window']['start']}: {verdict}"
        )
        for r in summary["reasons"]:
            print(f"  {r}")
        if summary["note"]:
            print(f"  note: {summary['note']}")
        print(f"  report: {out}")
    return 1 if summary["alert"] else 0
