"""The study's queue on real Optuna storages (sqlite, and a journal file where storages have no
heartbeats): which trials a study holds and queues, how a changed spec is refused, how a dead
worker's trial is failed, and how workers claim queued trials, each exactly once even when real
processes race for them. (pysqlite opens a transaction only at its first write, so without
BEGIN IMMEDIATE two workers both read WAITING and both claim: measured 14-21 doubled claims of
200 with 4 processes.)"""

import json
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from optuna.trial import TrialState

from bench import queue
from bench.errors import BenchError, StudyError
from bench.spec import parse_spec

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def spec(trials_per_cell=None, **fixed):
    """A two-cell grid (latent 2 and 4), or a search of `trials_per_cell` trials per cell."""
    data = {"study": {"name": "queue", "dataset": "digits", "epochs": 1, "objective": "val/bce"},
            "grid": {"latent": [2, 4]}, "fixed": {"eval_k": 5, **fixed}}
    if trials_per_cell:
        data["search"] = {"n_trials": trials_per_cell, "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}
    return parse_spec(data)


@pytest.fixture
def study(tmp_path, new_store):
    new_store(tmp_path)
    storage = queue.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    return optuna.create_study(study_name="queue", storage=storage)


def by_state(study):
    return sorted((t.user_attrs[queue.CELL], t.user_attrs[queue.SLOT], t.user_attrs[queue.ATTEMPT], t.state.name)
                  for t in study.get_trials())


def test_a_study_queues_each_missing_cell_and_slot_once_and_counts_the_done(study):
    grid = spec()
    assert queue.slots(grid) == [("latent=2,seed=0", 0, {"latent": 2, "seed": 0}),
                                 ("latent=4,seed=0", 0, {"latent": 4, "seed": 0})]
    assert queue.queue_missing(grid, study) == (2, 0)
    assert queue.queue_missing(grid, study) == (0, 0)  # waiting trials are not queued twice
    first = queue.take_queued(study)
    assert queue.queue_missing(grid, study) == (0, 0)  # nor running ones
    study.tell(first, 1.0)
    assert queue.queue_missing(grid, study) == (0, 1)
    assert by_state(study) == [("latent=2,seed=0", 0, 1, "COMPLETE"), ("latent=4,seed=0", 0, 1, "WAITING")]
    study.tell(queue.take_queued(study), 2.0)
    assert queue.queue_missing(grid, study) == (0, 2)  # every done slot counted, none queued again


def test_a_failed_slot_is_queued_again_as_its_next_attempt_and_a_pruned_one_is_done(study):
    search = spec(trials_per_cell=2)
    assert [s[:2] for s in queue.slots(search)] == [("latent=2,seed=0", 0), ("latent=2,seed=0", 1),
                                                        ("latent=4,seed=0", 0), ("latent=4,seed=0", 1)]
    queue.queue_missing(search, study)
    study.tell(queue.take_queued(study), state=TrialState.FAIL)
    study.tell(queue.take_queued(study), state=TrialState.PRUNED)
    assert queue.queue_missing(search, study) == (1, 1)
    assert by_state(study) == [("latent=2,seed=0", 0, 1, "FAIL"), ("latent=2,seed=0", 0, 2, "WAITING"), ("latent=2,seed=0", 1, 1, "PRUNED"),
                               ("latent=4,seed=0", 0, 1, "WAITING"), ("latent=4,seed=0", 1, 1, "WAITING")]


def test_a_done_cell_under_other_values_is_refused_by_name_and_a_failed_one_is_not(study):
    queue.queue_missing(spec(), study)
    study.tell(queue.take_queued(study), 1.0)  # latent=2 done with beta 1
    with pytest.raises(StudyError, match=r"already holds cell latent=2,seed=0 trained with other values \(beta: 1\.0 -> 0\.5\)"):
        queue.queue_missing(spec(beta=0.5), study)
    other = optuna.create_study(study_name="other", storage=study._storage)
    queue.queue_missing(spec(), other)
    with pytest.raises(StudyError, match="already holds cell latent=2,seed=0"):
        queue.queue_missing(spec(beta=0.5), other)  # a trial waiting under other values is refused too
    for _ in range(2):
        other.tell(queue.take_queued(other), state=TrialState.FAIL)  # failed: no result to contradict
    assert queue.queue_missing(spec(beta=0.5), other) == (2, 0)


def test_the_refusal_names_up_to_four_changes_and_both_ways_out(study):
    queue.queue_missing(spec(), study)
    study.tell(queue.take_queued(study), 1.0)
    changed = spec(beta=0.5, lr=0.01, dropout=0.2, weight_decay=0.1, patience=3)  # five fields changed
    with pytest.raises(StudyError) as caught:
        queue.queue_missing(changed, study)
    message = str(caught.value)
    assert message.startswith("study 'queue' already holds cell latent=2,seed=0 trained with other values (")
    assert message.endswith("); give the changed spec a new [study] name, or pass --restart to delete this "
                            "study's trials and runs and start over")
    old = json.loads(study.trials[0].user_attrs[queue.IDENTITY])
    changes = queue.identity_changes(old, queue.identity(changed, changed.cells()[0]))
    assert len(changes) == 5 and f"values ({'; '.join(changes[:4])}); give" in message


def test_a_slot_already_waiting_does_not_stop_the_ones_after_it_from_being_queued(study):
    study.enqueue_trial(params={"latent": 2, "seed": 0}, user_attrs={queue.CELL: "latent=2,seed=0", queue.SLOT: 0})
    assert queue.queue_missing(spec(), study) == (1, 0)  # latent=4, after the waiting latent=2
    assert sorted(t.user_attrs[queue.CELL] for t in study.get_trials()) == ["latent=2,seed=0", "latent=4,seed=0"]


def test_a_trial_from_before_slots_and_identities_counts_as_slot_0(study):
    """Trials written by an older vaebench carry only their cell: slot 0, nothing to compare."""
    study.enqueue_trial(params={"latent": 2, "seed": 0}, user_attrs={queue.CELL: "latent=2,seed=0"})
    study.tell(queue.take_queued(study), 1.0)
    assert queue.queue_missing(spec(), study) == (1, 1)  # only latent=4 is queued


def test_identity_changes_name_each_field_and_count_a_new_field_as_its_default():
    old = queue.identity(spec(), spec().cells()[0])
    assert queue.identity_changes(old, old) == []
    assert queue.identity_changes(old, queue.identity(spec(beta=0.5), spec().cells()[0])) == ["beta: 1.0 -> 0.5"]
    without_beta = {**old, "config": {k: v for k, v in old["config"].items() if k != "beta"}}
    assert queue.identity_changes(without_beta, old) == []  # beta added to RunConfig since: its default
    assert queue.identity_changes({**old, "objective": "val/elbo"}, old) == ["objective: 'val/elbo' -> 'val/bce'"]
    searched = queue.identity(spec(trials_per_cell=2), spec().cells()[0])
    assert [c.split(":")[0] for c in queue.identity_changes(old, searched)] == ["search"]


def test_a_worker_claims_only_what_it_accepts_and_nothing_once_the_queue_is_empty(study):
    queue.queue_missing(spec(), study)
    latent_4 = queue.take_queued(study, accept=lambda frozen: frozen.user_attrs[queue.CELL] == "latent=4,seed=0")
    assert study.trials[latent_4.number].user_attrs[queue.CELL] == "latent=4,seed=0"
    assert queue.take_queued(study, accept=lambda frozen: False) is None
    assert study.trials[queue.take_queued(study).number].user_attrs[queue.CELL] == "latent=2,seed=0"
    assert queue.take_queued(study) is None
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 2


def test_a_silent_running_trial_is_failed_after_the_grace_period_and_a_beating_one_is_not(tmp_path, new_store,
                                                                                        monkeypatch):
    monkeypatch.setattr(queue, "HEARTBEAT_S", 1)
    monkeypatch.setattr(queue, "GRACE_S", 2)
    new_store(tmp_path)
    storage = queue.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="queue", storage=storage)
    queue.queue_missing(spec(), study)
    silent, beating = queue.take_queued(study), queue.take_queued(study)
    storage.record_heartbeat(silent._trial_id)
    with queue.Heartbeat(storage, beating) as beat:
        assert beat.thread.daemon  # a beat never keeps a dying worker's process alive
        assert queue.fail_stale(study, storage) == 0  # both beat within the grace period
        time.sleep(3)
        assert queue.fail_stale(study, storage) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.RUNNING]
    assert queue.BEAT not in study.trials[beating.number].system_attrs  # Optuna's own heartbeats, not ours
    time.sleep(3)  # its beats stopped: now it is the silent one
    assert queue.fail_stale(study, storage) == 1
    assert study.trials[beating.number].state == TrialState.FAIL


def test_a_trial_whose_worker_died_between_claim_and_first_beat_is_failed_too(tmp_path, new_store, monkeypatch):
    """Optuna never fails a RUNNING trial that has no heartbeat at all: a worker killed right after
    its claim left the trial RUNNING for good, and its cell was never trained."""
    monkeypatch.setattr(queue, "GRACE_S", 2)
    new_store(tmp_path)
    storage = queue.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="queue", storage=storage)
    queue.queue_missing(spec(), study)
    queue.take_queued(study)  # claimed; its worker dies before its Heartbeat starts
    time.sleep(3)
    assert queue.fail_stale(study, storage) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.WAITING]


def test_without_native_heartbeats_the_wall_clock_beat_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(queue, "HEARTBEAT_S", 1)
    monkeypatch.setattr(queue, "GRACE_S", 2)
    storage = queue.open_storage(f"journal:{tmp_path / 'journal' / 'optuna.log'}")  # its folder is created
    study = optuna.create_study(study_name="queue", storage=storage)
    queue.queue_missing(spec(), study)
    silent, beating = queue.take_queued(study), queue.take_queued(study)
    storage.set_trial_system_attr(silent._trial_id, queue.BEAT, time.time() - 10)
    with queue.Heartbeat(storage, beating):
        time.sleep(3)  # the beating trial's start is older than the grace period, its beat is not
        assert queue.fail_stale(study, storage) == 1
        assert queue.fail_stale(study, storage) == 0  # a failed trial is not failed twice
    assert time.time() - study.trials[beating.number].system_attrs[queue.BEAT] < 2
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.RUNNING]


def test_the_wall_clock_rule_counts_every_dead_trial_and_falls_back_to_the_start_time(tmp_path, monkeypatch):
    """Two silent trials are two failed; a trial that never beat is judged by its start (a
    fresh one is kept); finished trials are never touched."""
    monkeypatch.setattr(queue, "GRACE_S", 2)
    storage = queue.open_storage(f"journal:{tmp_path / 'optuna.log'}")
    study = optuna.create_study(study_name="queue", storage=storage)
    queue.queue_missing(spec(trials_per_cell=5), study)
    done = queue.take_queued(study)
    study.tell(done, 1.0)
    dead = [queue.take_queued(study), queue.take_queued(study)]
    for trial in dead:
        storage.set_trial_system_attr(trial._trial_id, queue.BEAT, time.time() - 10)
    fresh = queue.take_queued(study)  # no beat yet, started just now
    assert queue.BEAT not in study.trials[fresh.number].system_attrs
    assert queue.fail_stale(study, storage) == 2
    states = {t.number: t.state for t in study.get_trials()}
    assert states[done.number] == TrialState.COMPLETE and states[fresh.number] == TrialState.RUNNING
    assert [states[t.number] for t in dead] == [TrialState.FAIL, TrialState.FAIL]
    time.sleep(2.5)  # now its start is older than the grace period and it never beat
    assert queue.fail_stale(study, storage) == 1
    assert study.trials[fresh.number].state == TrialState.FAIL


def test_a_storage_that_cannot_be_opened_is_one_line_naming_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StudyError) as caught:
        queue.open_storage(f"sqlite:///{tmp_path / 'file' / 'optuna.db'}")
    assert str(caught.value) == (f"cannot open Optuna storage sqlite:///{tmp_path}/file/optuna.db: [Errno 17] File "
                                 f"exists: '{tmp_path}/file'; check that {tmp_path}/file is a writable directory "
                                 "(--results)")
    with pytest.raises(BenchError) as caught:
        queue.open_storage("postgresql+nosuchdriver://user@host/db")
    assert str(caught.value) == ("Optuna storage postgresql+nosuchdriver://user@host/db needs a postgresql driver "
                                 "(nosuchdriver), which is not installed: pip install -e \".[scale]\"")


def test_a_sqlite_storage_beats_waits_for_the_lock_and_takes_it_as_each_transaction_begins(tmp_path):
    import sqlite3

    storage = queue.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert (storage.heartbeat_interval, storage.grace_period) == (queue.HEARTBEAT_S, queue.GRACE_S)
    assert not storage.engine.pool._pre_ping  # a file has no connection to lose
    raw = storage.engine.raw_connection()
    assert raw.cursor().execute("PRAGMA busy_timeout").fetchone() == (60_000,)  # a busy store is waited for
    raw.close()
    with storage.engine.connect() as conn, conn.begin():  # BEGIN IMMEDIATE: the write lock, before any write
        other = sqlite3.connect(tmp_path / "optuna.db", timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("CREATE TABLE probe (x)")
        other.close()


def test_a_journal_storage_lives_at_its_path_its_folders_created(tmp_path):
    path = tmp_path / "a" / "b" / "optuna.log"
    for _ in range(2):  # a second open finds the folders there
        storage = queue.open_storage(f"journal:{path}")
    optuna.create_study(study_name="j", storage=storage)
    assert path.is_file() and path.stat().st_size > 0

CLAIMER = textwrap.dedent("""
    import json, os, sys, time
    import optuna
    from bench import queue
    url, gate = sys.argv[1], sys.argv[2]
    storage = queue.open_storage(url)
    study = optuna.load_study(study_name="race", storage=storage)
    while not os.path.exists(gate):  # every process starts claiming at once
        time.sleep(0.01)
    claimed = []
    while (trial := queue.take_queued(study)) is not None:
        claimed.append(trial.number)
    print(json.dumps(claimed))
""")


@pytest.mark.slow
def test_four_processes_claim_each_queued_trial_of_a_sqlite_store_exactly_once(tmp_path):
    url, n = f"sqlite:///{tmp_path / 'optuna.db'}", 200
    study = optuna.create_study(study_name="race", storage=queue.open_storage(url))
    for i in range(n):
        study.enqueue_trial(params={}, user_attrs={queue.CELL: f"cell-{i}"}, skip_if_exists=False)
    gate = tmp_path / "go"
    workers = [subprocess.Popen([sys.executable, "-c", CLAIMER, url, str(gate)], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    time.sleep(3)  # imports and store opening done
    gate.touch()
    claims = []
    for w in workers:
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0
        claims += json.loads(out)
    assert len(claims) == len(set(claims)) == n
    states = {t.state for t in optuna.load_study(study_name="race", storage=url).trials}
    assert states == {optuna.trial.TrialState.RUNNING}
