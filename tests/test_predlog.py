"""The prediction log (digits.serve.predlog): the writer on a real SQLite file (fast), then a
real `digits app` with two workers writing it: after a clean stop it holds every answered
request, a SIGKILL loses at most what was not yet written, and on a real PostgreSQL two services
write one log, and stopping the database mid-load fails no answer (the drops are counted)."""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest

from digits.monitor import logdb
from digits.serve import predlog

MODEL = {"name": "mnist-mlp", "version": "3", "uri": "models:/mnist-mlp@champion"}


def entry(i: int, at: dt.datetime | None = None, pieces: int = 1) -> predlog.Entry:
    said = {"box": [0, 0, 10, 10], "digit": i % 10, "guess": i % 10, "confidence": 0.9,
            "probabilities": [0.01] * 10}  # fmt: skip
    record = {"digit": i % 10, "guess": i % 10, "confidence": 0.9, "number": str(i % 10),
              "reading": str(i % 10), "digits": [said] * pieces}  # fmt: skip
    seen = bytes([i % 256]) * 784 * pieces
    return predlog.Entry(predlog.new_id(), at or predlog.now(), "app", MODEL, record, seen)


def rows(db: Path, sql: str = "SELECT id FROM predictions") -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_the_writer_writes_in_batches_and_everything_queued_at_close(tmp_path):
    db = tmp_path / "log.db"
    log = predlog.PredictionLog(f"sqlite:///{db}", batch=7).start()
    sent = [entry(i, pieces=1 + i % 3) for i in range(50)]
    for e in sent:
        log.add(e)
    log.close()
    assert (log.written, log.dropped) == (50, 0)
    got = rows(db, "SELECT id, model_name, model_version, model_uri, digit, pieces, inputs, "
                   "answer FROM predictions")  # fmt: skip
    assert sorted(r[0] for r in got) == sorted(e.id for e in sent)
    by_id = {e.id: e for e in sent}
    for pid, name, version, uri, digit, pieces, seen, answer in got:
        e = by_id[pid]
        assert (name, version, uri) == ("mnist-mlp", "3", "models:/mnist-mlp@champion")
        assert pieces == len(e.record["digits"]) and seen == e.inputs
        assert digit == (e.record["digit"] if pieces == 1 else None)
        assert '"probabilities"' in answer


def test_a_database_that_cannot_be_written_drops_and_counts_and_recovers(tmp_path):
    """The folder of the SQLite file is missing: every batch fails, `add` never raises; once
    the folder is there the next batches are written."""
    folder = tmp_path / "not yet"
    said = []
    log = predlog.PredictionLog(f"sqlite:///{folder / 'log.db'}", interval=0.01,
                                say=said.append).start()  # fmt: skip
    for i in range(20):
        log.add(entry(i))
    log.close()
    assert (log.written, log.dropped) == (0, 20)
    assert log.last_error and "unable to open database" in log.last_error
    assert len(said) == 1 and "answer(s) not written" in said[0]  # one line, not one a batch
    folder.mkdir()
    log = predlog.PredictionLog(f"sqlite:///{folder / 'log.db'}").start()
    log.add(entry(1))
    log.close()
    assert (log.written, log.dropped) == (1, 0)


def test_a_full_queue_drops_and_counts_instead_of_waiting(tmp_path):
    counted = []
    log = predlog.PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", capacity=3,
                                on_write=lambda w, d: counted.append((w, d)))  # fmt: skip
    for i in range(5):  # the writer is not started: nothing leaves the queue
        log.add(entry(i))
    assert (log.dropped, log.pending, counted) == (2, 3, [(0, 1), (0, 1)])


def test_retention_deletes_old_answers_and_their_corrections(tmp_path):
    db = tmp_path / "log.db"
    eng = predlog.engine(f"sqlite:///{db}")
    predlog.create(eng)
    old = [entry(i, predlog.now() - dt.timedelta(days=40)) for i in range(3)]
    new = [entry(i) for i in range(2)]
    predlog.write(eng, old + new)
    predlog.add_feedback(eng, old[0].id, "7", 0, "127.0.0.1", "test")
    predlog.add_feedback(eng, new[0].id, "not a digit", 0, "127.0.0.1", "test")
    assert predlog.prune(eng, 30) == 3
    assert sorted(r[0] for r in rows(db)) == sorted(e.id for e in new)
    assert rows(db, "SELECT prediction_id, label FROM feedback") == [(new[0].id, "not a digit")]
    assert predlog.find(eng, new[1].id) == 1 and predlog.find(eng, old[1].id) is None
    eng.dispose()


def test_the_writer_prunes_what_is_past_retention(tmp_path):
    db = tmp_path / "log.db"
    eng = predlog.engine(f"sqlite:///{db}")
    predlog.create(eng)
    predlog.write(eng, [entry(i, predlog.now() - dt.timedelta(days=8)) for i in range(3)])
    eng.dispose()
    log = predlog.PredictionLog(f"sqlite:///{db}", retention_days=7).start()
    fresh = entry(9)
    log.add(fresh)
    log.close()
    assert rows(db) == [(fresh.id,)]


def test_urls_and_a_bad_one(tmp_path):
    assert logdb.normalise("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert logdb.normalise(str(tmp_path / "x.db")) == f"sqlite:///{tmp_path / 'x.db'}"
    assert logdb.default_url(f"sqlite:///{tmp_path / 'mlflow.db'}") == (
        f"sqlite:///{tmp_path / 'predictions.db'}"
    )
    with pytest.MonkeyPatch.context() as env:  # a tracking server's user: never the cwd
        env.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
        env.delenv("DIGITS_PREDICTION_LOG", raising=False)
        assert logdb.default_url("http://127.0.0.1:5000") == (
            f"sqlite:///{tmp_path / 'data' / 'digits' / 'predictions.db'}"
        )
        env.setenv("DIGITS_PREDICTION_LOG", "postgresql://team@db/predictions")
        assert logdb.default_url("http://127.0.0.1:5000") == (
            "postgresql+psycopg://team@db/predictions"
        )
    with pytest.raises(predlog.LogError, match=r"^--log-db nosuch://u:\*\*\*@h/db: not a database"):
        predlog.engine("nosuch://u:secret@h/db")


def test_pixels_are_what_the_model_saw_as_bytes():
    images = [np.linspace(0, 1, 784, dtype=np.float32), np.zeros(784, np.float32)]
    seen = np.frombuffer(predlog.pixels(images), np.uint8).reshape(2, 784)
    np.testing.assert_array_equal(seen[0], np.round(images[0] * 255).astype(np.uint8))
    assert not seen[1].any() and predlog.pixels([]) == b""


# --- a real service ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pictures():
    from service import photos

    return photos(16)[0]


def app_on(champion, tmp_path, log_db: str, workers: int = 2, env: dict | None = None):
    from service import App

    args = ["--model", champion["model_uri"], "--log-db", log_db]
    return App(args, {**champion["env"], **(env or {})}, tmp_path, workers)


def answered_ids(load) -> list[str]:
    assert [s for _, s, _ in load.answers] == [200] * len(load.answers)
    return [body["prediction_id"] for _, _, body in load.answers]


@pytest.mark.slow
def test_after_a_clean_stop_the_log_holds_every_answer(champion, pictures, tmp_path):
    from service import Load

    db = tmp_path / "log.db"
    app = app_on(champion, tmp_path, str(db)).start()
    try:
        with Load(app.url, pictures, clients=8, limit=400) as load:
            for t in load.threads:
                t.join()
    finally:
        assert app.stop() == 0
    ids = answered_ids(load)
    assert len(ids) >= 400
    logged = rows(db, "SELECT id, model_version, source, length(inputs) FROM predictions")
    assert sorted(r[0] for r in logged) == sorted(ids)  # the count and the ids
    assert {r[1:] for r in logged} == {(champion["version"], "app", 784)}


@pytest.mark.slow
def test_a_sigkill_loses_at_most_what_was_not_yet_written(champion, pictures, tmp_path):
    from service import Load, wait_for

    db = tmp_path / "log.db"
    app = app_on(champion, tmp_path, str(db)).start()
    try:
        with Load(app.url, pictures, clients=4, limit=100) as first:
            for t in first.threads:
                t.join()
        done = answered_ids(first)
        written = lambda: sum(w["log"]["written"] for w in app.workers_seen())  # noqa: E731
        wait_for("the first answers written", lambda: written() == len(done), log=app.text)
        with Load(app.url, pictures, clients=4, limit=40) as last:
            for t in last.threads:
                t.join()
        pid = app.health()["worker"]
        (folder,) = (p.parent.parent for p in Path(tempfile.gettempdir()).glob(
            f"digits-app-*/workers/{pid}.json"))  # fmt: skip
    finally:
        app.kill()  # the parent and both workers, at once
    shutil.rmtree(folder)  # what a killed service cannot delete itself
    late = answered_ids(last)
    logged = {r[0] for r in rows(db)}
    assert set(done) <= logged  # what was written stays written
    assert logged <= set(done) | set(late)  # and nothing else
    print(f"SIGKILL: {len(set(late) - logged)} of the last {len(late)} answers not yet written")
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow
def test_postgresql_one_log_for_two_services_and_a_database_stopped_mid_load(
    champion, pictures, tmp_path
):
    from pg import local_postgres, query
    from service import Load, request, wait_for

    pg = local_postgres().start()
    try:
        url = pg.create_database("predictions").replace("postgresql+psycopg://", "postgresql://")
        one = app_on(champion, tmp_path, url, 1, pg.env).start()
        two = app_on(champion, tmp_path, url, 1, pg.env).start()
        try:
            with Load(one.url, pictures, 4, 100) as a, Load(two.url, pictures, 4, 100) as b:
                for t in a.threads + b.threads:
                    t.join()
            ids = answered_ids(a) + answered_ids(b)
            assert "secret" not in one.text() and pg.password not in one.text()

            def logged() -> list:
                return [r[0] for r in query(pg, "predictions", "SELECT id FROM predictions")]

            wait_for("both services' answers in the log", lambda: len(logged()) == len(ids))
            assert sorted(logged()) == sorted(ids)

            # the database stops while clients send: every answer still a 200, the answers
            # that could not be written counted in /health and /metrics
            with Load(one.url, pictures, 4) as load:
                wait_for("answers under load", lambda: load.count() >= 20)
                pg._run("pg_ctl", "-D", str(pg.root / "data"), "-m", "immediate", "-w", "stop")
                seen = load.count()
                wait_for("answers with the database down", lambda: load.count() >= seen + 100)
            assert [s for _, s, _ in load.answers] == [200] * len(load.answers)
            log = lambda: one.health()["workers"][0]["log"]  # noqa: E731
            # everything answered is either written or counted as dropped
            total = len(load.answers) + len(answered_ids(a))
            settled = lambda: log()["written"] + log()["dropped"] == total  # noqa: E731
            wait_for("every answer written or dropped", settled, log=one.text)
            assert log()["dropped"] >= 100 and log()["last_error"]
            health = one.health()
            assert health["status"] == "degraded" and "prediction log" in health["problems"][0]
            from prometheus_client.parser import text_string_to_metric_families

            families = {
                f.name: f for f in text_string_to_metric_families(request(one.url + "metrics")[1])
            }
            assert families["digits_log_dropped"].samples[0].value == log()["dropped"]
            assert "not written" in one.text()
        finally:
            one.stop()
            two.stop()
    finally:
        pg.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--log-db", "nosuch://u:pw@h/db"], "--log-db nosuch://u:***@h/db: not a database URL"),
        (["--follow-interval", "-1"], "--follow-interval -1.0: expected seconds >= 0"),
        (["--log-retention-days", "0"], "--log-retention-days 0.0: expected > 0"),
    ],
    ids=["url", "interval", "retention"],
)
def test_bad_options_are_one_line(champion, tmp_path, args, says):
    from helpers import run
    from service import DIGITS

    proc = run([DIGITS, "app", "--port", "0", *args], tmp_path, env=champion["env"], check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"digits app: error: {says}"), line
    assert "pw" not in line


@pytest.mark.slow
def test_a_log_database_down_at_start_warns_and_the_service_serves(champion, pictures, tmp_path):
    """Nothing listens where --log-db points: `digits app` says so, starts, answers every
    request, and counts what it could not write."""
    import socket

    from service import request, wait_for

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://digits@127.0.0.1:{port}/predictions"
    with app_on(champion, tmp_path, url, 1) as app:
        assert (
            f"digits app: warning: prediction log postgresql+psycopg://digits@127.0.0.1:{port}"
            in app.text()
        )
        for body in pictures[:5]:
            assert request(app.url + "predict", body, "image/png")[0] == 200
        log = lambda: app.health()["workers"][0]["log"]  # noqa: E731
        wait_for("the answers counted as not written", lambda: log()["dropped"] == 5, log=app.text)
        assert log()["written"] == 0 and app.health()["status"] == "degraded"
