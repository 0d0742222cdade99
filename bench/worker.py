"""A worker: claim queued trials of a study (one, or up to G compatible ones trained as one
stack), beat for each while it trains, train and track it, and tell Optuna how it ended.
Many workers on many machines share one study through its storage; none of them queues."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bench import queue, tracking
from bench.data import load_dataset
from bench.errors import BenchError, StudyError
from bench.spec import StudySpec
from bench.study import (SPEC_HASH, WORKER_STORAGE_ENV, WORKER_TRACKING_ENV, open_study, resolve, sampler,
                         storage_url, tracking_uri)
from bench.trial import run_tracked

def run_worker(spec: StudySpec, *, results: str | Path, storage: str | None = None,
               tracking_uri_: str | None = None, worker: int = 1, threads: int | None = None,
               progress: bool = True, stack: int | None = None) -> int:
    """Take queued trials of the study until none is left, up to `stack` compatible ones at a
    time trained as one stack (default: DEFAULT_STACK for the device); returns how many this
    worker ran."""
    if threads:
        limit_threads(threads)
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
        if spec.search is not None:  # a search trial samples as it starts, from a stream of its own
            study.sampler = sampler(spec, trials[0].number)
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


def limit_threads(threads: int):
    """`threads` for torch and for every native thread pool (numpy's BLAS, OpenMP): with two
    BLAS threads per worker on two cores, a 1 ms SVD took 235 ms while the other worker trained
    (measured). Returns threadpoolctl's limiter (`restore_original_limits()` undoes it)."""
    import torch
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    torch.set_num_threads(threads)
    return threadpool_limits(threads)


# Trials per stack when a worker is not told (--stack). CPU 1: measured by `bench perf` on the
# 2-core machine (README, Performance), the default study is no faster stacked (1.02x on two days:
# its trials spend 43 % of their time outside training, and one thread per worker gains little).
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
            if trial.number in ended:
                continue
            if (done := _finished_run(spec, client, exp_id, trial)) is not None:
                run_id, value, metrics = done  # its run ended FINISHED just before Ctrl-C: failing
                for name, metric in {"run_id": run_id, **metrics}.items():  # it would train the cell again
                    trial.set_user_attr(name, metric)
                study.tell(trial, value)
                continue
            trial.set_user_attr(queue.REASON, "interrupted")
            study.tell(trial, state=TrialState.FAIL)
        raise
    return [ended[t.number] for t in trials]


def _finished_run(spec, client, exp_id, trial) -> tuple[str, float, dict] | None:
    """(run id, objective at the epoch validation chose, test metrics) of the trial's run if it
    ended FINISHED: what `_tell` records of a trial that completed."""
    found = client.search_runs([exp_id], filter_string=f"tags.`{tracking.STUDY}` = '{spec.name}' and "
                               f"tags.`{tracking.TRIAL}` = '{trial.number}' and attributes.status = 'FINISHED'")
    if not found or "vaebench.best_epoch" not in found[0].data.tags:
        return None
    run, best = found[0], int(found[0].data.tags["vaebench.best_epoch"])
    values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, spec.objective)}
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    return (run.info.run_id, values[best], metrics) if best in values else None


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
