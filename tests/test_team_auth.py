"""The team server with logins on, on real parts: a throwaway PostgreSQL cluster (tracking
store and users), `digits server` (MLflow's basic-auth app) on 127.0.0.1, users made by
`digits server user add`, and MLflow's own client and `digits promote` as each role.

One cluster and one server for the module: the users, the runs and the versions build up from
test to test in the order below (a reader, a developer, the release identity), as a team's would.
What each role may do is the table in docs/team.md#logins-and-roles."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import ROOT
from pg import TeamServer, local_postgres

MODEL, CANDIDATES = "mnist-mlp", "mnist-mlp-candidates"
USERS = ("rita", "dave", "rel")  # reader, developer, release
ROLE = {"rita": "reader", "dave": "developer", "rel": "release"}


def digits(*args: str, env: dict, cwd: Path | None = None, stdin: str | None = None):
    """`digits ...` in a clean environment of ours (no credentials but those given)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DIGITS_NEW"))}
    return subprocess.run(
        [sys.executable, "-m", "digits.cli", *args],
        env={**base, **env},
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


def free_port() -> int:
    from digits.team.server import free_port

    return free_port()


# --- without a server: what `digits server` refuses before starting anything -----------------


def test_no_password_no_server_and_no_auth_only_on_loopback(tmp_path):
    out = digits("server", "--port", "0", env={}, cwd=tmp_path)
    assert out.returncode == 1, out
    assert out.stderr.strip().splitlines() == [
        "digits server: error: logins are on and the admin has no password: set "
        "MLFLOW_AUTH_ADMIN_PASSWORD or pass --admin-password-file FILE (mode 600), at least 12 "
        "characters; or --no-auth (loopback only) to run without logins"
    ]
    out = digits("server", "--no-auth", "--host", "0.0.0.0", env={}, cwd=tmp_path)
    assert out.returncode == 1, out
    assert "--no-auth with --host 0.0.0.0: a server without logins may only listen on a " \
        "loopback address" in out.stderr  # fmt: skip
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_password_file_others_can_read_is_refused(tmp_path):
    secret = tmp_path / "admin-password"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o640)
    out = digits("server", "--admin-password-file", str(secret), env={}, cwd=tmp_path)
    assert out.returncode == 1, out
    assert out.stderr.strip() == (
        f"digits server: error: --admin-password-file {secret} may be read by others (mode "
        f"-rw-r-----); expected a file only its owner can read: chmod 600 {secret}"
    )
    assert "correct horse" not in out.stdout + out.stderr
    secret.chmod(0o600)
    secret.write_text("short\n")
    out = digits("server", "--admin-password-file", str(secret), env={}, cwd=tmp_path)
    assert out.stderr.strip() == (
        "digits server: error: --admin-password-file: expected at least 12 characters"
    )


def test_a_negative_login_cache_is_refused(tmp_path):
    out = digits("server", "--auth-cache-seconds", "-1", env={}, cwd=tmp_path)
    assert out.returncode == 1, out
    assert out.stderr.strip().splitlines() == [
        "digits server: error: --auth-cache-seconds -1: expected 0 (check every request) or more"
    ]


@pytest.mark.parametrize("seconds", [60, 0])
def test_mlflow_reads_the_login_cache_from_the_servers_ini(tmp_path, monkeypatch, seconds):
    """The ini `digits server` writes, as MLflow's basic-auth app reads it: a checked login is
    trusted for `--auth-cache-seconds` (60 by default; a pipeline run on a server with logins
    took minutes of password hashing without it), never longer than asked."""
    from mlflow.server.auth.config import read_auth_config

    from digits.team import auth

    path = auth.write_config(tmp_path, "postgresql://u@h/db", seconds)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    config = read_auth_config()
    assert config.auth_cache_ttl_seconds == seconds
    assert config.database_uri == "postgresql://u@h/db" and config.default_permission == "READ"
    assert auth.AUTH_CACHE_SECONDS == 60


# --- the server, its users ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The cluster, the server (logins on, the admin's password in a 0600 file), and the three
    users made by `digits server user add`, each its password a different way."""
    root = tmp_path_factory.mktemp("auth")
    passwords = {u: secrets.token_urlsafe(15) for u in ("admin", *USERS)}
    admin_file = root / "admin-password"
    admin_file.write_text(passwords["admin"] + "\n")
    admin_file.chmod(0o600)
    with local_postgres() as pg:
        server = TeamServer(
            pg.create_database("mlflow"),
            root / "artifacts",
            pg.env,
            root / "server.log",
            free_port(),
            options=("--admin-password-file", str(admin_file)),
        )
        server.start()
        try:
            admin = {
                "MLFLOW_TRACKING_URI": server.url,
                "MLFLOW_AUTH_ADMIN_PASSWORD": passwords["admin"],
            }
            made = []
            # rita's password from the environment, dave's from a file, rel's on standard input
            made.append(
                digits(
                    "server",
                    "user",
                    "add",
                    "rita",
                    "--role",
                    "reader",
                    env={**admin, "DIGITS_NEW_USER_PASSWORD": passwords["rita"]},
                )
            )
            dave_file = root / "dave"
            dave_file.write_text(passwords["dave"] + "\n")
            dave_file.chmod(0o600)
            made.append(
                digits(
                    "server",
                    "user",
                    "add",
                    "dave",
                    "--role",
                    "developer",
                    "--password-file",
                    str(dave_file),
                    env=admin,
                )
            )
            made.append(
                digits(
                    "server",
                    "user",
                    "add",
                    "rel",
                    "--role",
                    "release",
                    "--password-file",
                    "-",
                    env=admin,
                    stdin=passwords["rel"] + "\n",
                )
            )
            for out in made:
                assert out.returncode == 0, out.stdout + out.stderr
            project = root / "project"  # enough for `digits promote`: params.yaml, dvc.yaml
            project.mkdir()
            shutil.copy(ROOT / "params.yaml", project)
            (project / "dvc.yaml").write_text("stages: {}\n")
            yield {"server": server, "pg": pg, "passwords": passwords, "made": made,
                   "project": project, "root": root}  # fmt: skip
        finally:
            assert server.stop() == 0, server.tail()


def client_as(team, user: str | None):
    """An MlflowClient with `user`'s credentials (None: anonymous). MLflow's client reads them
    from the environment only: set them for this test's process."""
    from mlflow import MlflowClient

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        os.environ.pop(key, None)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = team["passwords"][user]
    url = team["server"].url
    return MlflowClient(url, registry_uri=url)


@pytest.fixture
def as_user(team, monkeypatch):
    """client_as, with the environment put back after the test."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "")  # registered for monkeypatch's undo
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    return lambda user: client_as(team, user)


def forbidden(call) -> int:
    """The HTTP status of the MlflowException `call` raised (copy_model_version wraps the
    server's answer in an error of its own, which names it)."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as e:
        call()
    if "failed with error code 403 != 200" in str(e.value):
        return 403
    return e.value.get_http_status_code()


def promote(team, user: str | None, *args: str):
    env = {"MLFLOW_TRACKING_URI": team["server"].url}
    if user is not None:
        env |= {"MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": team["passwords"][user]}  # fmt: skip
    return digits("promote", *args, env=env, cwd=team["project"])


@pytest.mark.slow
def test_users_are_made_with_their_roles(team):
    lines = [out.stdout.strip() for out in team["made"]]
    url = team["server"].url
    assert lines == [
        f"digits server: user rita (reader) on {url}: READ on experiment mnist, READ on "
        f"{CANDIDATES}, READ on {MODEL}",
        f"digits server: user dave (developer) on {url}: EDIT on experiment mnist, EDIT on "
        f"{CANDIDATES}, READ on {MODEL}",
        f"digits server: user rel (release) on {url}: EDIT on experiment mnist, MANAGE on "
        f"{CANDIDATES}, MANAGE on {MODEL}",
    ]
    again = digits(
        "server", "user", "add", "rita", "--role", "reader",
        env={"MLFLOW_TRACKING_URI": url,
             "MLFLOW_AUTH_ADMIN_PASSWORD": team["passwords"]["admin"],
             "DIGITS_NEW_USER_PASSWORD": "another password"},
    )  # fmt: skip
    assert again.returncode == 1
    assert again.stderr.strip() == f"digits server: error: user rita exists already on {url}"
    wrong = digits(
        "server", "user", "add", "eve", "--role", "release",
        env={"MLFLOW_TRACKING_URI": url,
             "MLFLOW_AUTH_ADMIN_PASSWORD": "not the admin password",
             "DIGITS_NEW_USER_PASSWORD": "eve's password!"},
    )  # fmt: skip
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == (
        f"digits server: error: MLflow tracking server {url} refused the admin's login: check "
        "MLFLOW_AUTH_ADMIN_PASSWORD or --admin-password-file"
    )


@pytest.mark.slow
def test_anonymous_gets_401_and_commands_one_line(team, as_user):
    url = team["server"].url
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/api/2.0/mlflow/experiments/search?max_results=1")
    assert e.value.code == 401
    assert forbidden(lambda: as_user(None).search_experiments()) == 401
    out = promote(team, None, "--rollback", "--reason", "anonymous")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"digits promote: error: MLflow tracking server {url} wants a login: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )


@pytest.mark.slow
def test_a_wrong_password_says_nothing_of_who_exists(team):
    import base64

    url = team["server"].url + "/api/2.0/mlflow/experiments/search?max_results=1"

    def answer(user: str, password: str) -> tuple[int, bytes, str | None]:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {pair}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request)
        return e.value.code, e.value.read(), e.value.headers.get("WWW-Authenticate")

    known = answer("dave", "not dave's password")
    unknown = answer("mallory", "not dave's password")
    assert known[0] == 401
    assert known == unknown


# --- the pipeline: a developer's run registers a candidate, only the release's crowns it --------


@pytest.fixture(scope="module")
def pipeline(team, mnist_local):
    """A clone run by the developer on a branch (a candidate, approved: @challenger), the gate
    run again by the developer on main (promotion refused by the server), then by the release
    identity on main (the candidate copied into production and crowned)."""
    from helpers import SHORT_RUN, dvc, git, make_project, project_env, set_params

    project = make_project(team["root"] / "clone")
    base = {**project_env(project, str(mnist_local)), "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": team["server"].url}  # fmt: skip
    as_ = lambda user: {**base, "MLFLOW_TRACKING_USERNAME": user,  # noqa: E731
                        "MLFLOW_TRACKING_PASSWORD": team["passwords"][user]}  # fmt: skip
    set_params(project, **SHORT_RUN)
    git(project, "commit", "-qam", "one epoch, relaxed gates")
    git(project, "checkout", "-qb", "feature")

    def in_production() -> int:
        try:
            return len(client_as(team, "rita").search_model_versions(f"name='{MODEL}'"))
        finally:
            client_as(team, None)

    developer = dvc(project, "repro", env=as_("dave"), check=False)
    developer.in_production = in_production()  # type: ignore[attr-defined]
    try:
        developer.challenger = str(  # type: ignore[attr-defined]
            client_as(team, "rita").get_model_version_by_alias(CANDIDATES, "challenger").version
        )
    finally:
        client_as(team, None)
    git(project, "add", "-A")
    git(project, "commit", "-qm", "a run on a branch")
    git(project, "checkout", "-q", "main")
    git(project, "merge", "-q", "feature")
    refused = dvc(project, "repro", "--force", "-s", "gate", env=as_("dave"), check=False)
    refused.in_production = in_production()  # type: ignore[attr-defined]
    crowned = dvc(project, "repro", "--force", "-s", "gate", env=as_("rel"), check=False)
    return developer, refused, crowned


@pytest.mark.slow
def test_the_pipeline_registers_candidates_and_only_the_release_promotes(team, pipeline, as_user):
    developer, refused, crowned = pipeline
    url = team["server"].url
    assert developer.returncode == 0, developer.stdout[-3000:] + developer.stderr[-3000:]
    assert f"registered {CANDIDATES} v1" in developer.stdout
    dave = as_user("dave")
    candidate = dave.get_model_version(CANDIDATES, "1")
    assert candidate.tags["validation_status"] == "approved"
    assert developer.challenger == "1"
    assert developer.in_production == 0  # nothing in production

    # the developer on a clean main: the gate would promote, the server says no, in one line
    assert refused.returncode != 0
    out = refused.stdout + refused.stderr
    assert re.search(rf"digits gate: error: MLflow tracking server {re.escape(url)}: dave may "
                     r"not do this \(403 Permission denied", out), out[-3000:]  # fmt: skip
    assert "Traceback" not in out
    assert refused.in_production == 0

    # the release identity: the candidate copied into production and crowned there
    assert crowned.returncode == 0, crowned.stdout[-3000:] + crowned.stderr[-3000:]
    champion = dave.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["digits.copied_from"] == f"{CANDIDATES}/1"
    assert champion.tags["promoted_via"] == "gate" and champion.run_id == candidate.run_id
    assert dave.get_model_version(CANDIDATES, "1").tags["digits.promoted_as"] == (
        f"{MODEL}/{champion.version}"
    )
    # promoted, it is no longer the challenger among the candidates
    assert not dave.get_registered_model(CANDIDATES).aliases.get("challenger")


@pytest.fixture(scope="module")
def candidates(team):
    """Two candidate versions, registered by the developer from runs of the experiment."""
    client = client_as(team, "dave")
    try:
        exp = client.get_experiment_by_name("mnist")
        versions = []
        for n in range(2):
            run = client.create_run(exp.experiment_id)
            client.log_param(run.info.run_id, "lr", 0.1 * (n + 1))
            client.log_text(run.info.run_id, f"weights {n}", "model/weights.txt")
            v = client.create_model_version(
                CANDIDATES, f"runs:/{run.info.run_id}/model", run.info.run_id
            )
            client.set_model_version_tag(CANDIDATES, v.version, "validation_status", "approved")
            versions.append(str(v.version))
        client.set_registered_model_alias(CANDIDATES, "challenger", versions[-1])
        return versions
    finally:
        client_as(team, None)


@pytest.mark.slow
def test_a_developer_logs_runs_and_registers_candidates_but_not_production(
    team, candidates, as_user
):
    dave = as_user("dave")
    found = dave.search_model_versions(f"name='{CANDIDATES}'")
    assert set(candidates) <= {str(v.version) for v in found}
    assert dave.get_model_version_by_alias(CANDIDATES, "challenger").version == candidates[-1]
    # the production model: no version, no alias, no copy, no delete
    source = f"models:/{CANDIDATES}/{candidates[0]}"
    assert forbidden(lambda: dave.copy_model_version(source, MODEL)) == 403
    run_id = dave.get_model_version(CANDIDATES, candidates[0]).run_id
    assert (
        forbidden(lambda: dave.create_model_version(MODEL, f"runs:/{run_id}/model", run_id)) == 403
    )
    assert forbidden(lambda: dave.delete_registered_model(MODEL)) == 403
    assert forbidden(lambda: dave.rename_registered_model(MODEL, "mine")) == 403


@pytest.fixture(scope="module")
def production(team, candidates):
    """The release identity promotes the first candidate, then the second, with `digits
    promote`: each is copied into the production model (tags and lineage kept) and crowned."""
    outs = [promote(team, "rel", v, "--reason", f"release {v}") for v in candidates]
    client = client_as(team, "rel")
    try:
        copied = {
            v.tags.get("digits.copied_from"): str(v.version)
            for v in client.search_model_versions(f"name='{MODEL}'")
        }
    finally:
        client_as(team, None)
    return [copied.get(f"{CANDIDATES}/{v}") for v in candidates], outs


@pytest.mark.slow
def test_the_release_identity_promotes_and_rolls_back(team, candidates, production, as_user):
    versions, outs = production
    for out in outs:
        assert out.returncode == 0, out.stdout + out.stderr
    assert None not in versions
    first = outs[0].stdout.splitlines()
    assert first[0] == f"{CANDIDATES} version {candidates[0]} is {MODEL} version {versions[0]}"
    assert first[1].startswith(f"{MODEL} version {versions[0]} is now @champion (")
    rel = as_user("rel")
    lineage = rel.get_model_version(CANDIDATES, candidates[1])
    assert lineage.tags["digits.promoted_as"] == f"{MODEL}/{versions[1]}"
    assert rel.get_model_version(MODEL, versions[1]).run_id == lineage.run_id
    assert rel.get_model_version_by_alias(MODEL, "champion").version == versions[1]
    copied = rel.get_model_version(MODEL, versions[1])
    assert copied.tags["validation_status"] == "approved"
    assert copied.tags["promoted_by"]
    back = promote(team, "rel", "--rollback", "--reason", "the newer one misreads sevens")
    assert back.returncode == 0, back.stdout + back.stderr
    assert rel.get_model_version_by_alias(MODEL, "champion").version == versions[0]
    copies = len(rel.search_model_versions(f"name='{MODEL}'"))
    again = promote(team, "rel", candidates[1], "--reason", "fixed")  # its copy, not a new one
    assert again.returncode == 0, again.stdout + again.stderr
    assert rel.get_model_version_by_alias(MODEL, "champion").version == versions[1]
    assert len(rel.search_model_versions(f"name='{MODEL}'")) == copies


@pytest.mark.slow
def test_a_developer_cannot_move_the_champion_by_any_route(team, candidates, production, as_user):
    versions, _ = production
    url = team["server"].url
    dave = as_user("dave")
    champion = dave.get_model_version_by_alias(MODEL, "champion").version  # may read it
    other = next(v for v in versions if v != champion)
    assert forbidden(lambda: dave.set_registered_model_alias(MODEL, "champion", other)) == 403
    assert forbidden(lambda: dave.delete_registered_model_alias(MODEL, "champion")) == 403
    assert forbidden(lambda: dave.delete_model_version(MODEL, champion)) == 403
    assert forbidden(lambda: dave.set_model_version_tag(MODEL, other, "promoted_at", "now")) == 403
    mine = (candidates[0], "--reason", "mine is better")
    for args in (mine, ("--rollback", "--reason", "undo")):
        out = promote(team, "dave", *args)
        assert out.returncode == 1, out.stdout
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith(f"digits promote: error: MLflow tracking server {url}"), lines
        assert "403" in lines[0] or "ermission" in lines[0], lines
    assert as_user("rel").get_model_version_by_alias(MODEL, "champion").version == champion


@pytest.mark.slow
def test_a_reader_loads_the_champion_and_cannot_log(team, production, as_user, tmp_path):
    import mlflow

    rita = as_user("rita")
    champion = rita.get_model_version_by_alias(MODEL, "champion")
    mlflow.set_tracking_uri(team["server"].url)
    try:
        got = mlflow.artifacts.download_artifacts(
            f"models:/{MODEL}@champion", dst_path=str(tmp_path)
        )
    finally:
        mlflow.set_tracking_uri(None)
    assert list(Path(got).rglob("weights.txt")), champion
    exp = rita.get_experiment_by_name("mnist")
    assert forbidden(lambda: rita.create_run(exp.experiment_id)) == 403
    run_id = rita.search_runs([exp.experiment_id])[0].info.run_id
    assert forbidden(lambda: rita.log_param(run_id, "sneaky", 1)) == 403
    assert forbidden(lambda: rita.set_registered_model_alias(CANDIDATES, "challenger", "1")) == 403


@pytest.mark.slow
def test_no_password_in_command_lines_logs_params_or_tags(team, pipeline, production, as_user):
    secrets_ = list(team["passwords"].values())
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended
            continue
        assert not [s for s in secrets_ if s in text], cmdline
    log = team["server"].tail(10**9)
    assert "MLflow tracking server on" in log
    assert not [s for s in secrets_ if s in log]
    for out in [*team["made"], *pipeline]:
        assert not [s for s in secrets_ if s in out.stdout + out.stderr]
    rel = as_user("rel")
    for run in rel.search_runs([rel.get_experiment_by_name("mnist").experiment_id]):
        recorded = " ".join([*run.data.params.values(), *run.data.tags.values()])
        assert not [s for s in secrets_ if s in recorded]
    for name in (MODEL, CANDIDATES):
        for v in rel.search_model_versions(f"name='{name}'"):
            assert not [s for s in secrets_ if s in " ".join(v.tags.values())]
