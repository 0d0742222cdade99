"""Studies on Optuna: one coordinator enqueues every missing cell, workers only take queued
trials, so each cell runs exactly once whatever the number of workers (GridSampler repeats
cells under parallel workers). Re-running a spec resumes: a cell is done when it has a
COMPLETE (or, when searching, PRUNED) trial; failed or interrupted cells are enqueued again.

Storage and tracking locations come from one place: the spec, else a flag, else the defaults
`sqlite:///<results>/optuna.db` and `sqlite:///<results>/mlflow.db`. Many machines share a
study by pointing `bench worker` at the same PostgreSQL storage and MLflow server.
"""

from __future__ import annotations

import contextlib
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
from bench.data import auto_dataset, load_dataset
from bench.errors import BenchError, StudyError
from bench.spec import StudySpec, load_spec, parse_spec
from bench.trial import run_tracked

SPEC_HASH = "spec_sha256"
# a coordinator hands its worker processes the two URLs here, never on a command line
WORKER_STORAGE_ENV, WORKER_TRACKING_ENV = "VAEBENCH_WORKER_STORAGE", "VAEBENCH_WORKER_TRACKING_URI"


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


# ---------------------------------------------------------------- locations and Optuna objects

def storage_url(spec: StudySpec, results: str | Path, storage: str | None = None) -> str:
    """--storage, else the spec's, else $VAEBENCH_STORAGE, else sqlite under `results`."""
    return storage or spec.storage or locations.default_storage(results)


def tracking_uri(spec: StudySpec, results: str | Path, uri: str | None = None) -> str:
    """--tracking-uri, else the spec's, else $VAEBENCH_TRACKING_URI, else sqlite under `results`."""
    return uri or spec.tracking_uri or locations.default_tracking(results)


def sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    name = spec.search.sampler if spec.search else "random"
    seed = spec.seeds[0]
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed)}[name]()


def pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    name = spec.search.pruner if spec.search else "none"
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs),
            "none": optuna.pruners.NopPruner}[name]()


def open_study(spec: StudySpec, storage, create: bool) -> optuna.Study:
    kwargs = dict(study_name=spec.name, storage=storage, sampler=sampler(spec), pruner=pruner(spec))
    if create:
        return optuna.create_study(direction=spec.direction, load_if_exists=True, **kwargs)
    try:
        return optuna.load_study(**kwargs)
    except KeyError:
        raise StudyError(f"no study {spec.name!r} in this storage yet: run `bench sweep SPEC` once "
                         "(it creates the study and queues its cells), then start workers") from None


def resolve(spec: StudySpec) -> StudySpec:
    return spec.with_dataset(auto_dataset()) if spec.dataset == "auto" else spec


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
    exp_id = tracking.experiment_id(client, spec.name, {"vaebench.spec_sha256": spec.sha256})
    parent = tracking.study_run(client, exp_id, spec.name, {"vaebench.spec": spec.path or "<dict>",
                                                              "vaebench.dataset": spec.dataset})
    # the dataset's rows in the store, made here once: concurrent first logs of one dataset
    # from several workers collide on MLflow's unique key
    tracking.log_dataset(client, parent, load_dataset(spec.dataset, spec.binarize))
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    tracking.fail_orphaned_runs(client, exp_id, spec.name, running)
    queue.queue_missing(spec, study)  # refuses a changed spec before the study records it
    study.set_user_attr(SPEC_HASH, spec.sha256)
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


# ---------------------------------------------------------------- workers

def run_worker(spec: StudySpec, *, results: str | Path, storage: str | None = None,
               tracking_uri_: str | None = None, worker: int = 1, threads: int | None = None,
               progress: bool = True, stack: int | None = None) -> int:
    """Take queued trials of the study until none is left, up to `stack` compatible ones at a
    time trained as one stack (default: DEFAULT_STACK for the device); returns how many this
    worker ran."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    spec = resolve(spec)
    storage = storage or os.environ.get(WORKER_STORAGE_ENV)  # from a coordinator's _run_processes
    tracking_uri_ = tracking_uri_ or os.environ.get(WORKER_TRACKING_ENV)
    url, uri = storage_url(spec, results, storage), tracking_uri(spec, results, tracking_uri_)
    storage = queue.open_storage(url)
    study = open_study(spec, storage, create=False)
    recorded = study.user_attrs.get(SPEC_HASH)
    if recorded and recorded != spec.sha256:
        raise StudyError(f"study {spec.name!r} was queued from a different spec (sha256 {recorded[:12]}, "
                         f"this one {spec.sha256[:12]}); run workers with the coordinator's spec file")
    data = load_dataset(spec.dataset, spec.binarize)
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, spec.name)
    parent = tracking.study_run(client, exp_id, spec.name)
    total = len(queue.slots(spec))
    stack = stack or default_stack(spec)
    ran = 0
    while trials := claim(spec, study, stack):
        started = time.perf_counter()
        with contextlib.ExitStack() as beats:
            for trial in trials:
                trial.set_user_attr(queue.WORKER, f"{platform.node()}:{os.getpid()}")
                beats.enter_context(queue.Heartbeat(storage, trial))
            ended = _run_trials(spec, study, trials, data, client, exp_id, parent, results,
                                worker if progress else None)
        ran += len(trials)
        if progress:
            for trial, (state, value) in zip(trials, ended):
                _report_progress(spec, study, trial, state, value, time.perf_counter() - started, total, worker)
    return ran


# Trials per stack when a worker is not told (--stack). CPU 1: measured by `bench perf` on the
# 2-core machine (README, Performance), the default study is no faster stacked (1.03x: its
# trials spend half their time outside training, and one thread per worker gains little).
# CUDA 16 is not measured yet (no GPU lent so far): many small models fill a GPU one cannot.
DEFAULT_STACK = {"cpu": 1, "cuda": 16, "mps": 1}


def default_stack(spec: StudySpec) -> int:
    from bench.train import resolve_device

    return DEFAULT_STACK.get(resolve_device(spec.config(spec.cells()[0]).device).type, 1)


def claim(spec: StudySpec, study: optuna.Study, stack: int = 1) -> list:
    """Up to `stack` queued trials that can train as one stack (equal `stack_key`s; grid
    studies only, since a search samples its trials' configs as they start), claimed
    atomically one by one; [] when none is queued."""
    from bench.stack import stack_key

    first = queue.take_queued(study)
    if first is None:
        return []
    trials = [first]
    if stack <= 1 or spec.search is not None:
        return trials
    key = stack_key(spec.config(spec.cell(first.user_attrs[queue.CELL])))
    if key is None:
        return trials
    fits = lambda frozen: stack_key(spec.config(spec.cell(frozen.user_attrs[queue.CELL]))) == key  # noqa: E731
    while len(trials) < stack and (trial := queue.take_queued(study, accept=fits)) is not None:
        trials.append(trial)
    return trials


EPOCH_LINE_S = 60  # a long trial prints a progress line at most this often (logs of long runs)


def _run_trials(spec, study, trials, data, client, exp_id, parent, results, worker: int | None = None):
    """Train claimed trials (one solo, several as a stack); tell Optuna how each ended.
    Returns (state, value) per trial. Ctrl-C fails them all as interrupted and propagates."""
    from bench.trial import TrackedTrial, run_tracked_stack

    opened, ended = [], {}
    try:
        for trial in trials:
            try:  # inside: a lost tracking server fails this trial with the reason, not the worker
                cfg, kwargs = _trial_setup(spec, trial, client, exp_id, parent, results, worker)
                if len(trials) == 1:
                    outcome = run_tracked(cfg, data, **kwargs, stop_exceptions=(optuna.TrialPruned,), progress=False)
                else:
                    opened.append((trial, TrackedTrial(cfg, data, **kwargs)))
                    continue
            except Exception as e:  # noqa: BLE001 - this trial fails; a stack goes on without it
                outcome = e
            ended[trial.number] = _tell(spec, study, trial, outcome)
        if opened:
            outcomes = run_tracked_stack([t for _, t in opened], stop_exceptions=(optuna.TrialPruned,))
            for (trial, _), outcome in zip(opened, outcomes):
                ended[trial.number] = _tell(spec, study, trial, outcome)
    except BaseException:
        for trial in trials:
            if trial.number not in ended:
                trial.set_user_attr(queue.REASON, "interrupted")
                study.tell(trial, state=TrialState.FAIL)
        raise
    return [ended[t.number] for t in trials]


def _trial_setup(spec, trial, client, exp_id, parent, results, worker):
    """The trial's config (its cell, plus what a search samples) and run_tracked's arguments."""
    cell = spec.cell(trial.user_attrs[queue.CELL])
    for name, values in spec.grid:
        trial.suggest_categorical(name, list(values))
    trial.suggest_categorical("seed", list(spec.seeds))
    sampled = {d.name: d.suggest(trial) for d in spec.search.params} if spec.search else {}
    cfg = spec.config(cell, **sampled)
    prune = spec.search is not None and spec.search.pruner != "none"
    last_line = time.monotonic()

    def on_epoch(epoch, metrics, model):
        nonlocal last_line
        if worker is not None and time.monotonic() - last_line >= EPOCH_LINE_S:
            last_line = time.monotonic()
            print(f"[worker {worker}] trial {trial.number} {cell.key}: epoch {epoch}/{cfg.epochs} · "
                  f"{spec.objective} {metrics[spec.objective]:.2f} · {metrics['samples_per_s']:,.0f} samples/s · "
                  f"{time.strftime('%H:%M:%S')}", flush=True)
        if prune:
            trial.report(metrics[spec.objective], step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{spec.objective} = {metrics[spec.objective]:.4g} at epoch {epoch}")

    tags = {tracking.STUDY: spec.name, tracking.TRIAL: trial.number, tracking.CELL: cell.key,
            "vaebench.grid_key": cell.grid_key, "vaebench.slot": trial.user_attrs.get(queue.SLOT, 0),
            "vaebench.objective": f"{spec.objective} ({spec.direction}) of the epoch chosen by validation",
            "vaebench.objective_metric": spec.objective, "vaebench.objective_direction": spec.direction,
            "vaebench.spec_sha256": spec.sha256, "optuna.study": spec.name, "optuna.trial": trial.number}
    resume = resumable(client, exp_id, spec, cell, trial.user_attrs.get(queue.SLOT, 0), cfg, results)
    return cfg, dict(client=client, exp_id=exp_id, parent_run_id=parent, results=results,
                     run_name=f"{trial.number:04d} {cell.key}", tags=tags, on_epoch=on_epoch, resume_run_id=resume)


def _tell(spec, study, trial, outcome) -> tuple:
    """Record how the trial ended in Optuna: COMPLETE with the objective at the epoch
    validation chose, PRUNED, or FAIL with the reason."""
    if isinstance(outcome, optuna.TrialPruned):
        trial.set_user_attr(queue.REASON, f"pruned: {outcome}")
        study.tell(trial, state=TrialState.PRUNED)
        return TrialState.PRUNED, None
    if isinstance(outcome, Exception):
        reason = str(outcome).splitlines()[0][:1000] if str(outcome) else type(outcome).__name__
        reason = reason if isinstance(outcome, BenchError) else f"{type(outcome).__name__}: {reason}"
        trial.set_user_attr(queue.REASON, reason)
        study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL, reason
    best = outcome.result.history[outcome.result.best_epoch - 1]
    value = best[spec.objective]
    trial.set_user_attr("run_id", outcome.run_id)
    for name, metric in outcome.metrics.items():
        trial.set_user_attr(name, metric)
    study.tell(trial, value)
    return TrialState.COMPLETE, value


def resumable(client, exp_id: str, spec: StudySpec, cell, slot: int, cfg, results) -> str | None:
    """The run of an earlier, unfinished attempt at (cell, slot) whose saved training state
    matches `cfg`: the retried trial continues it instead of starting at epoch 1."""
    from bench.train import STATE_FILE, load_state

    run_id = tracking.resumable_run(client, exp_id, spec.name, cell.key, slot)
    if run_id is None:
        return None
    path = Path(results) / "checkpoints" / run_id / STATE_FILE
    try:
        return run_id if load_state(path, cfg) is not None else None
    except Exception:  # noqa: BLE001 - an unreadable state is not resumed from, never fatal
        return None


def _report_progress(spec, study, trial, state, value, seconds, total, worker):
    done = len(study.get_trials(deepcopy=False, states=queue.DONE_STATES))
    finished = study.get_trials(deepcopy=False, states=queue.DONE_STATES + (TrialState.FAIL,))
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in finished
                 if t.datetime_complete and t.datetime_start]
    mean = sum(durations) / len(durations) if durations else seconds
    workers = max(1, len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) + 1)
    eta = max(0, total - done) * mean / workers
    what = f"{spec.objective} {value:.2f}" if state == TrialState.COMPLETE else state.name
    if state == TrialState.FAIL:
        what = f"FAILED: {str(value).splitlines()[0][:120]}"
    print(f"[worker {worker}] {done}/{total} done · trial {trial.number} {trial.user_attrs[queue.CELL]} · "
          f"{what} · {seconds:.1f} s · ETA {_duration(eta)}", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


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
        saved = json.loads(path.read_text())
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
        key = (t.user_attrs.get(queue.CELL), t.user_attrs.get(queue.SLOT, 0))
        if t.state in queue.DONE_STATES:
            done_keys.add(key)
        elif t.state == TrialState.FAIL:
            failures[key] = t.user_attrs.get(queue.REASON, "failed")
    slots = queue.slots(spec)
    failed = [(k, failures[(k, s)]) for k, s, _ in slots if (k, s) not in done_keys and (k, s) in failures]
    result = StudyOutcome(spec.name, spec.name, spec.dataset, url, uri, len(spec.cells()), len(slots),
                          sum(1 for k, s, _ in slots if (k, s) in done_keys), failed, trained, seconds)
    result.summary = comparison(spec, trials)
    if trained < 0:  # worker processes: the trials that finished during this call
        since = time.time() - seconds
        result.trained_now = sum(1 for t in trials if t.datetime_complete and t.datetime_complete.timestamp() >= since)
    return result


def comparison(spec: StudySpec, trials) -> str:
    """The top-line table: mean ± std over seeds of the objective and test metrics per cell."""
    import pandas as pd

    rows = []
    for t in trials:
        if t.state != TrialState.COMPLETE:
            continue
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
