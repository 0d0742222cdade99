"""Crash recovery with real processes: a `bench sweep` killed with SIGKILL in the middle of a
trial, on each storage, and the same command run again. Nothing is recorded by hand: the
worker's own heartbeat (or its journal beat) goes silent, the next run fails the stale trial,
retries it, and the retry resumes from the trial's saved state, continuing the same MLflow run.
The resumed cell must end with exactly the numbers of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from bench import queue, sweep, tracking

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

SPEC = """
[study]
name = "recovery"
dataset = "digits"
binarize = "dynamic"
seeds = [0]
epochs = 40
objective = "val/elbo"

[fixed]
model = "vae"
latent = 2
dropout = 0.2
eval_k = 5
eval_n = 50
quality_n = 0
"""
# beat every second, stale after 2 s of silence, training state saved after every epoch
ENV = {"VAEBENCH_HEARTBEAT_S": "1", "VAEBENCH_GRACE_S": "2", "VAEBENCH_STATE_EVERY_S": "0",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMING = {"seconds", "samples_per_s", "trial_seconds"}


def bench(*args, results: Path, storage: str | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "bench", "sweep", *args, "--results", str(results)]
    if storage:
        cmd += ["--storage", storage]
    env = {**os.environ, **ENV}
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def saved_epoch(results: Path) -> int:
    """The epoch of the training state the running trial saved last (0: none yet)."""
    for path in (results / "checkpoints").glob("*/state.pt"):
        try:
            return torch.load(path, weights_only=True)["epoch"]
        except Exception:  # noqa: BLE001 - replaced while we read it
            return 0
    return 0


def saved_epochs(results: Path) -> list[int]:
    """The epochs of every trial's saved training state (a stack saves one per trial)."""
    epochs = []
    for path in (results / "checkpoints").glob("*/state.pt"):
        try:
            epochs.append(torch.load(path, weights_only=True)["epoch"])
        except Exception:  # noqa: BLE001 - replaced while we read it
            epochs.append(0)
    return epochs


def storages(results: Path) -> dict[str, str]:
    return {"sqlite": f"sqlite:///{results / 'optuna.db'}", "journal": f"journal:{results / 'optuna.journal'}"}


def history(client, run_id) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics if key not in TIMING}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same study, never interrupted."""
    results = tmp_path_factory.mktemp("reference")
    (results / "spec.toml").write_text(SPEC)
    done = bench(str(results / "spec.toml"), results=results)
    assert done.returncode == 0, done.stderr
    client = tracking.connect(tracking.default_uri(results))
    [run] = tracking.trial_runs(client, client.get_experiment_by_name("recovery").experiment_id, "recovery")
    return history(client, run.info.run_id)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_killed_trial_is_retried_and_resumes_with_the_numbers_of_an_uninterrupted_run(tmp_path, reference, kind):
    (tmp_path / "spec.toml").write_text(SPEC)
    url = storages(tmp_path)[kind]
    worker = bench(str(tmp_path / "spec.toml"), results=tmp_path, storage=url, wait=False)
    deadline = time.monotonic() + 120
    while saved_epoch(tmp_path) < 5:  # mid-trial: some epochs saved, most still to come
        assert worker.poll() is None, worker.stderr.read()
        assert time.monotonic() < deadline, "the trial never saved its state"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed_at = saved_epoch(tmp_path)
    assert 5 <= killed_at < 40

    study = optuna.load_study(study_name="recovery", storage=queue.open_storage(url))
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]  # nobody told Optuna
    client = tracking.connect(tracking.default_uri(tmp_path))
    exp_id = client.get_experiment_by_name("recovery").experiment_id
    [run] = tracking.trial_runs(client, exp_id, "recovery")
    assert run.info.status == "RUNNING"

    time.sleep(3)  # past the grace period
    again = bench(str(tmp_path / "spec.toml"), results=tmp_path, storage=url)
    assert again.returncode == 0, again.stderr

    trials = optuna.load_study(study_name="recovery", storage=queue.open_storage(url)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    [resumed] = tracking.trial_runs(client, exp_id, "recovery")  # the same run, continued
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert int(resumed.data.tags["vaebench.resumed_from_epoch"]) >= killed_at
    assert tracking.FAIL_REASON not in resumed.data.tags
    assert history(client, run.info.run_id) == reference  # every epoch once, the same values


STACKED_SPEC = SPEC.replace("seeds = [0]", "seeds = [0, 1, 2]").replace("dropout = 0.2", "dropout = 0.0") \
    .replace('name = "recovery"', 'name = "stacked-recovery"')


def test_a_killed_stack_resumes_each_of_its_trials_with_the_numbers_of_an_uninterrupted_stack(tmp_path):
    reference_dir, results = tmp_path / "reference", tmp_path / "killed"
    for d in (reference_dir, results):
        d.mkdir()
        (d / "spec.toml").write_text(STACKED_SPEC)
    done = bench(str(reference_dir / "spec.toml"), "--stack", "3", results=reference_dir)
    assert done.returncode == 0, done.stderr
    ref_client = tracking.connect(tracking.default_uri(reference_dir))
    ref_exp = ref_client.get_experiment_by_name("stacked-recovery").experiment_id
    reference = {r.data.tags[tracking.CELL]: history(ref_client, r.info.run_id)
                 for r in tracking.trial_runs(ref_client, ref_exp, "stacked-recovery")}
    assert len(reference) == 3

    worker = bench(str(results / "spec.toml"), "--stack", "3", results=results, wait=False)
    deadline = time.monotonic() + 120
    while len(saved := saved_epochs(results)) < 3 or min(saved) < 5:
        assert worker.poll() is None, worker.stderr.read()
        assert time.monotonic() < deadline, "the stack never saved its state"
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    study = optuna.load_study(study_name="stacked-recovery", storage=f"sqlite:///{results / 'optuna.db'}")
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING] * 3  # one stack held all three

    time.sleep(3)  # past the grace period
    again = bench(str(results / "spec.toml"), "--stack", "3", results=results)
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="stacked-recovery", storage=f"sqlite:///{results / 'optuna.db'}").get_trials()
    by_cell = {}
    for t in trials:
        by_cell.setdefault(t.user_attrs["cell"], []).append(t.state)
    assert all(sorted(s, key=str) == sorted([TrialState.FAIL, TrialState.COMPLETE], key=str) for s in by_cell.values())
    client = tracking.connect(tracking.default_uri(results))
    runs = tracking.trial_runs(client, client.get_experiment_by_name("stacked-recovery").experiment_id, "stacked-recovery")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # each run continued
    for run in runs:
        assert int(run.data.tags["vaebench.resumed_from_epoch"]) >= 5
        got, want = history(client, run.info.run_id), reference[run.data.tags[tracking.CELL]]
        assert got.keys() == want.keys()
        for key in want:
            assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key  # every epoch once
            assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=1e-6, abs=1e-6), key
