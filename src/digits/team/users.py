"""`digits server user add NAME --role reader|developer|release`: a login on the running team
server, with the permissions of its role, set by the admin over the server's REST API.

    role       the experiment   <model>-candidates   <model> (production)
    reader     READ             READ                 READ
    developer  EDIT             EDIT                 READ
    release    EDIT             MANAGE               MANAGE

EDIT on the experiment: create runs and log to them; on the candidates model: register
versions, tag them, set their aliases. READ on the production model: load `@champion`, and a
403 for any change (MLflow needs EDIT on a model to register a version in it or move an alias,
MANAGE to delete one). Only the release identity, the one CI's pushes to main use, holds MANAGE
there. Every logged-in user may read the rest (default_permission READ); nobody but the admin
manages users. The passwords come from a file only their owner can read, the environment or a
prompt, never the command line."""

from __future__ import annotations

import argparse
import getpass
import sys
import warnings

from digits.core import http, settings
from digits.core.errors import first_line
from digits.team import auth
from digits.team.auth import AuthError
from digits.tracking.registry import candidates_of

# (experiment, candidates model, production model)
ROLES: dict[str, tuple[str, str, str]] = {
    "reader": ("READ", "READ", "READ"),
    "developer": ("EDIT", "EDIT", "READ"),
    # MANAGE on the candidates too: promoting the last approved candidate removes @challenger
    # there, and removing an alias is a delete
    "release": ("EDIT", "MANAGE", "MANAGE"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="digits server user",
        description="Logins on the running team server (docs/team.md#logins-and-roles).",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("add", help="a new login with the permissions of a role")
    p.add_argument("name", metavar="NAME", help="the login")
    p.add_argument("--role", required=True, choices=sorted(ROLES), help="what it may do")
    p.add_argument(
        "--url", help="the team server (default: MLFLOW_TRACKING_URI), e.g. http://127.0.0.1:5000"
    )
    p.add_argument(
        "--admin-password-file",
        metavar="FILE",
        help="the admin's password, in a file only you can read (default: "
        "MLFLOW_AUTH_ADMIN_PASSWORD)",
    )
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="the new user's password, in a file only you can read, or - for standard input "
        "(default: DIGITS_NEW_USER_PASSWORD, else a prompt)",
    )
    p.add_argument(
        "--experiment", default=auth.DEFAULT_EXPERIMENT, help="the pipeline's experiment"
    )
    p.add_argument("--model", default=auth.DEFAULT_MODEL, help="the production registered model")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    url = (args.url or settings.MLFLOW_TRACKING_URI.get() or "").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise AuthError(
            "expected the team server's URL in --url or MLFLOW_TRACKING_URI (http://...), "
            f"got {url or 'neither'}"
        )
    admin = auth.admin_password(args.admin_password_file)
    password = new_password(args.password_file)
    try:
        http.get(url + "/health", timeout=10)
    except OSError as e:
        raise AuthError(
            f"MLflow tracking server {url} is unreachable ({getattr(e, 'reason', e)})"
        ) from None
    add(url, admin, args.name, password, args.role, args.experiment, args.model)
    grants = ROLES[args.role]
    print(
        f"digits server: user {args.name} ({args.role}) on {url}: {grants[0]} on experiment "
        f"{args.experiment}, {grants[1]} on {candidates_of(args.model)}, {grants[2]} on "
        f"{args.model}"
    )
    return 0


def new_password(path: str | None) -> str:
    if path:
        return auth.read_secret_file(path, "--password-file")
    if (secret := settings.DIGITS_NEW_USER_PASSWORD.get()) is not None:
        auth.check_password(secret, settings.DIGITS_NEW_USER_PASSWORD.name)
        return secret
    if not sys.stdin.isatty():
        raise AuthError(
            "the new user's password: expected --password-file FILE (or - for standard input), "
            "DIGITS_NEW_USER_PASSWORD, or a terminal to prompt on"
        )
    secret = getpass.getpass("the new user's password: ")
    auth.check_password(secret, "the new user's password")
    if getpass.getpass("again: ") != secret:
        raise AuthError("the new user's password: the two did not match")
    return secret


def add(
    url: str, admin: str, name: str, password: str, role: str, experiment: str, model: str
) -> None:
    """Create the user and grant its role's permissions, as the admin."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    with auth.logged_in(auth.ADMIN, admin):
        exp_id = auth.ensure_protected(url, experiment, model)
        with warnings.catch_warnings():  # the auth app's import of starlette's WSGI, deprecated
            warnings.simplefilter("ignore")
            client = get_app_client("basic-auth", tracking_uri=url)
        try:
            client.create_user(name, password)
        except MlflowException as e:
            if e.error_code == "RESOURCE_ALREADY_EXISTS":
                raise AuthError(f"user {name} exists already on {url}") from None
            raise AuthError(f"MLflow tracking server {url}: {first_line(e)}") from None
        on_experiment, on_candidates, on_model = ROLES[role]
        try:
            client.grant_user_permission(name, "experiment", exp_id, on_experiment)
            client.grant_user_permission(
                name, "registered_model", candidates_of(model), on_candidates
            )
            client.grant_user_permission(name, "registered_model", model, on_model)
        except MlflowException as e:
            raise AuthError(f"MLflow tracking server {url}: {first_line(e)}") from None
