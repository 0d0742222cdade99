"""Reports from a real MLflow store: what `bench report` reads, computes and writes.

Most tests read one synthetic study, logged through `bench.tracking` exactly as a sweep logs
trials but with metric values set by formula, so every mean, spread and interval has an exact
expected value. The slow test runs the smoke study end to end and reports on it.
"""

import base64
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench import tracking
from bench.config import RunConfig, field_types
from bench.report import (MIN_SEEDS, ReportError, finished, load_runs, mean_interval,
                          paired_differences, summarize, write_report)

STUDY = "synthetic"
T_975_2 = 4.302653  # Student's t, 97.5% quantile, 2 degrees of freedom (tables)
FIGURES = ("metrics_vs_latent", "learning_curves", "objective_heatmap", "rate_distortion",
           "seconds_per_trial", "bce_vs_mse_pictures")
REPORT_FILES = ("runs.csv", "summary.csv", "differences.csv", "table.tex", "report.md", "report.html")


def final_metrics(model: str, loss: str, latent: int, seed: int) -> dict[str, float]:
    """Known test metrics: bce - mse is 10 - seed on test/bce and 1 - 0.1 seed on test/mse."""
    metrics = {"test/bce": (100 if loss == "bce" else 90 + seed) + latent + seed,
               "test/mse": (10 + 0.1 * seed) if loss == "bce" else (9 + 0.2 * seed),
               "trial_seconds": 1.0 + seed, "best_epoch": 2}
    if model != "ae":  # an AE has no ELBO: absent, never 0
        metrics.update({"test/elbo": -(100.0 + latent + seed), "test/nll": 99.0 + latent + seed,
                        "test/kl": float(latent), "test/recon": 100.0 + seed})
    return metrics


def log_trial(client, exp_id, parent, trial, *, model, loss, latent, seed, status="FINISHED",
              state=None, reason=None, image_steps=(), study=STUDY, axes=("model", "loss", "latent")):
    """One trial run as a sweep logs it: params, two epochs of validation metrics, final test
    metrics, the vaebench tags and samples and reconstructions at `image_steps` (grey level
    200 at step 3, black before)."""
    cfg = RunConfig(model=model, loss=loss, latent=latent, seed=seed, dataset="digits", epochs=2)
    values = {"model": model, "loss": loss, "latent": latent}
    cell = ",".join(f"{axis}={values[axis]}" for axis in axes) + f",seed={seed}"
    run_id = tracking.start_trial_run(
        client, exp_id, cfg, run_name=f"{trial:04d} {cell}", parent_run_id=parent,
        tags={tracking.STUDY: study, tracking.TRIAL: trial, tracking.CELL: cell,
              "vaebench.dataset": "digits", "vaebench.binarize": "none",
              "vaebench.objective": "val/bce (minimize) of the epoch chosen by validation"})
    for epoch in (1, 2):
        metrics = {"val/bce": 110.0 - 5 * epoch + seed, "val/mse": 12.0 - epoch}
        if model != "ae":
            metrics["val/elbo"] = -(120.0 - 10 * epoch) - seed
        tracking.log_metrics(client, run_id, metrics, step=epoch)
        if status != "FINISHED":
            break
    if status == "FINISHED":
        tracking.log_metrics(client, run_id, final_metrics(model, loss, latent, seed), step=2)
        tracking.set_tags(client, run_id, {"vaebench.proper_density": str(loss == "mse").lower(),
                                           "vaebench.device": "cpu (test)"})
    for key, shape in (("samples", (40, 40)), ("recon", (20, 50))):
        for step in image_steps:
            value = 200 if step == 3 else 0
            tracking.log_image(client, run_id, key, np.full(shape, value, np.uint8), step=step)
    if state:
        tracking.set_tags(client, run_id, {"vaebench.state": state})
    tracking.end_run(client, run_id, status, reason)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_store):
    """<root>/results/mlflow.db holding study "synthetic": vae and ae x bce and mse x latent 2
    and 8 x seeds 0-2 (ae-mse-8 lacks seed 2), one diverged and one pruned trial."""
    root = tmp_path_factory.mktemp("report")
    uri = new_store(root / "results")
    client = tracking.connect(uri)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        exp_id = tracking.experiment_id(client, STUDY)
        parent = tracking.study_run(client, exp_id, STUDY)
        trial = 0
        for seed in (0, 1, 2):
            for model in ("vae", "ae"):
                for loss in ("bce", "mse"):
                    for latent in (2, 8):
                        if (model, loss, latent, seed) == ("ae", "mse", 8, 2):
                            continue
                        steps = (1, 3) if (model, loss) == ("vae", "bce") else (3,)
                        log_trial(client, exp_id, parent, trial, model=model, loss=loss, latent=latent,
                                  seed=seed, image_steps=steps if (seed, latent) == (0, 8) else ())
                        trial += 1
        log_trial(client, exp_id, parent, trial, model="vae", loss="mse", latent=2, seed=3,
                  status="FAILED", state="DIVERGED",
                  reason="training diverged: loss is nan at epoch 1, step 3 of 20")
        log_trial(client, exp_id, parent, trial + 1, model="ae", loss="bce", latent=2, seed=3,
                  status="KILLED", state="PRUNED", reason="pruned: val/bce = 105 at epoch 1")
        tracking.end_run(client, parent)
    return root, uri, client


@pytest.fixture(scope="module")
def runs(store):
    return load_runs(store[1], STUDY)


@pytest.fixture(scope="module")
def report(store):
    root, _, _ = store
    return write_report(None, results=root / "results")  # the default store and experiment


def test_load_runs_gives_one_row_per_trial_with_typed_params_and_states(runs):
    assert len(runs) == 25
    assert runs["trial"].tolist() == list(range(25))
    assert runs["state"].value_counts().to_dict() == {"FINISHED": 23, "DIVERGED": 1, "PRUNED": 1}
    row = runs[runs["cell"] == "model=vae,loss=bce,latent=8,seed=1"].iloc[0]
    assert (row["model"], row["loss"], row["latent"], row["seed"], row["lr"]) == ("vae", "bce", 8, 1, 0.001)
    assert row["test/bce"] == 109 and row["test/elbo"] == -109
    assert row["objective_metric"] == "val/bce" and row["objective"] == 101  # val/bce at best_epoch 2
    assert row["proper_density"] is False  # bce on grey pixels: not a density
    ae = runs[(runs["model"] == "ae") & (runs["state"] == "FINISHED")]
    assert ae["test/elbo"].isna().all() and ae["test/nll"].isna().all()  # absent, never 0


def test_the_objective_is_read_from_the_sweeps_tags_and_old_runs_from_their_sentence():
    from bench.report.runs import objective_of

    assert objective_of({"vaebench.objective_metric": "val/elbo", "vaebench.objective_direction": "maximize",
                         "vaebench.objective": "val/bce (minimize) of the epoch chosen by validation"}) == \
        ("val/elbo", "maximize")  # the structured tags win
    assert objective_of({"vaebench.objective": "val/bce (minimize) of the epoch chosen by validation"}) == \
        ("val/bce", "minimize")  # runs logged before the tags existed (this module's store)
    assert objective_of({"vaebench.selection": "val/elbo"}) == ("val/elbo", "maximize")  # bench train
    assert objective_of({}) == ("", "")


def test_summary_has_mean_std_and_n_over_seeds_and_flags_small_cells(runs):
    summary = summarize(runs).set_index(["model", "loss", "latent", "metric"])
    cell = summary.loc[("vae", "bce", 2, "test/bce")]
    assert (cell["mean"], cell["std"], cell["n"], cell["flag"]) == (103.0, 1.0, 3, "")
    assert summary.loc[("vae", "mse", 2, "test/bce"), "mean"] == 94.0  # 92, 94, 96: seed 3 diverged
    small = summary.loc[("ae", "mse", 8, "test/bce")]
    assert (small["n"], small["flag"]) == (2, "n<3") and MIN_SEEDS == 3
    assert not summary.loc[("vae", "bce", 2, "test/nll"), "comparable"]  # bce on grey data
    assert summary.loc[("vae", "bce", 2, "test/mse"), "comparable"]      # one yardstick
    assert ("ae", "bce", 2, "test/elbo") not in summary.index


def test_paired_differences_give_a_t_interval_over_seeds(runs):
    paired = paired_differences(runs).set_index(["model", "latent", "metric"])
    bce = paired.loc[("vae", 2, "test/bce")]
    half = T_975_2 * 1.0 / math.sqrt(3)  # differences 10, 9, 8: mean 9, sd 1
    assert bce["difference"] == pytest.approx(9.0)
    assert (bce["ci_low"], bce["ci_high"]) == (pytest.approx(9 - half, abs=1e-5),
                                               pytest.approx(9 + half, abs=1e-5))
    assert (bce["n"], bce["verdict"]) == (3, "mse better")
    mse = paired.loc[("vae", 2, "test/mse")]  # 1, 0.9, 0.8
    assert mse["difference"] == pytest.approx(0.9) and mse["verdict"] == "mse better"
    nll = paired.loc[("vae", 2, "test/nll")]  # bce is not a density on grey data
    assert nll["n"] == 0 and nll["verdict"].startswith("not comparable")
    assert paired.loc[("ae", 8, "test/bce"), "n"] == 2


def test_mean_interval_is_students_t():
    mean, low, high = mean_interval(np.array([1.0, 2.0, 3.0]))
    assert mean == 2.0 and high - mean == pytest.approx(T_975_2 / math.sqrt(3), abs=1e-5)
    assert np.isnan(mean_interval(np.array([5.0]))[1])


def test_a_search_keeps_the_best_trial_per_cell_by_validation():
    runs = pd.DataFrame({"cell": ["a,seed=0", "a,seed=0", "b,seed=0"], "run_id": ["1", "2", "3"],
                         "state": "FINISHED", "objective": [3.0, 1.0, 2.0],
                         "objective_direction": "minimize"})
    assert finished(runs)["run_id"].tolist() == ["2", "3"]


def test_report_writes_every_file(report):
    assert report.name == STUDY and report.parent.name == "reports"
    for name in REPORT_FILES:
        assert (report / name).stat().st_size > 0, name
    for name in FIGURES:
        assert (report / "figures" / f"{name}.png").is_file(), name


def test_csv_values_equal_what_mlflow_holds(report, store):
    client = store[2]
    csv = pd.read_csv(report / "runs.csv")
    assert len(csv) == 25
    types = field_types()
    for _, row in csv.iterrows():
        run = client.get_run(row["run_id"])
        for name, value in run.data.metrics.items():
            assert row[name] == value, (row["run_id"], name)
        for name, text in run.data.params.items():
            assert row[name] == types[name](text), (row["run_id"], name)
        assert row["status"] == run.info.status
    summary = pd.read_csv(report / "summary.csv").set_index(["model", "loss", "latent", "metric"])
    assert summary.loc[("vae", "bce", 2, "test/bce"), ["mean", "std", "n"]].tolist() == [103.0, 1.0, 3]


def test_figures_are_nonempty_pngs_of_the_expected_size(report):
    for name in FIGURES:
        image = Image.open(report / "figures" / f"{name}.png")
        assert image.format == "PNG" and image.width == 1400, name
        assert 300 <= image.height <= 2500, (name, image.height)
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10, name  # drawn on, not blank


def test_report_is_honest_about_losses_failures_and_n(report):
    text = (report / "report.md").read_text()
    assert "MSE looked better" in text and "95%" in text
    assert "DIVERGED" in text and "training diverged: loss is nan" in text
    assert "PRUNED" in text and "pruned: val/bce = 105" in text
    assert "(n=3)" in text and "(n=2)*" in text and "†" in text
    assert "103.00 ± 1.00 (n=3)" in text  # vae bce latent 2, test/bce
    tex = (report / "table.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"103.00 $\pm$ 1.00 (n=3)" in tex


def test_html_report_is_self_contained(report):
    html = (report / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(FIGURES)
    assert 'src="figures/' not in html and "<table>" in html
    first = html.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(first) == (report / "figures" / f"{FIGURES[0]}.png").read_bytes()


def test_a_grid_over_models_alone_shows_metrics_per_cell_not_against_latent(tmp_path, new_store):
    uri = new_store(tmp_path / "results")
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, "models")
    parent = tracking.study_run(client, exp_id, "models")
    for trial, (model, seed) in enumerate((m, s) for m in ("vae", "ae") for s in (0, 1, 2)):
        log_trial(client, exp_id, parent, trial, model=model, loss="bce", latent=8, seed=seed,
                  study="models", axes=("model",))
    tracking.end_run(client, parent)

    out = write_report("models", results=tmp_path / "results")

    drawn = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert drawn == ["learning_curves", "rate_distortion", "seconds_per_trial", "test_metrics"]
    md = (out / "report.md").read_text()
    assert "Test metrics per cell" in md and "latent size" not in md and "BCE and MSE" not in md


def test_the_seed_figure_uses_the_pictures_of_the_highest_step(store):
    from bench.report import run_images

    runs = load_runs(store[1], STUDY)
    run_id = runs.loc[runs["cell"] == "model=vae,loss=bce,latent=8,seed=0", "run_id"].iloc[0]
    pictures = run_images(store[2], run_id)
    assert pictures["samples"].shape == (40, 40) and (pictures["samples"] == 200).all()
    assert pictures["recon"].shape == (20, 50)


def test_missing_experiment_names_it_and_lists_the_existing_ones(store):
    with pytest.raises(ReportError, match=r"no experiment named 'nope'.*synthetic.*make sweep"):
        load_runs(store[1], "nope")


def test_experiment_without_runs_and_store_without_experiments_give_clear_errors(tmp_path, mlflow_uri):
    client = tracking.connect(mlflow_uri)
    with pytest.raises(ReportError, match="no trial runs in any experiment.*make sweep"):
        write_report(None, results=tmp_path)
    tracking.experiment_id(client, "empty")
    with pytest.raises(ReportError, match=r"experiment 'empty' has no trial runs of a study \(sqlite.*make sweep"):
        write_report("empty", results=tmp_path)


def test_an_unreadable_optuna_storage_is_an_error_not_a_report_without_its_search(store, tmp_path):
    """A corrupt optuna.db made the report leave out a search's sections without a word."""
    (tmp_path / "optuna.db").write_bytes(b"not a database" * 100)
    with pytest.raises(ReportError, match="cannot read Optuna storage .*optuna.db: .*move the file away"):
        write_report(STUDY, results=tmp_path, tracking_uri=store[1])


def test_no_store_is_an_error_not_a_new_empty_store(tmp_path):
    with pytest.raises(ReportError, match="no MLflow store at .*make sweep"):
        write_report(None, results=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()


def test_default_experiment_is_the_one_with_the_newest_trial(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = tracking.connect(mlflow_uri)
    for name in ("older", "newer"):
        exp_id = tracking.experiment_id(client, name)
        cfg = RunConfig(dataset="digits")
        run_id = tracking.start_trial_run(client, exp_id, cfg, run_name="t",
                                          tags={tracking.STUDY: name, tracking.TRIAL: 0})
        tracking.end_run(client, run_id, "FAILED", "boom")
    # a model trained on its own afterwards (`bench train`: a trial run of no study) is not a study
    alone = tracking.start_trial_run(client, tracking.experiment_id(client, "train"), cfg, run_name="alone")
    tracking.end_run(client, alone)
    out = write_report(None, results=tmp_path)
    assert out.name == "newer"
    assert "boom" in (out / "report.md").read_text()  # only failures: listed, nothing to plot
    with pytest.raises(ReportError, match=r"'train' has no trial runs of a study \(.*`bench train`\).*older"):
        write_report("train", results=tmp_path)


def test_studies_whose_names_differ_only_in_punctuation_get_folders_of_their_own(tmp_path, mlflow_uri):
    """"a b c" and "a_b_c" both wrote reports/a_b_c/, the second overwriting the first."""
    client = tracking.connect(mlflow_uri)
    for name in ("a_b_c", "a b c"):
        run_id = tracking.start_trial_run(client, tracking.experiment_id(client, name), RunConfig(dataset="digits"),
                                          run_name="t", tags={tracking.STUDY: name, tracking.TRIAL: 0})
        tracking.end_run(client, run_id, "FAILED", f"boom in {name}")
    plain, spaced = (write_report(name, results=tmp_path) for name in ("a_b_c", "a b c"))
    assert plain.name == "a_b_c" and spaced.name.startswith("a_b_c-") and plain != spaced
    assert "boom in a_b_c" in (plain / "report.md").read_text()
    assert "boom in a b c" in (spaced / "report.md").read_text()


@pytest.mark.slow
def test_report_on_the_smoke_study(tmp_path, new_store, monkeypatch):
    from bench.spec import load_spec
    from bench.sweep import run_study

    monkeypatch.chdir(tmp_path)
    new_store(tmp_path)
    outcome = run_study(load_spec("smoke"), results=tmp_path, progress=False)
    out = write_report(outcome.experiment, results=tmp_path, tracking_uri=outcome.tracking_uri)
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    smoke_figures = ["test_metrics" if name == "metrics_vs_latent" else name for name in FIGURES]  # no latent axis
    assert sorted(p.stem for p in (out / "figures").glob("*.png")) == sorted(smoke_figures)
    for name in smoke_figures:
        image = Image.open(out / "figures" / f"{name}.png")
        assert image.width == 1400 and image.height >= 300, name
    client = tracking.connect(outcome.tracking_uri)
    csv = pd.read_csv(out / "runs.csv")
    assert len(csv) == outcome.trials and set(csv["state"]) == {"FINISHED"}
    text = (out / "report.md").read_text()
    assert "| cvae | bce |" in text and "(n=1)*‡" in text  # the CVAE's numbers are conditional
    assert "BCE or MSE?" in text and "Holm" in text
    header = next(line for line in text.splitlines() if line.startswith("| model | loss |"))
    for metric in ("test/elbo", "test/nll", "test/fd", "test/precision", "test/recall", "test/class_entropy"):
        assert metric in header, metric  # sample quality beside the ELBO and NLL
    assert "judged by a classifier trained on digits: test accuracy" in text
    for _, row in csv.iterrows():
        for name, value in client.get_run(row["run_id"]).data.metrics.items():
            assert row[name] == value, name
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["flag"].dropna()) == {"n<3"}  # the smoke study has one seed
