"""Studies on Optuna: one coordinator enqueues every missing cell, workers only take queued
trials, so each cell runs exactly once whatever the number of workers (GridSampler repeats
cells under parallel workers). Re-running a spec resumes: a cell is done when it has a
COMPLETE (or, when searching, PRUNED) trial; failed or interrupted cells are enqueued again.

This module is the coordinator (prepare the study, start local workers, sum up the outcome);
`bench.worker` claims and trains trials, `bench.study` says where a study lives. Many machines
share a study by pointing `bench worker` at the same PostgreSQL storage and MLflow server.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bench import locations, queue, tracking
from bench.data import load_dataset
from bench.errors import SpecError, StudyError
from bench.spec import StudySpec, canonical_key, load_spec, parse_spec
from bench.study import (SPEC_HASH, WORKER_STORAGE_ENV, WORKER_TRACKING_ENV, open_study,  # noqa: F401
                         resolve, storage_url, tracking_uri)
from bench.worker import DEFAULT_STACK, run_worker  # noqa: F401


@dataclass
class StudyOutcome:
    study: str
    experiment: str
    dataset: str
    storage: str
    tracking_uri: str
    cells: int
    trials: int                  # trials the study should hold when done (cells x trials per cell)
    done: int                    # of those, COMPLETE or PRUNED
    failed: list[tuple[str, str]] = field(default_factory=list)   # (cell, reason) not yet done
    trained_now: int = 0
    seconds: float = 0.0
    summary: str = ""
    experiment_id: str = ""


# ---------------------------------------------------------------- the coordinator

def prepare(spec: StudySpec, storage_url_: str, tracking_uri_: str,
            restart: bool = False) -> tuple[optuna.Study, str, str]:
    """Create (or reopen) the study, the MLflow experiment and the study's parent run, fail what
    crashed workers left running, and queue the missing cells. Runs in one process first,
    before any worker, since creating a new store from several processes at once crashes.
    `restart` first deletes the study's trials and its MLflow runs (a spec changed on purpose)."""
    storage = queue.open_storage(storage_url_)
    client = tracking.connect(tracking_uri_)
    if restart:
        _delete_study(spec, storage, client)
    study = open_study(spec, storage, create=True)
    queue.fail_stale(study, storage)
    exp_id = tracking.experiment_id(client, spec.name)
    parent = tracking.study_run(client, exp_id, spec.name)  # its spec tags: below, once the queue accepts it
    # the dataset's rows in the store, made here once: concurrent first logs of one dataset
    # from several workers collide on MLflow's unique key
    tracking.log_dataset(client, parent, load_dataset(spec.dataset, spec.binarize))
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    tracking.fail_orphaned_runs(client, exp_id, spec.name, running)
    queue.queue_missing(spec, study)  # refuses a changed spec before the study records it
    study.set_user_attr(SPEC_HASH, spec.sha256)
    # the spec and code now in charge (after --restart, another file): the report names them
    tracking.set_tags(client, parent, {"vaebench.spec": spec.path or "<dict>", "vaebench.dataset": spec.dataset,
                                       **tracking.environment_tags()})
    client.set_experiment_tag(exp_id, "vaebench.spec_sha256", spec.sha256)
    study.set_user_attr("spec", locations.redact(json.dumps(spec.to_dict())))
    study.set_user_attr("dataset", spec.dataset)
    return study, exp_id, parent


def _delete_study(spec: StudySpec, storage, client) -> None:
    """Delete the Optuna study and mark its MLflow trial runs deleted (kept in the store's
    trash, out of every report)."""
    try:
        optuna.delete_study(study_name=spec.name, storage=storage)
    except KeyError:
        pass
    found = client.get_experiment_by_name(spec.name)
    if found is not None and found.lifecycle_stage == "active":
        for run in tracking.trial_runs(client, found.experiment_id, spec.name):
            client.delete_run(run.info.run_id)


# ---------------------------------------------------------------- the whole study

def run_study(spec: StudySpec, *, results: str | Path = "results", workers: int = 1,
              storage: str | None = None, tracking_uri_: str | None = None,
              progress: bool = True, restart: bool = False, stack: int | None = None) -> StudyOutcome:
    """Prepare the study, run `workers` local worker processes (in this process for 1; none for
    0, which only queues the cells for `bench worker`s) until the queue is empty, and return
    what the study holds."""
    started = time.perf_counter()
    spec = resolve(spec)
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    url, uri = storage_url(spec, results, storage), tracking_uri(spec, results, tracking_uri_)
    study, exp_id, parent = prepare(spec, url, uri, restart=restart)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if progress:
        total = len(queue.slots(spec))
        print(f"study {spec.name!r} on {spec.dataset} ({spec.binarize}): {total} trials, "
              f"{total - waiting} already done or running, {waiting} to train with {workers} "
              f"worker(s)\n  optuna: {url}\n  mlflow: {uri}", flush=True)
    trained = 0
    client = tracking.connect(uri)
    try:
        if workers == 0:  # coordinator only: queue the cells for `bench worker` processes elsewhere
            pass
        elif waiting and workers == 1:
            trained = run_worker(spec, results=results, storage=url, tracking_uri_=uri, progress=progress, stack=stack)
        elif waiting:
            trained = _run_processes(spec, results, url, uri, min(workers, waiting), stack)
    except BaseException:  # Ctrl-C or a failed worker: the study's run ends too, never left RUNNING
        tracking.quietly(tracking.end_run, client, parent, "KILLED", "the study was interrupted; run it again to resume")
        raise
    try:
        tracking.end_run(client, parent, "FINISHED")
    except Exception as e:  # noqa: BLE001 - the tracking server went away: the study's numbers stand
        print(locations.redact(f"warning: could not end the study's MLflow run ({str(e).splitlines()[0][:200]}); "
                               "the next run does"), file=sys.stderr)
    result = outcome(spec, url, uri, trained, time.perf_counter() - started)
    result.experiment_id = exp_id
    return result


def _run_processes(spec: StudySpec, results: Path, url: str, uri: str, workers: int, stack: int | None = None) -> int:
    """K `bench worker` processes with cores // K torch threads each (no oversubscription)."""
    spec_file = results / f".{spec.name}.spec.json"
    spec_file.write_text(json.dumps({"spec": spec.to_dict(), "path": spec.path, "sha256": spec.sha256}))
    spec_file.chmod(0o600)
    threads = max(1, (os.cpu_count() or 1) // workers)
    # the URLs travel in the environment, not on command lines that `ps` shows with their passwords
    env = {**os.environ, WORKER_STORAGE_ENV: url, WORKER_TRACKING_ENV: uri}
    procs = [subprocess.Popen([sys.executable, "-m", "bench", "worker", str(spec_file), "--results", str(results),
                               "--threads", str(threads), "--worker-id", str(i + 1),
                               *(["--stack", str(stack)] if stack else [])], env=env)
             for i in range(workers)]
    try:
        codes = _wait_with_bar(spec, url, procs)
    except KeyboardInterrupt:
        # On a terminal the workers got the same SIGINT and are failing their trials now; a
        # second signal could cut that short, so forward it only to those still running later.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        _end_orphaned_runs(spec, url, uri, {f"{platform.node()}:{p.pid}" for p in procs})
        raise
    if any(codes):
        raise StudyError(f"{sum(1 for c in codes if c)} of {workers} workers exited with an error "
                         "(see above); run the same command again to resume")
    return -1  # the processes ran the trials: `outcome` counts them from the storage


def _end_orphaned_runs(spec: StudySpec, url: str, uri: str, workers: set[str]) -> None:
    """A worker interrupted mid-write may fail to end its run (sqlite stays locked until that
    write is undone); once every local worker has exited, end as KILLED the runs of the trials
    they held that are still RUNNING. Trials of workers elsewhere are left to them."""
    try:
        study = open_study(spec, queue.open_storage(url), create=False)
        held = {str(t.number) for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.user_attrs.get(queue.WORKER) in workers}
        client = tracking.connect(uri)
        exp = client.get_experiment_by_name(spec.name)
        for run in tracking.trial_runs(client, exp.experiment_id, spec.name) if exp and held else ():
            if run.info.status == "RUNNING" and run.data.tags.get(tracking.TRIAL) in held:
                tracking.end_run(client, run.info.run_id, "KILLED", "interrupted by the user")
    except Exception:  # noqa: BLE001 - the store itself failed: the next run marks these runs
        pass


def _wait_with_bar(spec: StudySpec, url: str, procs: list) -> list[int]:
    """Wait for the worker processes; on a terminal, a tqdm bar of the study's trials done of
    all (with its ETA), read from the storage every few seconds. Off a terminal, the workers'
    own lines are the progress."""
    if not sys.stderr.isatty():
        return [p.wait() for p in procs]
    from tqdm.auto import tqdm

    study = open_study(spec, queue.open_storage(url), create=False)
    total = len(queue.slots(spec))

    def done() -> int:
        return len(study.get_trials(deepcopy=False, states=queue.DONE_STATES))

    with tqdm(total=total, initial=done(), unit="trial", desc=f"study {spec.name}", dynamic_ncols=True) as bar:
        while any(p.poll() is None for p in procs):
            time.sleep(2)
            bar.update(done() - bar.n)
    return [p.wait() for p in procs]


def load_any_spec(path: str | Path) -> StudySpec:
    """A TOML spec, or the JSON snapshot a coordinator hands to its worker processes."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            saved = json.loads(path.read_text())
        except ValueError:  # not JSON (or not UTF-8)
            saved = None
        valid = isinstance(saved, dict) and isinstance(saved.get("spec"), dict)
        if not (valid and isinstance(saved.get("sha256"), str)):
            raise SpecError(f"{path} is not a spec snapshot a coordinator wrote (.<study>.spec.json): give "
                            "the study's TOML spec instead")
        spec = parse_spec(saved["spec"], source=saved.get("path") or str(path))
        return spec if spec.sha256 == saved["sha256"] else _with_hash(spec, saved)
    return load_spec(path)


def _with_hash(spec: StudySpec, saved: dict) -> StudySpec:
    import dataclasses

    return dataclasses.replace(spec, path=saved.get("path") or spec.path, sha256=saved["sha256"])


def outcome(spec: StudySpec, url: str, uri: str, trained: int = 0, seconds: float = 0.0) -> StudyOutcome:
    study = open_study(spec, queue.open_storage(url), create=False)
    trials = study.get_trials(deepcopy=False)
    done_keys, failures = set(), {}
    for t in trials:
        key = (canonical_key(t.user_attrs.get(queue.CELL)), t.user_attrs.get(queue.SLOT, 0))
        if t.state in queue.DONE_STATES:
            done_keys.add(key)
        elif t.state == TrialState.FAIL:
            failures[key] = t.user_attrs.get(queue.REASON, "failed")
    slots = queue.slots(spec)
    slots = [(k, canonical_key(k), s) for k, s, _ in slots]
    failed = [(k, failures[(c, s)]) for k, c, s in slots if (c, s) not in done_keys and (c, s) in failures]
    result = StudyOutcome(spec.name, spec.name, spec.dataset, url, uri, len(spec.cells()), len(slots),
                          sum(1 for _, c, s in slots if (c, s) in done_keys), failed, trained, seconds)
    result.summary = comparison(spec, trials)
    if trained < 0:  # worker processes: the trials that finished during this call
        since = time.time() - seconds
        result.trained_now = sum(1 for t in trials if t.datetime_complete and t.datetime_complete.timestamp() >= since)
    return result


def comparison(spec: StudySpec, trials) -> str:
    """The top-line table: mean ± std over seeds of the objective and test metrics per cell; of a
    search's trials in a cell, the best by the objective stands for it (as in the report)."""
    import pandas as pd

    best = {}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            key = canonical_key(t.user_attrs.get(queue.CELL, t.number))
            if key not in best or (t.value > best[key].value) == (spec.direction == "maximize"):
                best[key] = t
    rows = []
    for t in best.values():
        row = {name: value for name, value in t.params.items() if name != "seed" and name in dict(spec.grid)}
        row.update({"objective": t.value, **{k: v for k, v in t.user_attrs.items() if k.startswith("test/")}})
        rows.append(row)
    if not rows:
        return "no completed trials yet"
    df = pd.DataFrame(rows)
    keys = [name for name, _ in spec.grid] or ["all"]
    if keys == ["all"]:
        df["all"] = "all"
    metrics = [m for m in ("objective", "test/elbo", "test/nll", "test/bce", "test/mse") if m in df]
    grouped = df.groupby(keys, sort=False)[metrics]
    mean, std, n = grouped.mean(), grouped.std(), grouped.count()
    table = mean.copy().astype(object)
    for m in metrics:
        table[m] = [("—" if math.isnan(a) else f"{a:.2f} ± {0 if math.isnan(s) else s:.2f}")
                    for a, s in zip(mean[m], std[m])]
    table["n"] = n[metrics[0]]
    table = table.rename(columns={"objective": spec.objective})
    return table.to_string()
