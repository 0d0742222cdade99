"""Studies on a real Optuna storage and a real MLflow store (sqlite in a temporary directory):
each cell trains exactly once, a study resumes where it stopped, failures are recorded and
retried, and a search trains `n_trials` per cell.

The studies are tiny (8x8 digits, 1-2 epochs, latent 2), so each trial takes a second or two.
"""

import time

import optuna
import pytest
from optuna.trial import TrialState

from bench import queue, study, sweep, tracking
from bench.errors import StudyError
from bench.spec import load_spec, override, parse_spec

# bench silences these (see bench.sweep and bench.tracking), but pytest resets warning filters
pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")]
SMOKE = override(load_spec("experiments/smoke.toml"), epochs=1)
FIXED = {"latent": 2, "eval_k": 5, "eval_n": 50, "quality_n": 0}  # sample quality: test_quality.py


def tiny_spec(name: str, grid: dict | None = None, fixed: dict | None = None, **study):
    """A study on digits with one epoch per trial; `grid` gives its cells."""
    data = {"study": {"name": name, "dataset": "digits", "epochs": 1, "objective": "val/bce", **study},
            "fixed": {**FIXED, **(fixed or {})}}
    if grid:
        data["grid"] = grid
    return parse_spec(data)


@pytest.fixture
def results(tmp_path, new_store):
    """An empty results directory with empty stores where `run_study` looks by default."""
    new_store(tmp_path)
    return tmp_path


def optuna_trials(spec, results, storage: str | None = None) -> list:
    url = storage or sweep.storage_url(spec, results)
    return optuna.load_study(study_name=spec.name, storage=queue.open_storage(url)).get_trials()


def by_cell(trials) -> dict[str, list]:
    cells: dict[str, list] = {}
    for t in sorted(trials, key=lambda t: t.number):
        cells.setdefault(t.user_attrs["cell"], []).append(t)
    return cells


def mlflow_study(spec, results):
    """(client, experiment id, parent run ids, trial runs oldest first) of a study."""
    client = tracking.connect(tracking.default_uri(results))
    exp_id = client.get_experiment_by_name(spec.name).experiment_id
    parents = client.search_runs([exp_id], filter_string=f"tags.`{tracking.ROLE}` = 'study'")
    return client, exp_id, [p.info.run_id for p in parents], tracking.trial_runs(client, exp_id, spec.name)


# ---------------------------------------------------------------- the smoke study, in this process

@pytest.fixture(scope="module")
def smoke(tmp_path_factory, new_store):
    results = tmp_path_factory.mktemp("smoke")
    new_store(results)
    return results, sweep.run_study(SMOKE, results=results, workers=1, progress=False)


def test_a_study_trains_every_cell_once(smoke):
    results, outcome = smoke
    assert (outcome.study, outcome.dataset, outcome.cells, outcome.trials) == ("smoke", "digits", 6, 6)
    assert (outcome.done, outcome.trained_now, outcome.failed) == (6, 6, [])
    cells = by_cell(optuna_trials(SMOKE, results))
    assert sorted(cells) == sorted(cell.key for cell in SMOKE.cells())
    for cell in SMOKE.cells():
        [trial] = cells[cell.key]
        assert trial.state == TrialState.COMPLETE
        assert trial.params == cell.as_dict()
        assert (trial.user_attrs["slot"], trial.user_attrs["attempt"]) == (0, 1)
    for model in ("vae", "cvae", "ae"):  # the comparison table has a row per cell
        assert model in outcome.summary


def test_each_trial_is_one_finished_run_under_one_study_run(smoke):
    results, _ = smoke
    trials = optuna_trials(SMOKE, results)
    client, exp_id, parents, runs = mlflow_study(SMOKE, results)
    assert len(parents) == 1 and client.get_run(parents[0]).info.status == "FINISHED"
    assert len(runs) == len(trials) == 6
    runs_by_id = {run.info.run_id: run for run in runs}
    for trial in trials:
        run = runs_by_id[trial.user_attrs["run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0]
        assert run.data.tags[tracking.CELL] == trial.user_attrs["cell"]
        assert run.data.tags[tracking.TRIAL] == str(trial.number)
        assert run.data.params["model"] == trial.params["model"] and run.data.params["epochs"] == "1"
        test_metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
        assert {k: v for k, v in trial.user_attrs.items() if k in test_metrics} == test_metrics


def test_a_trial_value_is_the_objective_at_the_best_epoch(smoke):
    results, _ = smoke
    client, *_ = mlflow_study(SMOKE, results)
    for trial in optuna_trials(SMOKE, results):
        run = client.get_run(trial.user_attrs["run_id"])
        best = int(run.data.tags["vaebench.best_epoch"])
        at_best = [m.value for m in client.get_metric_history(run.info.run_id, SMOKE.objective) if m.step == best]
        assert at_best == [trial.value]


def test_running_a_finished_study_again_trains_nothing(smoke):
    results, first = smoke
    again = sweep.run_study(SMOKE, results=results, workers=1, progress=False)
    assert (again.done, again.trained_now, again.failed) == (6, 0, [])
    assert len(optuna_trials(SMOKE, results)) == 6
    _, _, parents, runs = mlflow_study(SMOKE, results)
    assert len(parents) == 1 and len(runs) == 6
    assert again.summary == first.summary


# ---------------------------------------------------------------- resuming after crashes and failures

def test_a_failing_cell_is_reported_and_retried_alone(results):
    # lr 1e6 with a Gaussian likelihood diverges within the first epoch; lr 1e-3 trains.
    spec = tiny_spec("failing", grid={"lr": [1e-3, 1e6]}, fixed={"loss": "gaussian"}, objective="val/elbo")
    bad = "lr=1000000.0,seed=0"

    first = sweep.run_study(spec, results=results, progress=False)

    assert (first.done, first.trained_now) == (1, 2)
    [(cell, reason)] = first.failed
    assert cell == bad and reason.startswith("training diverged: loss is ")
    assert "at epoch 1, step" in reason
    [failed] = by_cell(optuna_trials(spec, results))[bad]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == reason

    again = sweep.run_study(spec, results=results, progress=False)

    assert (again.done, again.trained_now, [c for c, _ in again.failed]) == (1, 1, [bad])
    cells = by_cell(optuna_trials(spec, results))
    assert [(t.state, t.user_attrs["attempt"]) for t in cells[bad]] == [(TrialState.FAIL, 1), (TrialState.FAIL, 2)]
    assert [t.state for t in cells["lr=0.001,seed=0"]] == [TrialState.COMPLETE]
    _, _, _, runs = mlflow_study(spec, results)
    failed_runs = [r for r in runs if r.data.tags[tracking.CELL] == bad]
    assert [r.info.status for r in failed_runs] == ["FAILED", "FAILED"]
    assert all(r.data.tags["vaebench.state"] == "DIVERGED" for r in failed_runs)
    assert all(r.data.tags[tracking.FAIL_REASON].startswith("training diverged") for r in failed_runs)


# ---------------------------------------------------------------- workers and storages

@pytest.mark.slow
def test_two_worker_processes_train_each_cell_exactly_once(results):
    outcome = sweep.run_study(SMOKE, results=results, workers=2, progress=False)
    assert (outcome.done, outcome.trained_now, outcome.failed) == (6, 6, [])
    cells = by_cell(optuna_trials(SMOKE, results))
    assert sorted(cells) == sorted(cell.key for cell in SMOKE.cells())
    assert all([t.state for t in trials] == [TrialState.COMPLETE] for trials in cells.values())
    _, _, parents, runs = mlflow_study(SMOKE, results)
    assert len(parents) == 1
    assert sorted(r.data.tags[tracking.CELL] for r in runs) == sorted(cells)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_queued_cells_are_trained_by_workers_started_with_the_same_spec(results):
    spec = tiny_spec("queued")
    queued = sweep.run_study(spec, results=results, workers=0, progress=False)  # coordinator only
    assert (queued.done, queued.trained_now) == (0, 0)
    assert [t.state for t in optuna_trials(spec, results)] == [TrialState.WAITING]

    with pytest.raises(StudyError, match="queued from a different spec"):
        sweep.run_worker(override(spec, epochs=2), results=results, progress=False)
    assert [t.state for t in optuna_trials(spec, results)] == [TrialState.WAITING]

    assert sweep.run_worker(spec, results=results, progress=False) == 1
    assert [t.state for t in optuna_trials(spec, results)] == [TrialState.COMPLETE]


@pytest.mark.parametrize("stack", [1, 2])
def test_ctrl_c_after_a_run_finished_keeps_it_and_the_rerun_does_not_train_it_again(results, monkeypatch, stack):
    """Ctrl-C between a run ending FINISHED and Optuna hearing of it failed the trial, so the next
    run trained the cell again: two FINISHED runs for one cell (solo, and every finished member of
    a stack, which Optuna heard of only once all of them had finished)."""
    from bench import worker

    spec = tiny_spec(f"window-{stack}", grid={"lr": [1e-3, 2e-3]})
    sweep.run_study(spec, results=results, workers=0, progress=False)

    def ctrl_c(*args):  # the interrupt arrives right after the first run ended FINISHED
        raise KeyboardInterrupt

    monkeypatch.setattr(worker, "_tell", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_worker(spec, results=results, progress=False, stack=stack)
    monkeypatch.undo()
    client, _, _, runs = mlflow_study(spec, results)
    finished = {r.info.run_id: r for r in runs if r.info.status == "FINISHED"}
    done = [t for t in optuna_trials(spec, results) if t.state == TrialState.COMPLETE]
    assert len(done) == len(finished) == stack  # each finished run is a COMPLETE trial, with its numbers
    for trial in done:
        run = finished[trial.user_attrs["run_id"]]
        assert trial.user_attrs["test/bce"] == run.data.metrics["test/bce"]
        val_bce = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/bce")}
        assert trial.value == val_bce[int(run.data.tags["vaebench.best_epoch"])]

    again = sweep.run_study(spec, results=results, progress=False)
    assert (again.done, again.trained_now) == (2, 2 - stack)
    _, _, _, runs = mlflow_study(spec, results)
    assert sorted(r.data.tags[tracking.CELL] for r in runs if r.info.status == "FINISHED") == [
        "lr=0.001,seed=0", "lr=0.002,seed=0"]  # one FINISHED run per cell


def test_after_a_restart_the_study_names_the_spec_now_in_charge(results, tmp_path):
    """--restart with an edited spec file kept the first file's name and hash on the study's run and
    experiment, and the report named the old spec."""
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    for path, epochs in ((first, 1), (second, 2)):
        path.write_text(f'[study]\nname = "restarted"\ndataset = "digits"\nepochs = {epochs}\n'
                        f'objective = "val/bce"\n[fixed]\nlatent = 2\neval_k = 5\neval_n = 50\nquality_n = 0\n')
        sweep.run_study(load_spec(path), results=results, progress=False, restart=True)
    client, exp_id, [parent], _ = mlflow_study(load_spec(second), results)
    assert client.get_run(parent).data.tags["vaebench.spec"] == str(second)
    assert client.get_experiment(exp_id).tags["vaebench.spec_sha256"] == load_spec(second).sha256


def test_reordering_the_grid_axes_does_not_train_the_cells_again(results):
    grid = {"model": ["vae", "ae"], "beta": [1.0, 2.0]}
    first = sweep.run_study(tiny_spec("reordered", grid=grid), results=results, progress=False)
    reordered = tiny_spec("reordered", grid=dict(reversed(grid.items())))  # beta before model
    again = sweep.run_study(reordered, results=results, progress=False)
    assert (first.trained_now, again.done, again.trained_now) == (4, 4, 0)
    assert len(optuna_trials(reordered, results)) == 4
    assert reordered.cell("model=ae,beta=2.0,seed=0").key == "beta=2.0,model=ae,seed=0"


def test_a_worker_without_a_queued_study_says_how_to_start_one(results):
    with pytest.raises(StudyError, match="no study 'nothing' in this storage yet"):
        sweep.run_worker(tiny_spec("nothing"), results=results, progress=False)


def test_a_journal_file_storage_works(results):
    spec = tiny_spec("journal")
    journal = f"journal:{results / 'journal.log'}"

    first = sweep.run_study(spec, results=results, storage=journal, progress=False)
    again = sweep.run_study(spec, results=results, storage=journal, progress=False)

    assert (first.done, first.trained_now, first.storage) == (1, 1, journal)
    assert (again.done, again.trained_now) == (1, 0)
    assert (results / "journal.log").stat().st_size > 0
    assert [t.state for t in optuna_trials(spec, results, storage=journal)] == [TrialState.COMPLETE]
    assert "journal" not in [s.study_name for s in optuna.get_all_study_summaries(sweep.storage_url(spec, results))]


# ---------------------------------------------------------------- searches

def search_spec(name: str, n_trials: int, pruner: str = "median"):
    return parse_spec({
        "study": {"name": name, "dataset": "digits", "epochs": 2, "objective": "val/elbo"},
        "search": {"n_trials": n_trials, "sampler": "random", "pruner": pruner,
                   "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}},
        "fixed": {"model": "vae", **FIXED}})


def test_a_search_trains_n_trials_per_cell_and_reports_every_epoch(results):
    spec = search_spec("search", n_trials=3)
    outcome = sweep.run_study(spec, results=results, progress=False)
    assert (outcome.cells, outcome.trials, outcome.done, outcome.trained_now) == (1, 3, 3, 3)
    trials = optuna_trials(spec, results)
    # The median pruner waits for 3 finished trials before it prunes any: all 3 complete.
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert sorted(t.user_attrs["slot"] for t in trials) == [0, 1, 2]
    assert len({t.params["lr"] for t in trials}) == 3
    assert all(1e-4 <= t.params["lr"] <= 1e-2 for t in trials)
    # the top-line table: the best of a cell's trials for its one seed, not the mean of all three
    [row] = [line.split() for line in outcome.summary.splitlines() if line.startswith("all ") and "±" in line]
    assert row[1] == f"{max(t.value for t in trials):.2f}" and row[-1] == "1"
    client, *_ = mlflow_study(spec, results)
    for trial in trials:  # what the pruner saw is what MLflow logged, epoch by epoch
        run = client.get_run(trial.user_attrs["run_id"])
        assert run.data.params["lr"] == str(trial.params["lr"])
        elbo = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/elbo")}
        assert trial.intermediate_values == elbo and sorted(elbo) == [1, 2]
        assert trial.value == elbo[int(run.data.tags["vaebench.best_epoch"])] == max(elbo.values())


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_parallel_workers_of_a_search_sample_different_configurations(results, sampler):
    """Each worker process seeded its sampler alike, so two workers drew the same values: a search
    on 2 workers trained every configuration twice (12 trials, 7 distinct)."""
    spec = parse_spec({**search_spec(f"parallel-{sampler}", n_trials=4).to_dict(),
                       "search": {"n_trials": 4, "sampler": sampler, "pruner": "none",
                                  "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}})
    sweep.run_study(spec, results=results, workers=2, progress=False)
    trials = optuna_trials(spec, results)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len({t.params["lr"] for t in trials}) == 4


def test_a_cmaes_search_runs_every_trial(results):
    """sampler = "cmaes" is a spec's option, but Optuna's CMA-ES needs the cmaes package: without it
    every trial after the first failed with ModuleNotFoundError."""
    spec = parse_spec({**search_spec("cmaes", n_trials=3).to_dict(),
                       "search": {"n_trials": 3, "sampler": "cmaes", "pruner": "none", "params": {
                           "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                           "beta": {"type": "float", "low": 0.5, "high": 2.0}}}})
    outcome = sweep.run_study(spec, results=results, progress=False)
    assert outcome.failed == []
    assert [t.state for t in optuna_trials(spec, results)] == [TrialState.COMPLETE] * 3


def test_a_trial_samples_from_a_stream_of_its_own_the_same_on_every_run():
    spec = search_spec("streams", n_trials=2)

    def first_value(trial: int) -> float:  # what trial number `trial`'s sampler draws first
        fresh = optuna.create_study(sampler=study.sampler(spec, trial))
        return fresh.ask().suggest_float("lr", 1e-4, 1e-2, log=True)

    assert first_value(0) == first_value(0) != first_value(1)  # reproducible per trial, different across trials


def test_pruned_trials_are_pruned_in_optuna_and_killed_in_mlflow(results, monkeypatch):
    # Too few trials for the median pruner to act; a threshold no ELBO (< 0 nats) reaches
    # makes Optuna prune every trial after its first epoch.
    monkeypatch.setattr(study, "pruner", lambda spec: optuna.pruners.ThresholdPruner(lower=0.0))
    spec = search_spec("pruned", n_trials=2)

    outcome = sweep.run_study(spec, results=results, progress=False)

    assert (outcome.done, outcome.trained_now, outcome.failed) == (2, 2, [])  # pruned counts as done
    trials = optuna_trials(spec, results)
    assert [t.state for t in trials] == [TrialState.PRUNED] * 2
    client, *_ = mlflow_study(spec, results)
    for trial in trials:
        assert list(trial.intermediate_values) == [1]
        assert trial.user_attrs["fail_reason"].startswith("pruned: val/elbo = ")
        assert trial.user_attrs["fail_reason"].endswith(" at epoch 1")
        [run] = client.search_runs([client.get_experiment_by_name("pruned").experiment_id],
                                   filter_string=f"tags.`{tracking.TRIAL}` = '{trial.number}'")
        assert run.info.status == "KILLED"
        assert run.data.tags["vaebench.state"] == "PRUNED"
        assert run.data.tags[tracking.FAIL_REASON] == trial.user_attrs["fail_reason"]
        assert client.list_artifacts(run.info.run_id, "model") == []
    assert sweep.run_study(spec, results=results, progress=False).trained_now == 0


def test_the_median_pruner_judges_a_trial_against_its_own_cell_only():
    """One Optuna study holds every cell of a grid search: a vae trial was pruned against the ae's
    epochs (on a grid model = ["ae", "vae"], every vae trial; the vae row was lost)."""
    def finished(cell, value):
        return optuna.trial.create_trial(value=value, intermediate_values={1: value}, user_attrs={"cell": cell},
                                         params={}, distributions={})

    pruned_by = optuna.create_study(pruner=study.pruner(search_spec("cells", n_trials=4)))
    for value in (20.0, 21.0, 22.0):  # model=ae: much lower numbers
        pruned_by.add_trial(finished("model=ae,seed=0", value))
    for value in (30.0, 31.0, 32.0):  # model=vae: a scale of its own
        pruned_by.add_trial(finished("model=vae,seed=0", value))

    def pruned(value: float) -> bool:  # a vae trial at epoch 1
        running = pruned_by.ask()
        running.set_user_attr("cell", "model=vae,seed=0")
        running.report(value, step=1)
        return running.should_prune()

    assert not pruned(30.5)  # better than the vae median (31); worse than the median of all six (26)
    assert pruned(31.5)      # worse than the vae median


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_a_seeded_search_sees_its_pruner_prune(results, pruner):
    # lr from 1e-5 (hardly learns) to 3e-2: over 10 trials of 4 epochs the real pruner (no
    # stand-in) stops the worst ones early; the sampler is seeded, so this is the same every run
    spec = parse_spec({
        "study": {"name": f"prune-{pruner}", "dataset": "digits", "epochs": 4, "objective": "val/elbo"},
        "search": {"n_trials": 10, "sampler": "random", "pruner": pruner,
                   "params": {"lr": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True}}},
        "fixed": {"model": "vae", **FIXED}})
    sweep.run_study(spec, results=results, progress=False)
    trials = optuna_trials(spec, results)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and len(pruned) < len(trials)
    assert all(len(t.intermediate_values) < 4 for t in pruned)


def test_a_worker_gives_numpys_blas_the_thread_count_it_gives_torch():
    """Two workers on two cores, each with BLAS threads of its own, made a 1 ms SVD take 235 ms."""
    from threadpoolctl import threadpool_info

    import torch

    from bench.worker import limit_threads

    before = torch.get_num_threads()
    limits = limit_threads(1)
    try:
        assert torch.get_num_threads() == 1
        pools = threadpool_info()
        assert any(pool["internal_api"] == "openblas" for pool in pools)  # numpy's, checked below
        assert [pool["num_threads"] for pool in pools] == [1] * len(pools)
    finally:
        limits.restore_original_limits()
        torch.set_num_threads(before)
