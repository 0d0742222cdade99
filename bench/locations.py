"""Where studies and runs live: the one place that knows `sqlite:///` paths, the environment
defaults of the two URLs, the database drivers a URL needs, and how to print a URL without
its password. Every line that shows a URL or an error about one goes through `redact`."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from pathlib import Path

from bench.errors import BenchError

SQLITE = "sqlite:///"
STORAGE_ENV, TRACKING_ENV = "VAEBENCH_STORAGE", "VAEBENCH_TRACKING_URI"
# scheme://user:password@host -> scheme://user:***@host (also inside longer text)
_CREDENTIALS = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<secret>[^@\s/]*)@")
# drivers SQLAlchemy 2.1 picks for a bare scheme, and the import names of those we accept
_DRIVERS = {"postgresql": ("psycopg", "psycopg2"), "mysql": ("pymysql", "MySQLdb")}


def env_seconds(name: str, default: float, kind=int, minimum: float = 1):
    """A period in seconds from the environment variable `name`, else `default`: a value that is
    no number or below `minimum` is one line naming the variable, not a traceback at import."""
    text = os.environ.get(name, "").strip()
    if not text:
        return kind(default)
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not minimum <= value < float("inf"):
        raise BenchError(f"{name}={text!r} must be {'an integer' if kind is int else 'a number'} of seconds "
                         f">= {minimum:g}: fix it or unset it (default {default:g})")
    return value


def name_problem(name: str) -> str | None:
    """Why a study or experiment name cannot name the folders it gets under results/
    (artifacts/<name>, reports/, .<name>.spec.json), or None: a "../x" wrote outside them."""
    if not name.strip():
        return "it is empty"
    if len(name) > 100 or name.strip() in (".", "..") or re.search(r"[/\\\x00-\x1f]", name):
        return "a name becomes a folder: use at most 100 characters and no /, \\ or control characters"
    return None


def sqlite_url(path: str | Path) -> str:
    return f"{SQLITE}{Path(path).resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The file of a `sqlite:///PATH` URL, else None."""
    return Path(url[len(SQLITE):]) if url.startswith(SQLITE) else None


def ensure_parent(url: str) -> None:
    """Create the directory a sqlite file goes in (a new results directory)."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def default_storage(results: str | Path) -> str:
    return os.environ.get(STORAGE_ENV) or sqlite_url(Path(results) / "optuna.db")


def default_tracking(results: str | Path) -> str:
    return os.environ.get(TRACKING_ENV) or sqlite_url(Path(results) / "mlflow.db")


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by ***."""
    return _CREDENTIALS.sub(lambda m: f"{m['head']}:***@", str(text))


def secrets(url: str) -> list[str]:
    """The passwords inside `url` (to check that none leaks)."""
    return [m["secret"] for m in _CREDENTIALS.finditer(url) if m["secret"]]


# the table that marks each kind of store in a sqlite file
STORE_TABLE = {"Optuna storage": "studies", "MLflow tracking store": "experiments"}


def check_not_the_other_store(url: str, what: str) -> None:
    """Fail in one line when the sqlite file at `url` holds the other kind of store (`what` is a
    key of STORE_TABLE): opening an Optuna storage as an MLflow store, or back, migrated it."""
    import sqlite3

    path = sqlite_path(url)
    if path is None or not path.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return  # not a database at all: opening it says so
    [(other, table)] = [(kind, t) for kind, t in STORE_TABLE.items() if kind != what]
    if table in tables and STORE_TABLE[what] not in tables:
        raise BenchError(f"{url} is an {other}, not an {what}: swap --storage and --tracking-uri "
                         f"(or VAEBENCH_STORAGE and VAEBENCH_TRACKING_URI)")


def check_driver(url: str, what: str) -> None:
    """Fail in one line when `url` cannot hold a study: a sqlite URL without a file (an in-memory
    store loses every run when the process ends), or a database whose driver is not installed
    (the `scale` extra brings psycopg 3, SQLAlchemy 2.1's driver for postgresql://)."""
    if url.startswith("sqlite:") and (not url.removeprefix("sqlite:").strip("/") or url.endswith(":memory:")):
        raise BenchError(f"{what} {url!r} names no file: its runs would live in memory and be lost; "
                         "give sqlite:///PATH")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    dialect, _, driver = scheme.partition("+")
    names = (driver,) if driver else _DRIVERS.get(dialect, ())
    if names and not any(importlib.util.find_spec(n) for n in names if n):
        raise BenchError(f"{what} {redact(url)} needs a {dialect} driver ({' or '.join(n for n in names if n)}), "
                         "which is not installed: pip install -e \".[scale]\"")
