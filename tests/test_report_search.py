"""The report of a search study answers a search's questions: the best trials with their
sampled values and test metrics, Optuna's history, importances and slice plots, and the pruned
trials with the epoch each stopped at; it has no grid summary and no "BCE or MSE?".

The fast tests run a real Optuna search (TPE and the median pruner on a sqlite storage) whose
trials are logged to a real MLflow store through `bench.tracking` as the sweep logs them, with
validation curves given by formula; the slow test runs a tiny search through `bench sweep`.
"""

import json
import math

import optuna
import pandas as pd
import pytest
from PIL import Image

from bench import tracking
from bench.config import RunConfig
from bench.report import write_report
from bench.spec import parse_spec

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")]
STUDY, EPOCHS, TRIALS = "search", 4, 10
SPEC = parse_spec({"study": {"name": STUDY, "dataset": "digits", "epochs": EPOCHS, "objective": "val/elbo"},
                   "search": {"n_trials": TRIALS, "sampler": "tpe", "pruner": "median", "params": {
                       "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                       "beta": {"type": "float", "low": 0.5, "high": 2.0},
                       "latent": {"type": "int", "low": 2, "high": 64, "log": True}}},
                   "fixed": {"model": "vae", "loss": "bce"}})
SEARCH_FIGURES = ("optimization_history", "intermediate_values", "param_importances", "objective_vs_params")


def val_elbo(lr: float, beta: float, latent: int, epoch: int) -> float:
    """The validation ELBO of a trial after `epoch` epochs: best near lr 1e-3, beta 1, latent 16."""
    return -(100 + 10 * (math.log10(lr) + 3) ** 2 + 5 * (beta - 1) ** 2
             + (math.log2(latent) - 4) ** 2) - 10 / epoch


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_store):
    """<root>/mlflow.db and <root>/optuna.db holding the search, run by Optuna as the sweep
    runs it: every trial an MLflow run tagged with its study, trial, cell and objective."""
    root = tmp_path_factory.mktemp("search")
    uri = new_store(root)
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, STUDY)
    parent = tracking.study_run(client, exp_id, STUDY)
    study = optuna.create_study(study_name=STUDY, storage=f"sqlite:///{root / 'optuna.db'}",
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))
    study.set_user_attr("spec", json.dumps(SPEC.to_dict()))

    def objective(trial):
        sampled = {p.name: p.suggest(trial) for p in SPEC.search.params}
        cfg = RunConfig(dataset="digits", epochs=EPOCHS, **sampled)
        run_id = tracking.start_trial_run(
            client, exp_id, cfg, run_name=f"{trial.number:04d} seed=0", parent_run_id=parent,
            tags={tracking.STUDY: STUDY, tracking.TRIAL: trial.number, tracking.CELL: "seed=0",
                  "vaebench.objective_metric": "val/elbo", "vaebench.objective_direction": "maximize"})
        for epoch in range(1, EPOCHS + 1):
            value = val_elbo(**sampled, epoch=epoch)
            tracking.log_metrics(client, run_id, {"val/elbo": value, "train/loss": -value}, step=epoch)
            trial.report(value, epoch)
            if trial.should_prune():
                tracking.set_tags(client, run_id, {"vaebench.state": "PRUNED"})
                tracking.end_run(client, run_id, "KILLED", f"pruned: val/elbo = {value:.4g} at epoch {epoch}")
                raise optuna.TrialPruned()
        tracking.log_metrics(client, run_id, {"test/elbo": value - 1, "test/nll": -value, "test/bce": 50.0,
                                              "test/mse": 10.0, "best_epoch": EPOCHS, "trial_seconds": 2.0},
                             step=EPOCHS)
        tracking.set_tags(client, run_id, {"vaebench.proper_density": "false"})
        tracking.end_run(client, run_id)
        return value

    study.optimize(objective, n_trials=TRIALS)
    tracking.end_run(client, parent)
    return root, study


@pytest.fixture(scope="module")
def report(store):
    return write_report(STUDY, results=store[0])  # default stores: <results>/mlflow.db, optuna.db


def test_the_search_ran_with_pruned_and_completed_trials(store):
    states = {t.state.name for t in store[1].trials}
    assert states == {"COMPLETE", "PRUNED"}


def test_a_search_report_has_no_grid_summary_and_no_bce_or_mse(report):
    text = (report / "report.md").read_text()
    assert "grid axes" not in text and "## Summary" not in text and "BCE or MSE?" not in text
    assert "search over lr, beta, latent (10 trials per cell, tpe sampler, median pruner)" in text
    assert "objective `val/elbo` (maximize)" in text


def test_the_best_trials_are_ranked_by_the_objective_with_sampled_values_and_test_metrics(report, store):
    study = store[1]
    text = (report / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| trial | objective |"))
    assert header == ("| trial | objective | lr | beta | latent | test/elbo | test/nll | test/mse | "
                      "test/bce | seconds |")
    rows = [line for line in text.split(header)[1].splitlines()[2:] if line.startswith("|")][:5]
    complete = sorted((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: -t.value)
    for line, trial in zip(rows, complete):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert int(cells[0]) == trial.number and float(cells[1]) == pytest.approx(trial.value, abs=0.005)
        assert float(cells[2]) == pytest.approx(trial.params["lr"], rel=1e-3)
        assert int(cells[4]) == trial.params["latent"]
        assert float(cells[5]) == pytest.approx(trial.value - 1, abs=0.005)  # test/elbo
    assert rows[0].startswith(f"| {study.best_trial.number} |")


def test_a_searched_choice_of_names_is_shown_as_it_is():
    """A categorical search over loss = ["bce", "mse"] crashed the report: every sampled value was
    formatted as a number."""
    from bench.report.document import best_trials_table

    done = pd.DataFrame({"trial": [0, 1], "objective": [30.0, 29.0], "loss": ["bce", "mse"], "lr": [1e-3, 2e-3]})
    header, rows = best_trials_table(done, ["loss", "lr"], [], "minimize")
    assert header[:4] == ["trial", "objective", "loss", "lr"]
    assert [row[:4] for row in rows] == [["1", "29.00", "mse", "0.002"], ["0", "30.00", "bce", "0.001"]]


def test_a_grid_searchs_best_trials_name_their_cell():
    """A search inside a grid over model listed its best trials with nothing saying which model."""
    from bench.report.document import best_trials_table

    done = pd.DataFrame({"trial": [0, 1], "objective": [30.0, 29.0], "model": ["vae", "ae"], "lr": [1e-3, 2e-3]})
    header, rows = best_trials_table(done, ["lr"], [], "minimize", axes=["model"])
    assert header[:4] == ["trial", "cell", "objective", "lr"]
    assert [row[:3] for row in rows] == [["1", "ae", "29.00"], ["0", "vae", "30.00"]]


def test_pruned_trials_are_listed_with_the_epoch_each_stopped_at(report, store):
    text = (report / "report.md").read_text()
    listed = text.split("## Failed and pruned trials")[1]
    pruned = [t for t in store[1].trials if t.state.name == "PRUNED"]
    for trial in pruned:
        row = next(line for line in listed.splitlines() if line.startswith(f"| {trial.number} |"))
        assert f"| PRUNED | {trial.last_step} |" in row and f"at epoch {trial.last_step}" in row


def test_optunas_plots_and_importances_are_in_the_report(report):
    text = (report / "report.md").read_text()
    for name in SEARCH_FIGURES:
        image = Image.open(report / "figures" / f"{name}.png")
        assert image.width == 1400 and 300 <= image.height <= 600, name
        assert f"](figures/{name}.png)" in text
    importances = [line for line in text.splitlines() if line.startswith(("| lr |", "| beta |", "| latent |"))]
    assert len(importances) == 3
    assert sum(float(line.split("|")[2]) for line in importances) == pytest.approx(1.0, abs=0.01)
    html = (report / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(SEARCH_FIGURES)


def test_the_csvs_hold_every_trial(report, store):
    runs = pd.read_csv(report / "runs.csv")
    assert sorted(runs["trial"]) == [t.number for t in store[1].trials]
    pruned = runs[runs["state"] == "PRUNED"]
    assert (pruned["last_epoch"] < EPOCHS).all()


@pytest.mark.slow
def test_report_of_a_search_run_by_the_sweep(tmp_path, new_store, monkeypatch):
    from bench.spec import override
    from bench.sweep import run_study

    monkeypatch.chdir(tmp_path)
    new_store(tmp_path)
    spec = override(SPEC, epochs=2)
    spec = parse_spec({**spec.to_dict(), "search": {**spec.to_dict()["search"], "n_trials": 5},
                       "fixed": {"model": "vae", "loss": "bce", "eval_k": 5, "eval_n": 50}})
    outcome = run_study(spec, results=tmp_path, progress=False)
    out = write_report(outcome.experiment, results=tmp_path)
    text = (out / "report.md").read_text()
    assert "## Best trials" in text and "grid axes" not in text and "BCE or MSE?" not in text
    assert (out / "figures" / "optimization_history.png").is_file()
