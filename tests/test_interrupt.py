"""Ctrl-C as a user presses it: SIGINT to the whole process group of a 2-worker `bench sweep`
(a terminal signals the coordinator and its workers alike). Every trial and run, the study's
parent run included, ends in a final state, and the same command resumes the study."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from bench import tracking

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
SPEC = """
[study]
name = "ctrl-c"
dataset = "digits"
seeds = [0]
epochs = 40
objective = "val/bce"

[grid]
model = ["vae", "ae"]
loss = ["bce", "mse"]

[fixed]
latent = 2
eval_k = 5
eval_n = 50
quality_n = 0
"""


def test_ctrl_c_leaves_every_trial_and_run_final_and_the_next_run_resumes(tmp_path):
    (tmp_path / "spec.toml").write_text(SPEC)
    cmd = [sys.executable, "-m", "bench", "sweep", str(tmp_path / "spec.toml"), "--workers", "2",
           "--results", str(tmp_path)]
    env = {**os.environ, "VAEBENCH_STATE_EVERY_S": "0"}
    # a background job of a non-interactive shell inherits SIGINT ignored: give it back, as a
    # terminal's foreground job has it
    sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    deadline = time.monotonic() + 300
    while True:  # both workers training
        assert sweep.poll() is None, sweep.communicate()
        assert time.monotonic() < deadline
        try:
            running = optuna.load_study(study_name="ctrl-c", storage=storage).get_trials(states=(TrialState.RUNNING,))
            if len(running) == 2 and len(list((tmp_path / "checkpoints").glob("*/state.pt"))) == 2:
                break
        except KeyError:
            pass
        time.sleep(0.1)
    os.killpg(sweep.pid, signal.SIGINT)
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err

    trials = optuna.load_study(study_name="ctrl-c", storage=storage).get_trials()
    assert TrialState.RUNNING not in [t.state for t in trials]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 2 and all(t.user_attrs["fail_reason"] == "interrupted" for t in interrupted)
    client = tracking.connect(tracking.default_uri(tmp_path))
    exp_id = client.get_experiment_by_name("ctrl-c").experiment_id
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([exp_id])}
    assert "RUNNING" not in statuses.values(), statuses
    assert statuses["study ctrl-c"] == "KILLED"

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    trials = optuna.load_study(study_name="ctrl-c", storage=storage).get_trials()
    by_cell = {}
    for t in trials:
        by_cell.setdefault(t.user_attrs["cell"], []).append(t.state)
    assert len(by_cell) == 4 and all(s.count(TrialState.COMPLETE) == 1 for s in by_cell.values())
    runs = tracking.trial_runs(client, exp_id, "ctrl-c")
    assert sorted(r.info.status for r in runs).count("FINISHED") == 4
    assert not [r for r in runs if r.info.status == "RUNNING"]
    resumed = [r for r in runs if "vaebench.resumed_from_epoch" in r.data.tags]
    assert len(resumed) == 2  # the interrupted trials continued their runs from their saved state
    assert client.get_run(next(r.info.run_id for r in client.search_runs(
        [exp_id], filter_string=f"tags.`{tracking.ROLE}` = 'study'"))).info.status == "FINISHED"


def test_a_store_error_while_ending_an_interrupted_run_prints_no_mlflow_traceback(tmp_path, new_store, capfd):
    import logging
    import sqlite3

    from bench.config import RunConfig
    client = tracking.connect(new_store(tmp_path))
    run_id = tracking.start_trial_run(client, "0", RunConfig(), run_name="broken")
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # a store MLflow's own code fails on, fast
        db.execute("DROP TABLE tags")
    capfd.readouterr()
    level = logging.getLogger("mlflow").level

    tracking.quietly(tracking.end_run, client, run_id, "KILLED", "interrupted by the user")

    err = capfd.readouterr().err
    assert "Traceback" not in err and "SQLAlchemy database error" not in err
    assert logging.getLogger("mlflow").level == level  # MLflow's own logging is back as it was
