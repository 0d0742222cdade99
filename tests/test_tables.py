"""Paper tables: the specs behind them, and our numbers rendered beside the published ones.

Rendering is tested on runs read back from a real MLflow store, logged through
`bench.tracking` with known values; the slow test trains a tiny stand-in of a paper's study.
"""

import shutil

import pytest

from bench import tables, tracking
from bench.config import RunConfig
from bench.errors import BenchError
from bench.report import load_runs
from bench.spec import load_spec
from bench.tables import PAPERS, paper_spec, render_table, write_table

# Fields a paper's CPU budget may cut; everything else must match its -full spec.
BUDGET = {"dataset", "epochs", "eval_k", "eval_n", "warmup_epochs", "seed"}


def log_runs(uri, study, axes, cells):
    """A study on grid `axes` whose trial runs hold `cells`: (RunConfig fields, final metrics,
    whether the likelihood is a density on the data)."""
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, study)
    for trial, (fields, metrics, proper) in enumerate(cells):
        cfg = RunConfig(**fields)
        cell = ",".join(f"{axis}={getattr(cfg, axis)}" for axis in (*axes, "seed"))
        run_id = tracking.start_trial_run(client, exp_id, cfg, run_name=str(trial),
                                          tags={tracking.STUDY: study, tracking.TRIAL: trial,
                                                tracking.CELL: cell})
        tracking.log_metrics(client, run_id, {**metrics, "best_epoch": 1}, step=1)
        tracking.set_tags(client, run_id, {"vaebench.proper_density": str(proper).lower()})
        tracking.end_run(client, run_id)
    return load_runs(uri, study)


@pytest.mark.parametrize("name", PAPERS)
def test_each_paper_has_a_cpu_spec_and_a_full_spec_that_train_the_same_models(name):
    paper = PAPERS[name]
    cpu, full = load_spec(paper.spec_path()), load_spec(paper.spec_path(full=True))
    assert (cpu.name, full.name) == (name, f"{name}-full")
    assert [c.grid_key for c in cpu.cells()][:len(cpu.cells()) // len(cpu.seeds)] == \
           [c.grid_key for c in full.cells()][:len(full.cells()) // len(full.seeds)]
    for cell in cpu.cells()[:1]:
        ours, theirs = cpu.config(cell).to_dict(), full.config(full.cells()[0]).to_dict()
        assert {k for k in ours if ours[k] != theirs[k]} <= BUDGET
    for row in paper.rows:  # every trained row picks cells of the study
        if row.match:
            assert any(all(cpu.config(c).to_dict()[k] == v for k, v in row.match.items())
                       for c in cpu.cells()), row.label


def test_burda_table_sets_the_published_column_apart_from_ours(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = dict(model="iwae", arch="iwae", latent=50, dataset="mnist5k", binarize="dynamic",
                epochs=10, batch_size=20, eval_k=500, eval_n=500)
    runs = log_runs(mlflow_uri, "burda2015", ["k"], [
        (dict(base, k=k), {"test/nll": nll, "test/active_units": units}, True)
        for k, nll, units in ((1, 95.5, 17.0), (5, 94.25, 21.0), (50, 93.0, 30.0))])
    markdown, latex = render_table("burda2015", runs, full=False)
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert "published (MNIST)" in header and "ours (mnist5k, binarize dynamic)" in header
    assert "ours − published" not in header  # other data: never subtracted
    assert "| VAE (k = 1) | 86.76 | 95.50 (n=1)* | 19 | 17.0 (n=1)* |" in markdown
    assert "| IWAE, k = 50 | 84.78 | 93.00 (n=1)* |" in markdown
    assert "dataset: mnist5k here; mnist in the paper's budget (MNIST)" in markdown
    assert "epochs: 10 here; 3280 in the paper's budget" in markdown
    assert "eval_k: 500 here; 5000" in markdown and "learning-rate decay" in markdown
    assert r"\toprule" in latex and "86.76" in latex and r"95.50 (n=1)*" in latex


def test_exemplar_on_the_papers_own_data_shows_the_difference(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = dict(model="vae", arch="gated", loss="bce", latent=40, dataset="fashion-mnist",
                binarize="dynamic", epochs=5, lr=5e-4, batch_size=100, warmup_epochs=1,
                patience=50, eval_k=500, eval_n=500)
    runs = log_runs(mlflow_uri, "exemplar2020", [], [
        (dict(base, seed=s), {"test/nll": nll}, True) for s, nll in ((0, 229.5), (1, 230.5), (2, 230.0))])
    markdown, _ = render_table("exemplar2020", runs, full=False)
    assert "| VAE, Gaussian prior | 228.70 ± 0.15 | 230.00 ± 0.50 (n=3, se 0.29) | +1.30 |" in markdown
    assert "| VampPrior (not trained here) | 227.35 | not trained here | — |" in markdown
    assert "dataset:" not in markdown  # the same data as the paper
    assert "epochs: 5 here; 2000 in the paper's budget" in markdown


def test_seed_table_answers_bce_or_mse_with_paired_intervals(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cells = []
    for seed in (0, 1, 2):
        for loss, bce in (("bce", 100.0 + 0.1 * seed), ("mse", 103.0)):
            cells.append((dict(model="vae", loss=loss, latent=32, dataset="mnist5k", seed=seed),
                          {"test/bce": bce, "test/mse": 20.0, "test/nll": 50.0}, loss == "mse"))
    runs = log_runs(mlflow_uri, "seed", ["model", "loss"], cells)
    markdown, _ = render_table("seed", runs, full=False)
    assert "MSE looked better" in markdown
    assert "| VAE, bce | — | 100.10 ± 0.10 (n=3, se 0.06) |" in markdown
    # t = -2.9 / (0.1 / sqrt 3) with 2 degrees of freedom: p = 0.000396, one cell (Holm: the same)
    assert "| vae | test/bce | -2.90 | [-3.15, -2.65] | 3 | 0.000396 | bce better |" in markdown
    assert "| vae | test/mse | +0.00 | [+0.00, +0.00] | 3 | 1 | no clear difference |" in markdown
    assert "the measured numbers contradict it" in markdown
    assert "not comparable" in markdown  # test/nll: bce is not a density on grey pixels
    assert "| CVAE, bce | — | not run |" in markdown


def test_unknown_paper_is_a_clear_error():
    with pytest.raises(BenchError, match="unknown paper table 'nope': choose from exemplar2020"):
        render_table("nope", None, full=False)


def test_tables_do_not_import_the_sweep():
    """The CLI runs the study, then renders the table: rendering needs neither Optuna nor torch's
    training loop, so bench.tables does not import bench.sweep."""
    import ast

    tree = ast.parse(open(tables.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "bench.sweep" not in imported and not hasattr(tables, "run_table")


@pytest.mark.slow
def test_a_paper_study_run_then_rendered_writes_markdown_latex_and_the_figure(tmp_path, new_store,
                                                                              monkeypatch):
    from bench.sweep import run_study

    papers = tmp_path / "paper"
    papers.mkdir()
    shutil.copy(PAPERS["kingma2013"].spec_path(full=True), papers)
    (papers / "kingma2013.toml").write_text(
        '[study]\nname = "kingma2013"\ndataset = "digits"\nbinarize = "dynamic"\nepochs = 1\n'
        '[grid]\nlatent = [3, 5]\n[fixed]\nmodel = "vae"\nloss = "bce"\narch = "kw"\n'
        'eval_k = 5\neval_n = 50\n')
    monkeypatch.setattr(tables, "PAPER_DIR", papers)
    monkeypatch.chdir(tmp_path)
    new_store(tmp_path)
    outcome = run_study(paper_spec("kingma2013"), results=tmp_path, progress=False)
    markdown = write_table("kingma2013", results=tmp_path, tracking_uri=outcome.tracking_uri)
    assert "| VAE, latent 3 | — |" in markdown and "| VAE, latent 20 | — | not run |" in markdown
    assert "dataset: digits here; mnist in the paper's budget (MNIST)" in markdown
    for suffix in ("md", "tex", "png"):
        assert (tmp_path / "tables" / f"kingma2013.{suffix}").stat().st_size > 0
