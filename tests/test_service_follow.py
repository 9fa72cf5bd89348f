"""`digits app` follows its alias: a real service with two workers over a real SQLite store, a
real `digits promote` moving @champion while clients send requests. Every request gets a 200,
every answer names the version that gave it, and the answers switch to the new version in every
worker; `digits promote --rollback` puts the old one back the same way; a version that cannot be
loaded leaves the old one serving and says so; a service started on a version stays on it."""

from __future__ import annotations

import time

import pytest

from service import NAME, App, Load, Registry, photos, request, wait_for

pytestmark = pytest.mark.slow  # a real service, a trained model, real promotions

INTERVAL = 1.0  # --follow-interval of these tests, in seconds


@pytest.fixture(scope="module")
def pictures():
    return photos(12)


class AliasWatch:
    """A thread that notes when @champion starts naming `version` (asked of the store as the
    workers ask it, every 10 ms): `seen`, a time.monotonic()."""

    def __init__(self, store: str, version: str):
        import threading

        self.store, self.version = store, version
        self.seen = float("nan")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from digits.tracking import resolve

        while not self.done.wait(0.01):
            found = resolve.lookup(self.store, f"models:/{NAME}@champion")
            if found is not None and found.version == self.version:
                self.seen = time.monotonic()
                return

    def __enter__(self) -> AliasWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(timeout=30)  # the command has returned: the alias has moved
        self.done.set()
        assert self.seen == self.seen, "the alias never moved"  # not NaN


def answered_versions(load: Load) -> list[str]:
    return [body["model"]["version"] for _, status, body in load.answers]


def test_a_promotion_reaches_every_worker_under_load_and_a_rollback_undoes_it(
    champion, pictures, tmp_path
):
    reg = Registry(tmp_path / "store", champion["weights"], versions=2)
    v1, v2 = reg.versions
    app = App(["--follow-interval", str(INTERVAL)], reg.env, reg.root)
    with app:
        assert app.versions() == {v1}
        health = app.health()
        assert health["model"] == f"models:/{NAME}@champion" and health["status"] == "ok"
        assert all(w["following"] for w in health["workers"])
        with Load(app.url, pictures[0]) as load:
            wait_for("answers before the promotion", lambda: load.count() >= 20)
            with AliasWatch(reg.uri, v2) as watch:  # when the alias moves, to 10 ms
                out = reg.promote(v2, "--reason", "a better model")
            moved = watch.seen
            assert out.startswith(f"{NAME} version {v2} is now @champion (version {v1} is now")
            wait_for("every worker on the new version", lambda: app.versions() == {v2})
            seen = load.count()
            wait_for("answers after the switch", lambda: load.count() >= seen + 20)
        statuses = [status for _, status, _ in load.answers]
        assert statuses == [200] * len(statuses), "a request failed during the switch"
        versions = answered_versions(load)
        assert versions[0] == v1 and versions[-20:] == [v2] * 20
        # from the old version to the new: no answer of the old after the first of the new
        # per client would be too strict (two workers switch apart); within the set time is
        last_old = max(sent for sent, _, body in load.answers if body["model"]["version"] == v1)
        print(
            f"last request answered by version {v1} sent {last_old - moved:+.2f} s after the move"
        )
        # within the set time: the poll, plus loading the version on a busy machine
        assert last_old - moved < INTERVAL + 5
        assert all(
            body["model"]["uri"] == f"models:/{NAME}@champion" for _, _, body in load.answers
        )
        assert len({body["prediction_id"] for _, _, body in load.answers}) == len(load.answers)
        assert app.text().count(f"now serving version {v2} (was {v1})") == 2  # both workers

        with Load(app.url, pictures[0]) as load:
            wait_for("answers before the rollback", lambda: load.count() >= 10)
            out = reg.promote("--rollback", "--reason", "v2 misreads sevens")
            assert out.startswith(
                f"{NAME}: @champion rolled back from version {v2} to version {v1} "
                f"(version {v2} is now @previous)"
            ), out
            wait_for("every worker back on the old version", lambda: app.versions() == {v1})
            seen = load.count()
            wait_for("answers after the rollback", lambda: load.count() >= seen + 10)
        assert [s for _, s, _ in load.answers] == [200] * len(load.answers)
        assert answered_versions(load)[-10:] == [v1] * 10
        health = app.health()
        assert {w["reloads"] for w in health["workers"]} == {2} and health["status"] == "ok"


def test_rollback_walks_back_the_chain_and_stops_at_the_first(champion, tmp_path):
    """v1 -> v2 -> v3; rollback: v2; rollback: v1 (not v3 again); rollback: nothing before."""
    from digits.tracking import registry

    reg = Registry(tmp_path / "store", champion["weights"], versions=3)
    v1, v2, v3 = reg.versions
    reg.promote(v2, "--reason", "second")
    reg.promote(v3, "--reason", "third")
    assert reg.promote("--rollback", "--reason", "v3 is bad").startswith(
        f"{NAME}: @champion rolled back from version {v3} to version {v2}"
    )
    assert reg.promote("--rollback", "--reason", "v2 too").startswith(
        f"{NAME}: @champion rolled back from version {v2} to version {v1}"
    )
    assert reg.champion() == v1
    tags = reg.client.get_model_version(NAME, v2).tags
    assert tags["rollback_reason"] == "v2 too" and tags["rolled_back_at"].endswith("+00:00")
    assert reg.client.get_model_version(NAME, v1).tags["promoted_via"] == (
        "digits promote --rollback"
    )
    from helpers import run
    from service import DIGITS

    proc = run([DIGITS, "promote", "--rollback", "--reason", "again"], reg.root, env=reg.env,
               check=False)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"digits promote: error: {NAME} version {v1} was the first @champion: there is no "
        "champion before it to roll back to"
    )
    # governed as a promotion: a reason, and VERSION or --rollback
    for args, says in (
        (["--rollback", "--reason", " "], "--reason: expected a few words"),
        (["2", "--rollback", "--reason", "x"], "expected a VERSION to promote, or --rollback"),
        (["--reason", "x"], "expected a VERSION to promote, or --rollback"),
    ):
        proc = run([DIGITS, "promote", *args], reg.root, env=reg.env, check=False)
        assert proc.returncode == 1 and says in proc.stderr, proc.stderr
    # a version the gate has since rejected is not put back
    reg.promote(v3, "--reason", "third again")
    reg.client.set_model_version_tag(NAME, v1, registry.STATUS, registry.REJECTED)
    reg.client.set_model_version_tag(NAME, v3, registry.PROMOTED_OVER, v1)
    proc = run([DIGITS, "promote", "--rollback", "--reason", "x"], reg.root, env=reg.env,
               check=False)  # fmt: skip
    assert proc.returncode == 1 and f"version {v1} is rejected" in proc.stderr
    assert reg.champion() == v3


def test_an_unloadable_version_leaves_the_old_one_serving(champion, pictures, tmp_path):
    reg = Registry(tmp_path / "store", champion["weights"], versions=1)
    (v1,) = reg.versions
    bad_hash = reg.add(champion["weights"], "changed")
    weights = reg.weights_of(bad_hash)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # changed after registration
    missing = reg.add(champion["weights"], "missing")
    reg.weights_of(missing).unlink()
    deleted = reg.add(champion["weights"], "deleted")
    body = pictures[0][0]
    with App(["--follow-interval", str(INTERVAL)], reg.env, reg.root) as app:
        for version, says in ((bad_hash, "sha256"), (missing, "cannot be loaded")):
            reg.promote(version, "--reason", f"try {version}")

            def stuck(version=version, says=says) -> bool:
                h = app.health()
                problems = [w["problem"] or "" for w in h["workers"]]
                return h["status"] == "degraded" and all(
                    f"moved to version {version}, which cannot be loaded" in p and says in p
                    for p in problems
                )

            wait_for(f"both workers refusing version {version}", stuck, log=app.text)
            assert app.versions() == {v1}
            for _ in range(6):  # both workers still answer, with the old version
                status, answer = request(app.url + "predict", body, "image/png")
                assert status == 200 and answer["model"]["version"] == v1
            assert f"moved to version {version}, which cannot be loaded" in app.text()

        # a champion deleted while it serves: its alias goes with it, and the workers keep it
        reg.promote(deleted, "--reason", "then deleted")
        wait_for(f"both workers on {deleted}", lambda: app.versions() == {deleted}, log=app.text)
        reg.client.delete_model_version(NAME, deleted)
        wait_for(
            "the workers saying the alias names nothing",
            lambda: all("names no version" in (w["problem"] or "") for w in app.workers_seen()),
            log=app.text,
        )
        status, answer = request(app.url + "predict", body, "image/png")
        assert status == 200 and answer["model"]["version"] == deleted
        # and once the alias names a version that loads, the workers take it and are well
        reg.promote(v1, "--reason", "back to the good one")
        wait_for("the problem gone", lambda: app.health()["status"] == "ok", log=app.text)
        assert app.versions() == {v1}
        from prometheus_client.parser import text_string_to_metric_families

        families = text_string_to_metric_families(request(app.url + "metrics")[1])
        failed = {f.name: f for f in families}["digits_model_reload_failures"]
        # 2 versions x 2 workers at least (a busy machine may see a retry after RETRY seconds)
        assert failed.samples[0].value >= 4


def test_a_version_uri_stays_pinned(champion, pictures, tmp_path):
    reg = Registry(tmp_path / "store", champion["weights"], versions=2)
    v1, v2 = reg.versions
    pinned = f"models:/{NAME}/{v1}"
    with App(["--model", pinned, "--follow-interval", "0.2"], reg.env, reg.root, 1) as app:
        assert "pinned to version" in app.text()
        reg.promote(v2, "--reason", "moves the alias, not a pinned service")
        moved = time.monotonic()
        # the service polls nothing: answers for ten of the intervals a follower would poll at
        while time.monotonic() < moved + 10 * 0.2:
            status, answer = request(app.url + "predict", pictures[0][0], "image/png")
            assert status == 200
            assert answer["model"] == {"name": NAME, "version": v1, "uri": pinned}
        health = app.health()
        assert health["version"] == v1 and not health["workers"][0]["following"]


def test_a_service_follows_the_alias_on_a_team_tracking_server(champion, pictures, tmp_path):
    """The same with the team's MLflow server (PostgreSQL, proxied artifacts): the workers ask
    its REST API, and download the new version's weights through MLflow."""
    import socket

    from pg import TeamServer, local_postgres

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg = local_postgres().start()
    try:
        server = TeamServer(pg.create_database("mlflow"), tmp_path / "artifacts", pg.env,
                            tmp_path / "server.log", port).start()  # fmt: skip
        try:
            reg = Registry(tmp_path / "here", champion["weights"], 2, uri=server.url)
            v1, v2 = reg.versions
            env = {**reg.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
            args = ["--follow-interval", str(INTERVAL), "--log-db", str(tmp_path / "log.db")]
            with App(args, env, reg.root) as app:
                assert app.versions() == {v1}
                with Load(app.url, pictures[0], clients=2) as load:
                    wait_for("answers before the promotion", lambda: load.count() >= 10)
                    reg.promote(v2, "--reason", "on the server")
                    wait_for("both workers on the new version", lambda: app.versions() == {v2},
                             log=app.text)  # fmt: skip
                    seen = load.count()
                    wait_for("answers after the switch", lambda: load.count() >= seen + 10)
                assert [s for _, s, _ in load.answers] == [200] * len(load.answers)
                assert answered_versions(load)[-10:] == [v2] * 10
        finally:
            assert server.stop() == 0, server.tail()
    finally:
        pg.stop()
