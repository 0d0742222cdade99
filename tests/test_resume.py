"""The pieces a killed trial is picked up with, one at a time and fast (the whole story, a
worker killed mid-trial and resumed to the same numbers, is test_recovery's): the saved
training state, the random states, the run a retried trial continues, and the runs an
interrupted worker leaves RUNNING."""

import optuna
import pytest
import torch
from optuna.trial import TrialState

from bench import tracking, train, worker
from bench.config import RunConfig
from bench.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def test_a_saved_state_is_loaded_only_for_its_own_config(tmp_path):
    cfg = RunConfig(latent=4, seed=3)
    path = tmp_path / "deep" / "run" / train.STATE_FILE
    assert train.load_state(path, cfg) is None  # nothing saved yet
    train.save_state(path, {"config": cfg.to_dict(), "epoch": 7, "weights": torch.arange(3.0)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]  # the temp file renamed away
    state = train.load_state(path, cfg)
    assert state["epoch"] == 7 and torch.equal(state["weights"], torch.arange(3.0))
    assert train.load_state(path, cfg.replace(seed=4)) is None  # never resumed across a changed config
    train.save_state(path, {"config": cfg.to_dict(), "epoch": 8})  # the next save replaces it
    assert train.load_state(path, cfg)["epoch"] == 8


def test_a_kill_in_the_middle_of_a_save_leaves_the_last_state(tmp_path, monkeypatch):
    cfg = RunConfig()
    path = tmp_path / train.STATE_FILE
    train.save_state(path, {"config": cfg.to_dict(), "epoch": 1})

    def killed(obj, f):
        open(f, "wb").write(b"half a state")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train.save_state(path, {"config": cfg.to_dict(), "epoch": 2})
    monkeypatch.undo()
    assert train.load_state(path, cfg)["epoch"] == 1


class Payload:
    def __reduce__(self):
        return (print, ("this ran on load",))


def test_a_state_file_holding_a_pickled_payload_is_refused(tmp_path):
    path = tmp_path / train.STATE_FILE
    torch.save({"config": {}, "epoch": Payload()}, path)
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        train.load_state(path, RunConfig())


def test_random_states_restored_give_the_same_draws_from_both_generators():
    order = torch.Generator().manual_seed(5)
    torch.manual_seed(11)
    saved = train._rng_states(torch.device("cpu"), order)
    first = (torch.rand(3), torch.randperm(10, generator=order))
    torch.rand(5), torch.randperm(10, generator=order)  # the state moves on
    train._set_rng_states(saved, torch.device("cpu"), order)
    again = (torch.rand(3), torch.randperm(10, generator=order))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# -- runs: which one a retried trial continues, and which ones are ended for it ---------------

def trial_run(client, exp_id, cell="latent=2,seed=0", slot=0, name="t", **tags):
    return tracking.start_trial_run(client, exp_id, RunConfig(), run_name=name,
                                    tags={tracking.STUDY: "s", tracking.CELL: cell, tracking.SLOT: slot, **tags})


def test_the_run_a_retried_trial_continues_is_the_newest_unfinished_one_of_its_slot(mlflow_uri):
    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "s")
    assert tracking.resumable_run(client, exp_id, "s", "latent=2,seed=0", 0) is None
    done = trial_run(client, exp_id, name="done")
    tracking.end_run(client, done, "FINISHED")
    assert tracking.resumable_run(client, exp_id, "s", "latent=2,seed=0", 0) is None  # finished: not resumed
    older = trial_run(client, exp_id, name="older")
    tracking.end_run(client, older, "FAILED", "killed")
    newer = trial_run(client, exp_id, name="newer")
    tracking.end_run(client, newer, "KILLED", "interrupted by the user")
    trial_run(client, exp_id, slot=1, name="another slot")
    trial_run(client, exp_id, cell="latent=4,seed=0", name="another cell")
    diverged = trial_run(client, exp_id, name="diverged", **{"vaebench.state": "DIVERGED"})
    tracking.end_run(client, diverged, "FAILED", "diverged")
    assert tracking.resumable_run(client, exp_id, "s", "latent=2,seed=0", 0) == newer
    running = trial_run(client, exp_id, name="still running")  # its worker died: left RUNNING
    assert tracking.resumable_run(client, exp_id, "s", "latent=2,seed=0", 0) == running
    assert tracking.resumable_run(client, exp_id, "other study", "latent=2,seed=0", 0) is None


def test_a_reopened_run_is_running_again_with_the_new_trial_tags_and_no_fail_reason(mlflow_uri):
    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "s")
    run_id = trial_run(client, exp_id)
    tracking.end_run(client, run_id, "FAILED", "the worker stopped before the trial ended")
    tracking.reopen_run(client, run_id, {tracking.TRIAL: "9"})
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.tags[tracking.TRIAL] == "9"
    assert tracking.FAIL_REASON not in run.data.tags
    tracking.reopen_run(client, run_id, {tracking.TRIAL: "10"})  # no reason to delete: no error
    assert client.get_run(run_id).data.tags[tracking.TRIAL] == "10"


def test_a_retried_trial_resumes_only_a_run_whose_saved_state_matches_its_config(mlflow_uri, tmp_path):
    from types import SimpleNamespace

    from bench.spec import parse_spec

    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "s")
    spec = parse_spec({"study": {"name": "s", "dataset": "digits", "epochs": 1}, "grid": {"latent": [2]}})
    cell, cfg = SimpleNamespace(key="latent=2,seed=0"), RunConfig(latent=2)
    assert worker.resumable(client, exp_id, spec, cell, 0, cfg, tmp_path) is None  # no run
    run_id = trial_run(client, exp_id)
    tracking.end_run(client, run_id, "FAILED", "killed")
    assert worker.resumable(client, exp_id, spec, cell, 0, cfg, tmp_path) is None  # no saved state
    state = tmp_path / "checkpoints" / run_id / train.STATE_FILE
    train.save_state(state, {"config": cfg.to_dict(), "epoch": 3})
    assert worker.resumable(client, exp_id, spec, cell, 0, cfg, tmp_path) == run_id
    assert worker.resumable(client, exp_id, spec, cell, 0, cfg.replace(lr=0.5), tmp_path) is None
    assert worker.resumable(client, exp_id, spec, cell, 1, cfg, tmp_path) is None  # another slot
    state.write_bytes(b"not a state")  # unreadable: trained again from epoch 1, never fatal
    assert worker.resumable(client, exp_id, spec, cell, 0, cfg, tmp_path) is None


SPEC = """
[study]
name = "interrupt"
dataset = "digits"
epochs = 1
objective = "val/bce"

[grid]
latent = [2]
"""


def test_a_run_its_worker_could_not_end_is_ended_by_the_coordinator_and_only_for_its_own_workers(tmp_path, new_store):
    from bench import queue, sweep

    uri = new_store(tmp_path)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    (tmp_path / "spec.toml").write_text(SPEC)
    spec = sweep.resolve(sweep.load_spec(tmp_path / "spec.toml"))
    study, exp_id, parent = sweep.prepare(spec, url, uri)
    client = tracking.connect(uri)
    runs = {}
    for name in ("here:1", "here:2", "elsewhere:1", "here:done", "here:running"):  # each left its run RUNNING
        trial = study.ask()
        trial.set_user_attr(queue.WORKER, name.replace(":done", ":1").replace(":running", ":2"))
        if name == "here:done":
            study.tell(trial, 1.0)
        elif name != "here:running":  # Optuna still counts that one running: the next start decides
            study.tell(trial, state=TrialState.FAIL)
        runs[name] = tracking.start_trial_run(client, exp_id, RunConfig(), run_name=name, parent_run_id=parent,
                                              tags={tracking.STUDY: spec.name, tracking.TRIAL: trial.number})
    tracking.end_run(client, runs["here:done"], "FINISHED")

    sweep._end_orphaned_runs(spec, url, uri, {"here:1", "here:2"})

    status = {w: client.get_run(r).info.status for w, r in runs.items()}
    assert status == {"here:1": "KILLED", "here:2": "KILLED", "elsewhere:1": "RUNNING", "here:done": "FINISHED",
                      "here:running": "RUNNING"}
    assert client.get_run(runs["here:1"]).data.tags[tracking.FAIL_REASON] == "interrupted by the user"
    sweep._end_orphaned_runs(spec, url, uri, set())  # no local workers: nothing to end, no error
    other = tmp_path / "other"
    new_store(other)
    sweep._end_orphaned_runs(spec, f"sqlite:///{other / 'optuna.db'}", uri, {"here:1"})  # no such study: no error
    assert optuna.get_all_study_names(storage=f"sqlite:///{other / 'optuna.db'}") == []  # and none created


def test_on_cuda_the_device_generator_is_saved_and_restored_on_that_device(monkeypatch):
    """No GPU here: torch.cuda's two calls are recorded instead, to check the wiring (which
    state is kept under which key, restored to which device); a GPU run exercises the real ones."""
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.arange(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", state, device)))
    gpu, order = SimpleNamespace(type="cuda", index=1), torch.Generator().manual_seed(0)
    saved = train._rng_states(gpu, order)
    assert set(saved) == {"torch", "order", "cuda"} and torch.equal(saved["cuda"], torch.arange(4))
    assert calls == [("get", gpu)]
    train._set_rng_states(saved, gpu, order)
    assert calls[1][0] == "set" and torch.equal(calls[1][1], torch.arange(4)) and calls[1][2] is gpu
    calls.clear()
    train._set_rng_states({k: v for k, v in saved.items() if k != "cuda"}, gpu, order)  # saved on a CPU
    train._set_rng_states(saved, torch.device("cpu"), order)  # a CUDA state resumed on a CPU: not applied
    assert calls == []
    assert set(train._rng_states(torch.device("cpu"), order)) == {"torch", "order"}


def test_every_running_run_of_a_dead_trial_is_failed_even_one_that_never_got_its_trial_number(mlflow_uri):
    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "s")
    dead = [trial_run(client, exp_id, name=f"dead {n}", **{tracking.TRIAL: n}) for n in (0, 2)]
    live = trial_run(client, exp_id, name="live", **{tracking.TRIAL: 1})
    untagged = tracking.start_trial_run(client, exp_id, RunConfig(), run_name="untagged", tags={tracking.STUDY: "s"})
    assert tracking.fail_orphaned_runs(client, exp_id, "s", live_trials={1}) == 3
    assert [client.get_run(r).info.status for r in (*dead, untagged)] == ["FAILED"] * 3
    assert client.get_run(live).info.status == "RUNNING"
