"""Local scale-out services: a PostgreSQL cluster (Debian's `postgresql` binaries, run as the
`postgres` user when started by root, data under `<dir>/pgdata`) holding the Optuna storage
and the MLflow backend store, and an `mlflow server` with a local artifact directory. Both
listen on 127.0.0.1 only. `make services` / `bench services start` starts them for a user;
the scale-out tests start a throwaway pair on free ports with the same functions.

The password is generated, kept in `<dir>/env` (mode 600) as the two export lines that point
`bench` at the services, and never printed: the URLs are shown with *** in its place.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError
from bench.locations import STORAGE_ENV, TRACKING_ENV, redact

USER = "vaebench"
HOST = "127.0.0.1"


class ServiceError(BenchError):
    """A service that cannot be started or stopped."""


@dataclass(frozen=True)
class Services:
    directory: Path
    pg_port: int
    mlflow_port: int
    password: str

    @property
    def storage(self) -> str:
        return f"postgresql://{USER}:{self.password}@{HOST}:{self.pg_port}/optuna"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def backend_store(self) -> str:
        return f"postgresql://{USER}:{self.password}@{HOST}:{self.pg_port}/mlflow"


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH, else in Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def start(directory: str | Path, pg_port: int | None = None, mlflow_port: int | None = None) -> Services:
    """Start PostgreSQL and an MLflow server for `directory` (idempotent: running ones are kept)."""
    directory = Path(directory).resolve()
    state = directory / "services.json"
    if state.exists():
        known = json.loads(state.read_text())
        running = Services(directory, known["pg_port"], known["mlflow_port"], known["password"])
        if _pg_running(directory) and _answers(running.tracking_uri):
            return running
        stop(directory)
    for name in ("initdb", "pg_ctl", "createdb"):
        if postgres_bin(name) is None:
            raise ServiceError(f"PostgreSQL's {name} is not installed: apt-get install postgresql "
                               "(Debian), then run this again")
    from bench.locations import check_driver

    check_driver("postgresql://", "a PostgreSQL store")
    directory.mkdir(parents=True, exist_ok=True)
    services = Services(directory, pg_port or free_port(), mlflow_port or free_port(),
                        secrets.token_urlsafe(18))
    state.write_text(json.dumps({"pg_port": services.pg_port, "mlflow_port": services.mlflow_port,
                                 "password": services.password}))
    state.chmod(0o600)
    _start_postgres(services)
    _start_mlflow(services)
    env = directory / "env"
    env.write_text(f"export {STORAGE_ENV}='{services.storage}'\nexport {TRACKING_ENV}='{services.tracking_uri}'\n")
    env.chmod(0o600)
    return services


def _start_postgres(s: Services) -> None:
    data, socket_dir = s.directory / "pgdata", s.directory / "pgsocket"
    for path in (s.directory, socket_dir):
        path.mkdir(exist_ok=True)
        _own(path)
    if os.geteuid() == 0 and subprocess.run(_as_postgres(["test", "-w", str(s.directory)])).returncode:
        raise ServiceError(f"the postgres user cannot reach {s.directory} (a parent directory is private); "
                           "use a --results directory that other users can traverse")
    if not (data / "PG_VERSION").exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        _own(data)
        pwfile = s.directory / "pwfile"
        pwfile.write_text(s.password + "\n")
        _own(pwfile)
        pwfile.chmod(0o600)
        try:
            _run(_as_postgres([postgres_bin("initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
                               "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions"]), "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
    log = s.directory / "postgres.log"
    log.touch()
    _own(log)
    _run(_as_postgres([postgres_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                       f"-h {HOST} -p {s.pg_port} -k {socket_dir}", "start"]), "pg_ctl start")
    for db in ("optuna", "mlflow"):
        done = subprocess.run([postgres_bin("createdb"), "-h", HOST, "-p", str(s.pg_port), "-U", USER, db],
                              env={**os.environ, "PGPASSWORD": s.password}, capture_output=True, text=True)
        if done.returncode and "already exists" not in done.stderr:
            raise ServiceError(f"createdb {db} failed: {redact(done.stderr.strip().splitlines()[-1])}")


def _start_mlflow(s: Services) -> None:
    start_mlflow_server(s.directory, s.mlflow_port, s.backend_store)


def start_mlflow_server(directory: Path, port: int, backend_store: str) -> int:
    """`mlflow server` on 127.0.0.1:`port` over `backend_store`, artifacts in `directory`,
    in its own process group; returns its process id once it answers."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    artifacts = directory / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    with open(directory / "mlflow.log", "ab") as log:
        # the store's URL (with its password) goes in the environment, which only its owner can
        # read, not on the command line, which `ps` shows every user
        proc = subprocess.Popen([mlflow, "server", "--artifacts-destination", str(artifacts), "--host", HOST,
                                 "--port", str(port)], env={**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_store},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (directory / "mlflow.pid").write_text(str(proc.pid))
    uri = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 180
    while not _answers(uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ServiceError(f"mlflow server did not start on {uri}; see {directory / 'mlflow.log'}")
        time.sleep(0.5)
    return proc.pid


def _answers(uri: str) -> bool:
    try:
        urllib.request.urlopen(f"{uri}/health", timeout=2).close()
        return True
    except OSError:
        return False


def _pg_running(directory: Path) -> bool:
    return postgres_pid(directory) is not None


def postgres_pid(directory: str | Path) -> int | None:
    """The postmaster's process id, from its own pid file, while it runs."""
    pidfile = Path(directory) / "pgdata" / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def mlflow_pid(directory: str | Path) -> int | None:
    try:
        pid = int((Path(directory) / "mlflow.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop_mlflow(directory: str | Path) -> None:
    """Stop the MLflow server started for `directory` (its whole process group), by process id."""
    pid = mlflow_pid(directory)
    if pid is not None:
        _stop_group(pid)
    (Path(directory) / "mlflow.pid").unlink(missing_ok=True)


def stop(directory: str | Path) -> list[str]:
    """Stop exactly the services started for `directory`; returns what was stopped."""
    directory = Path(directory).resolve()
    stopped = []
    if mlflow_pid(directory) is not None:
        stop_mlflow(directory)
        stopped.append("mlflow server")
    if _pg_running(directory):
        _run(_as_postgres([postgres_bin("pg_ctl"), "-D", str(directory / "pgdata"), "-m", "fast", "-w", "stop"]),
             "pg_ctl stop")
        stopped.append("postgresql")
    return stopped


def _stop_group(pid: int, timeout_s: float = 20) -> None:
    """SIGTERM to the process group of `pid`, SIGKILL after `timeout_s`; reaps `pid` when it is
    our child, so no zombie is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    while alive(pid):
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Whether `pid` runs: gone, or a zombie no one has reaped yet (orphans here are reaped
    late), counts as stopped."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our child, reaped just now
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ServiceError(f"{what} failed: {redact(last)}")
