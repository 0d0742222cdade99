"""Scale-out on real engines: a throwaway PostgreSQL cluster and `mlflow server` (started by
these tests, on free 127.0.0.1 ports, stopped by process id), a coordinator and `bench worker`
processes, a worker killed with SIGKILL mid-trial, a tracking server lost mid-study, and
passwords that never leak. Skipped, with the reason, where PostgreSQL's server binaries or the
`scale` extra's driver are missing (`.ci/run` installs both)."""

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from bench import queue, services, sweep, tracking
from bench.locations import STORAGE_ENV, TRACKING_ENV

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
HAVE_POSTGRES = services.postgres_bin("initdb") is not None and importlib.util.find_spec("psycopg") is not None
MISSING = "PostgreSQL server binaries or psycopg missing: apt-get install postgresql; pip install -e '.[scale]'"
# CI (.ci/run) installs both and sets this: there a missing server is a failure, never a skip
REQUIRED = bool(os.environ.get("VAEBENCH_REQUIRE_SERVICES"))
needs_postgres = pytest.mark.skipif(not HAVE_POSTGRES and not REQUIRED, reason=MISSING)

SPEC = """
[study]
name = "{name}"
dataset = "digits"
seeds = [0]
epochs = {epochs}
objective = "val/bce"

[grid]
model = ["vae", "cvae", "ae"]
loss = ["bce", "mse"]

[fixed]
latent = 2
eval_k = 5
eval_n = 50
quality_n = 0
"""
FAST_RECOVERY = {"VAEBENCH_HEARTBEAT_S": "1", "VAEBENCH_GRACE_S": "2", "VAEBENCH_STATE_EVERY_S": "0",
                 "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_spec(directory: Path, name: str, epochs: int) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(SPEC.format(name=name, epochs=epochs))
    return path


def bench(*args, env: dict, wait: bool = True):
    cmd = [sys.executable, "-m", "bench", *args]
    full_env = {**os.environ, **FAST_RECOVERY, **env}
    if wait:
        return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def coverage(study_name: str, storage: str, tracking_uri: str):
    """(Optuna trial states by cell, MLflow run statuses by cell) of a study."""
    trials = optuna.load_study(study_name=study_name, storage=queue.open_storage(storage)).get_trials()
    states: dict[str, list] = {}
    for t in sorted(trials, key=lambda t: t.number):
        states.setdefault(t.user_attrs["cell"], []).append(t.state)
    client = tracking.connect(tracking_uri)
    exp_id = client.get_experiment_by_name(study_name).experiment_id
    runs: dict[str, list] = {}
    for run in tracking.trial_runs(client, exp_id, study_name):
        runs.setdefault(run.data.tags[tracking.CELL], []).append(run)
    return states, runs


@pytest.fixture(scope="module")
def servers():
    if not HAVE_POSTGRES:
        pytest.fail(MISSING) if REQUIRED else pytest.skip(MISSING)
    # not under pytest's private (0700) temporary root: the postgres user must reach the data
    directory = Path(tempfile.mkdtemp(prefix="vaebench-services-"))
    directory.chmod(0o755)
    started = services.start(directory)
    pids = services.postgres_pid(directory), services.mlflow_pid(directory)
    assert all(pids)
    yield started
    services.stop(directory)
    for pid in pids:  # everything it started is gone (or a zombie waiting for init to reap it)
        deadline = time.monotonic() + 30
        while services.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not services.alive(pid), pid
    shutil.rmtree(directory, ignore_errors=True)


@needs_postgres
def test_three_workers_on_postgresql_and_an_mlflow_server_survive_a_killed_worker(servers, tmp_path):
    env = {STORAGE_ENV: servers.storage, TRACKING_ENV: servers.tracking_uri}
    spec = write_spec(tmp_path, "scale", epochs=30)
    queued = bench("sweep", str(spec), "--workers", "0", "--results", str(tmp_path), env=env)
    assert queued.returncode == 0, queued.stderr
    workers = [bench("worker", str(spec), "--results", str(tmp_path), "--threads", "1", "--worker-id", str(i),
                     env=env, wait=False) for i in (1, 2, 3)]
    study = optuna.load_study(study_name="scale", storage=queue.open_storage(servers.storage))
    deadline, victim = time.monotonic() + 300, None
    while victim is None:  # a trial RUNNING with some epochs saved: kill the worker that holds it
        assert time.monotonic() < deadline, "no trial reached its second epoch"
        for t in study.get_trials(states=(TrialState.RUNNING,)):
            pid = int(t.user_attrs.get(queue.WORKER, ":0").rsplit(":", 1)[1])
            runs = list((tmp_path / "checkpoints").glob("*/state.pt"))
            if pid in {w.pid for w in workers} and runs:
                victim = (t.number, pid)
                break
        time.sleep(0.1)
    os.kill(victim[1], signal.SIGKILL)
    for w in workers:
        w.wait(timeout=600)
    assert sorted(w.returncode for w in workers) == [-signal.SIGKILL, 0, 0]
    states, _ = coverage("scale", servers.storage, servers.tracking_uri)
    assert TrialState.RUNNING in [s for cell in states.values() for s in cell]  # the killed one

    time.sleep(3)  # past the grace period
    again = bench("sweep", str(spec), "--workers", "1", "--results", str(tmp_path), env=env)
    assert again.returncode == 0, again.stderr

    states, runs = coverage("scale", servers.storage, servers.tracking_uri)
    assert len(states) == 6 and len(runs) == 6
    for cell, cell_states in states.items():  # zero lost, zero duplicated
        assert cell_states.count(TrialState.COMPLETE) == 1, (cell, cell_states)
        assert [r.info.status for r in runs[cell]].count("FINISHED") == 1, cell
        assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in runs[cell]), cell
    killed_cell = next(c for c, s in states.items() if s[0] == TrialState.FAIL)
    killed_runs = {r.info.status: r for r in runs[killed_cell]}
    # resumed into the same run (state saved), or a fresh run beside the marked-FAILED one
    assert "vaebench.resumed_from_epoch" in killed_runs["FINISHED"].data.tags or "FAILED" in killed_runs


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_four_workers_on_one_storage_lose_and_duplicate_nothing(tmp_path, new_store, kind):
    new_store(tmp_path)
    storage = {"sqlite": f"sqlite:///{tmp_path / 'optuna.db'}", "journal": f"journal:{tmp_path / 'optuna.log'}"}[kind]
    spec = write_spec(tmp_path, "four", epochs=1)
    done = bench("sweep", str(spec), "--workers", "4", "--storage", storage, "--results", str(tmp_path), env={})
    assert done.returncode == 0, done.stderr
    states, runs = coverage("four", storage, tracking.default_uri(tmp_path))
    assert {cell: s for cell, s in states.items()} == {cell: [TrialState.COMPLETE] for cell in states}
    assert len(states) == 6 and all([r.info.status for r in rs] == ["FINISHED"] for rs in runs.values())


def test_an_mlflow_server_that_does_not_answer_fails_in_one_line_before_anything_trains(tmp_path):
    spec = write_spec(tmp_path, "nowhere", epochs=1)
    port = services.free_port()  # nothing listens there
    out = bench("sweep", str(spec), "--tracking-uri", f"http://127.0.0.1:{port}", "--results", str(tmp_path), env={})
    assert out.returncode != 0 and "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert f"127.0.0.1:{port}" in line and "does not answer" in line and "make services" in line
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_a_tracking_server_lost_mid_study_fails_its_trials_and_the_next_run_retries_them(tmp_path, new_store):
    new_store(tmp_path)
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    port, backend = services.free_port(), f"sqlite:///{server_dir / 'mlflow.db'}"
    services.start_mlflow_server(server_dir, port, backend)
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    uri = f"http://127.0.0.1:{port}"
    spec = write_spec(tmp_path, "lost", epochs=20)
    args = ("sweep", str(spec), "--tracking-uri", uri, "--results", str(tmp_path))
    try:
        running = bench(*args, env=env, wait=False)
        study = None
        while True:  # the first trial is training: take the server away
            assert running.poll() is None, running.stderr.read()
            try:
                study = study or optuna.load_study(study_name="lost", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
                if study.get_trials(states=(TrialState.RUNNING,)):
                    break
            except KeyError:
                pass
            time.sleep(0.1)
        # lost, not shut down: after a SIGTERM the study once finished rc 0 (a full run), most likely
        # served on its open keep-alive connections while the server drained them
        os.killpg(services.mlflow_pid(server_dir), signal.SIGKILL)
        services.stop_mlflow(server_dir)  # reaps it and forgets its pid
        stdout, stderr = running.communicate(timeout=600)
        assert running.returncode != 0 and "Traceback" not in stderr
        failed = [t for t in study.get_trials() if t.state == TrialState.FAIL]
        assert failed and all("MLflow" in t.user_attrs["fail_reason"] or "127.0.0.1" in t.user_attrs["fail_reason"]
                              or "Connection" in t.user_attrs["fail_reason"] for t in failed), \
            [t.user_attrs.get("fail_reason") for t in failed]

        services.start_mlflow_server(server_dir, port, backend)  # back again
        again = bench(*args, env=env)
        assert again.returncode == 0, again.stderr
        states, runs = coverage("lost", f"sqlite:///{tmp_path / 'optuna.db'}", uri)
        assert all(s.count(TrialState.COMPLETE) == 1 for s in states.values()) and len(states) == 6
        assert all(r.info.status != "RUNNING" for rs in runs.values() for r in rs)
        assert all([r.info.status for r in rs].count("FINISHED") == 1 for rs in runs.values())
    finally:
        services.stop_mlflow(server_dir)


def _read_or_empty(path: Path) -> bytes:
    with contextlib.suppress(OSError):  # a process that ended meanwhile
        return path.read_bytes()
    return b""


@needs_postgres
def test_passwords_in_urls_never_leak(servers, tmp_path):
    password = servers.password
    env = {STORAGE_ENV: servers.storage, TRACKING_ENV: servers.tracking_uri}
    spec = write_spec(tmp_path, "secret", epochs=1)
    spec.write_text(spec.read_text().replace('objective = "val/bce"',
                                             f'objective = "val/bce"\nstorage = "{servers.storage}"'))
    done = bench("sweep", str(spec), "--workers", "2", "--results", str(tmp_path), env=env)
    assert done.returncode == 0, done.stderr
    wrong = servers.storage.replace(password, "not-the-password-4711")
    refused = bench("sweep", str(spec), "--storage", wrong, "--results", str(tmp_path), env=env)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "***" in refused.stderr
    printed = done.stdout + done.stderr + refused.stdout + refused.stderr
    assert password not in printed and "not-the-password-4711" not in printed

    study = optuna.load_study(study_name="secret", storage=queue.open_storage(servers.storage))
    attrs = json.dumps([study.user_attrs] + [t.user_attrs for t in study.get_trials()] +
                       [t.system_attrs for t in study.get_trials()], default=str)
    assert password not in attrs
    client = tracking.connect(servers.tracking_uri)
    exp_id = client.get_experiment_by_name("secret").experiment_id
    for run in client.search_runs([exp_id]):
        assert password not in json.dumps([run.data.params, run.data.tags], default=str)
    for path in (tmp_path / "reports").rglob("*"):
        if path.is_file() and path.suffix in (".md", ".html", ".csv", ".tex"):
            assert password not in path.read_text(errors="ignore"), path
    assert [str(cmdline) for cmdline in Path("/proc").glob("[0-9]*/cmdline")  # what `ps` shows every user
            if password.encode() in _read_or_empty(cmdline)] == []
