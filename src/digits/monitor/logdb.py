"""Where the prediction log is: the one answer for the service that writes it
(digits.serve.predlog) and the commands that read it (`digits monitor`, `digits feedback`)."""

from __future__ import annotations

from pathlib import Path


def normalise(url: str) -> str:
    """A SQLAlchemy URL for what the user gave: a URL, or a path to a SQLite file;
    postgresql:// is read with psycopg (v3, the project's driver)."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def default_url(store: str) -> str:
    """The log when `--log-db` names none: DIGITS_PREDICTION_LOG (where a team names its
    database, so that every replica and every teammate's `digits predict` log to one place);
    else `predictions.db` beside a SQLite store's database; else, for a tracking server, in the
    user's data folder ($XDG_DATA_HOME/digits, by default ~/.local/share/digits), never in
    whatever folder the command happens to run in."""
    from digits.core.settings import DIGITS_PREDICTION_LOG, XDG_DATA_HOME
    from digits.tracking.store import sqlite_path

    if named := DIGITS_PREDICTION_LOG.get():
        return normalise(named)
    db = sqlite_path(store)
    if db is not None:
        return f"sqlite:///{db.resolve().parent / 'predictions.db'}"
    folder = Path(XDG_DATA_HOME.get() or Path.home() / ".local" / "share") / "digits"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'predictions.db'}"


def log_url(given: str | None, store: str) -> str:
    """--log-db as given (a URL or a SQLite file's path), else the default for `store`."""
    return normalise(given) if given else default_url(store)
