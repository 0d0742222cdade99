"""The study's queue on an Optuna storage: which (cell, slot) trials a study must hold, which
are missing and get queued, which a dead worker left RUNNING, and how a worker claims a queued
trial and beats while it trains. Everything here decides whether a cell runs exactly once."""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bench import locations
from bench.errors import StudyError
from bench.spec import StudySpec, canonical_key

optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats and fail_stale_trials are marked experimental; we rely on them knowingly
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# A running trial beats this often, and is failed (then retried, resuming from its saved state)
# once silent this long; the environment may shorten both (the recovery tests do).
HEARTBEAT_S = locations.env_seconds("VAEBENCH_HEARTBEAT_S", 20)
GRACE_S = locations.env_seconds("VAEBENCH_GRACE_S", 60)
CELL, SLOT, ATTEMPT, REASON = "cell", "slot", "attempt", "fail_reason"
IDENTITY = "identity"  # JSON of everything that shapes the cell's runs (see `identity`)
BEAT = "heartbeat"     # wall-clock time of the last beat, where the storage has no heartbeats
WORKER = "worker"      # host:pid of the process that claimed the trial
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def open_storage(url: str):
    """An Optuna storage for `url`: RDB (sqlite, postgresql, mysql) with heartbeats, or a
    journal file for `journal:PATH`."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    locations.check_driver(url, "Optuna storage")
    locations.check_not_the_other_store(url, "Optuna storage")
    path = locations.sqlite_path(url)
    kwargs = {"engine_kwargs": {"pool_pre_ping": True} if path is None else {"connect_args": {"timeout": 60}}}
    try:
        locations.ensure_parent(url)
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **kwargs)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy raises many kinds; one line is enough
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = (f"check that {path.parent} is a writable directory (--results)" if path is not None else
                "check the URL (--storage) and that the database server is running")
        raise StudyError(locations.redact(f"cannot open Optuna storage {url}: {first}; {hint}")) from None
    if path is not None:
        _begin_immediate(storage.engine)
    return storage


def _begin_immediate(engine) -> None:
    """Make each SQLite transaction take the write lock as it begins. pysqlite starts a
    transaction only at the first write, so Optuna's claim of a WAITING trial (read its state,
    then set RUNNING) lets two workers read WAITING and both claim it: measured, 14 of 200
    claims doubled by 4 processes. SQLAlchemy's recipe for pysqlite transactions fixes it."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN of its own

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners would bypass them


def slots(spec: StudySpec) -> list[tuple[str, int, dict]]:
    """(cell key, slot, grid params) of every trial the finished study holds."""
    return [(cell.key, slot, cell.as_dict()) for cell in spec.cells() for slot in range(spec.trials_per_cell)]


def identity(spec: StudySpec, cell) -> dict:
    """Everything that shapes a cell's runs: its whole RunConfig (fixed fields, epochs, dataset,
    binarisation, seed), the objective and the search space. Two trials of a cell with different
    identities are different experiments and never stand in for each other."""
    search = spec.to_dict().get("search")
    return {"config": spec.config(cell).to_dict(), "objective": spec.objective, "direction": spec.direction,
            "search": search}


def identity_changes(old: dict, new: dict) -> list[str]:
    """What differs between two identities, as `name: old -> new`. A config field missing from
    `old` (added to RunConfig since) counts as its default, which keeps the old behaviour."""
    from bench.config import RunConfig, config_changes

    changed = config_changes(old.get("config", {}), RunConfig.from_dict(new["config"]))
    changes = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()]
    changes += [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in ("objective", "direction", "search")
                if old.get(k) != new[k]]
    return changes


def queue_missing(spec: StudySpec, study: optuna.Study) -> tuple[int, int]:
    """Enqueue every (cell, slot) without a done, waiting or running trial. Returns
    (number enqueued, number already done). Refuses (StudyError) when a done trial was trained
    under other values than the spec's now: see `identity`."""
    trials = study.get_trials(deepcopy=False)
    by_slot: dict[tuple[str, int], list] = {}
    for t in trials:  # keyed whatever the order of the axes the trial was queued under
        by_slot.setdefault((canonical_key(t.user_attrs.get(CELL)), t.user_attrs.get(SLOT, 0)), []).append(t)
    enqueued = done = 0
    spec_cells = {cell.key: cell for cell in spec.cells()}
    for key, slot, params in slots(spec):
        current = identity(spec, spec_cells[key])
        slot_trials = by_slot.get((canonical_key(key), slot), [])
        for t in slot_trials:
            old = json.loads(t.user_attrs[IDENTITY]) if IDENTITY in t.user_attrs else None
            if old is not None and t.state != TrialState.FAIL and (changes := identity_changes(old, current)):
                raise StudyError(f"study {spec.name!r} already holds cell {key} trained with other values "
                                 f"({'; '.join(changes[:4])}); give the changed spec a new [study] name, or "
                                 "pass --restart to delete this study's trials and runs and start over")
        states = [t.state for t in slot_trials]
        if any(s in DONE_STATES for s in states):
            done += 1
            continue
        if any(s in (TrialState.WAITING, TrialState.RUNNING) for s in states):
            continue
        study.enqueue_trial(params=params, user_attrs={CELL: key, SLOT: slot, ATTEMPT: len(states) + 1,
                                                       IDENTITY: json.dumps(current, sort_keys=True)},
                            skip_if_exists=False)
        enqueued += 1
    return enqueued, done


def fail_stale(study: optuna.Study, storage) -> int:
    """Fail the RUNNING trials whose worker died: silent for GRACE_S. RDB storages through
    Optuna's heartbeats; storages without them (journal files) through the wall-clock beat each
    worker writes into its trial's system attributes. Returns how many were failed."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if _heartbeats(storage):
        optuna.storages.fail_stale_trials(study)
        still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        return sum(1 for t in running if t.number not in still)
    failed = 0
    for t in running:
        beat = t.system_attrs.get(BEAT, t.datetime_start.timestamp() if t.datetime_start else 0.0)
        if time.time() - beat > GRACE_S:
            try:
                failed += bool(storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL))
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    return failed


def _heartbeats(storage) -> bool:
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def take_queued(study: optuna.Study, accept=None) -> optuna.Trial | None:
    """Atomically claim a WAITING trial (never create one; only one `accept(frozen)` takes
    when given): the storage refuses the claim when another worker got there first."""
    storage = study._storage
    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        if accept is not None and not accept(frozen):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        if _heartbeats(storage):  # beat before the claim: a worker killed right after it left a
            storage.record_heartbeat(trial_id)  # RUNNING trial without beats, which Optuna never fails
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


class Heartbeat:
    """Beats for the trial while it trains, so a killed worker's trial is failed and retried by
    the next coordinator: Optuna's heartbeat on RDB storages, else a wall-clock time in the
    trial's system attributes (journal files), which `fail_stale` reads. `storage` is the one
    the worker opened, not `study._storage` (Optuna's caching wrapper around it)."""

    def __init__(self, storage, trial: optuna.Trial):
        self.storage, self.trial_id = storage, trial._trial_id
        self.native = _heartbeats(storage)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self.stop.is_set():
            try:
                if self.native:
                    self.storage.record_heartbeat(self.trial_id)
                else:
                    self.storage.set_trial_system_attr(self.trial_id, BEAT, time.time())
            except Exception:  # noqa: BLE001 - a lost beat is retried; the trial goes on
                pass
            self.stop.wait(HEARTBEAT_S)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
