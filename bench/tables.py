"""Paper tables: a paper's study run like any other, then our numbers set beside the published
ones in markdown and LaTeX (`bench table NAME [--full]`, `make paper`).

Each paper has two specs in experiments/paper/: `<name>.toml`, a CPU budget that finishes in a
few minutes on two cores, and `<name>-full.toml`, the paper's budget (its own study, so the
two never mix in one MLflow experiment). The table states the data and budget our numbers come
from and lists, field by field, where they differ from the paper's budget, read from the full
spec. The published column holds only what the paper printed, on the paper's data; our numbers
sit in a column of their own named by our data, and a difference to the published number is
shown only where the data are the same.

    run_study(paper_spec("burda2015"), results=Path("results"))   # bench.sweep: trains
    markdown = write_table("burda2015", results=Path("results"))  # renders what MLflow holds
    markdown, latex = render_table("burda2015", load_runs(uri, "burda2015"), full=False)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench import tracking
from bench.report.document import differences_table, format_stat, latex_table, markdown_table
from bench.report.figures import CONDITIONAL_NOTE, DPI, figure_metrics
from bench.report.runs import ReportError, load_runs
from bench.report.stats import (MIN_SEEDS, better_text, conditional_model, facts, finished,
                                loss_verdict, paired_differences)
from bench.spec import EXPERIMENTS_DIR, StudySpec, load_spec

PAPER_DIR = EXPERIMENTS_DIR / "paper"
# RunConfig fields whose value in our runs is checked against the paper's budget (the -full spec).
COMPARED = ("dataset", "binarize", "arch", "latent", "epochs", "batch_size", "optimizer", "lr",
            "warmup_epochs", "warmup_schedule", "patience", "eval_k", "eval_n")


@dataclass(frozen=True)
class Row:
    """One line of a paper's table: `match` picks our runs (RunConfig values; empty: a model we
    do not train), `published` the numbers as the paper printed them, by metric."""

    label: str
    match: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Paper:
    name: str
    citation: str
    data: str               # the paper's data, as a column header names it
    dataset: str            # our registry name for the same data
    setup: str              # what the paper trained and how it evaluated, in words
    metrics: tuple[str, ...]
    rows: tuple[Row, ...]
    never_matched: tuple[str, ...] = ()  # what even the full budget does differently
    note: str = ""          # what the published column holds when it holds no numbers
    plot_x: str | None = None  # also draw our metrics against this axis (a figure, not a table)
    compare_losses: bool = False  # add bce − mse per cell, paired by seed, with 95% intervals

    def spec_path(self, full: bool = False) -> Path:
        return PAPER_DIR / f"{self.name}{'-full' if full else ''}.toml"


PAPERS: dict[str, Paper] = {p.name: p for p in (
    Paper(
        name="exemplar2020",
        citation='Norouzi et al. 2020, "Exemplar VAE", Table 1 (dynamically binarized Fashion-MNIST)',
        data="Fashion-MNIST", dataset="fashion-mnist",
        setup=("a VAE with a N(0, I) prior; two hidden layers of 300 gated units (GatedDense) in "
               "encoder and decoder, z = 40, log-variance through hardtanh(-6, 2); AdamNormGrad "
               "(Adam on gradients scaled to unit norm per tensor) lr 5e-4, batch 100, at most 2000 "
               "epochs; KL weight epoch/100 over the first 100 epochs, the early-stopping counter "
               "held at 0 during them, then stop once it exceeds 50 (51 epochs without a better "
               "validation loss); dynamically binarized Fashion-MNIST (validation and test "
               "binarized once), 50k/10k train/validation; the best-validation model tested with "
               "5000 importance samples on the 10,000 test images"),
        metrics=("test/nll",),
        rows=(Row("VAE, Gaussian prior", {"model": "vae"}, {"test/nll": "228.70 ± 0.15"}),
              Row("VampPrior (not trained here)", {}, {"test/nll": "227.35"}),
              Row("HVAE, two levels (not trained here)", {}, {"test/nll": "227.37"}),
              Row("ConvHVAE (not trained here)", {}, {"test/nll": "225.38"})),
        never_matched=("the paper's Bernoulli clamps probabilities to [1e-5, 1 - 1e-5]; `bce` here is "
                       "the exact likelihood from logits",
                       "AdamNormGrad puts eps outside Adam's bias correction (sqrt(v) + eps, not "
                       "sqrt(v / (1 - beta2^t)) + eps as torch's Adam does); with eps = 1e-8 and "
                       "unit-norm gradients the difference is below float32 resolution after the "
                       "first steps",
                       "the binarisation draws and the batch order come from our seeds, not theirs "
                       "(their validation and test draws use numpy seed 777)")),
    Paper(
        name="burda2015",
        citation=("Burda, Grosse & Salakhutdinov 2015, \"Importance Weighted Autoencoders\", "
                  "Table 1 (MNIST, one stochastic layer)"),
        data="MNIST", dataset="mnist",
        setup=("one stochastic layer of 50 units under two deterministic layers of 200 tanh units "
               "each side; Adam, batch 20, 3,280 passes over the data with lr 1e-3 · 10^(−i/7) for "
               "3^i passes (i = 0..7); dynamically binarized MNIST; test NLL with k = 5000; active "
               "units: dimensions with Cov_x(E_q[z_u]) > 0.01"),
        metrics=("test/nll", "test/active_units"),
        rows=(Row("VAE (k = 1)", {"k": 1}, {"test/nll": "86.76", "test/active_units": "19"}),
              Row("IWAE, k = 5", {"k": 5}, {"test/nll": "85.54"}),
              Row("IWAE, k = 50", {"k": 50}, {"test/nll": "84.78"})),
        never_matched=("the learning-rate decay in 8 stages is not implemented: lr stays 1e-3",
                       "the k = 1 row is our IWAE with k = 1, whose bound is the VAE's ELBO (the "
                       "paper lists the two as identical); its KL term is sampled, not analytic")),
    Paper(
        name="kingma2013",
        citation=("Kingma & Welling 2013, \"Auto-Encoding Variational Bayes\", Figure 2 "
                  "(MNIST, latent sizes 3 to 200)"),
        data="MNIST", dataset="mnist",
        setup=("one hidden layer of 500 tanh units in encoder and decoder, latent sizes 3, 5, 10, "
               "20 and 200, minibatch 100 with one sample per image, Adagrad, about 10^8 training "
               "images seen; Figure 2 plots the lower bound against training images seen"),
        metrics=("test/elbo", "test/nll"),
        rows=tuple(Row(f"VAE, latent {z}", {"latent": z}) for z in (3, 5, 10, 20, 200)),
        never_matched=("Adam (lr 1e-3) instead of the paper's Adagrad and its weight-decay prior",
                       "the paper does not state a binarization; we binarize dynamically so that "
                       "the Bernoulli decoder is a density on the data"),
        note="the paper gives curves (Figure 2), not numbers: no published values to set beside ours",
        plot_x="latent"),
    Paper(
        name="seed",
        citation="the seed project: its VAE and CVAE, BCE vs MSE, latent 32 (MNIST)",
        data="MNIST", dataset="mnist",
        setup=("the seed's MLP (784-128-64 ReLU with dropout 0.1, and back), latent 32, Adam lr "
               "1e-4, batch 64, grey MNIST; its conclusion, from samples viewed by eye: "
               "\"MSE looked better\""),
        metrics=("test/bce", "test/mse", "test/nll"),
        rows=tuple(Row(f"{model.upper()}, {loss}", {"model": model, "loss": loss})
                   for model in ("vae", "cvae") for loss in ("bce", "mse")),
        never_matched=("the seed's BCE had 1e-8 guards inside the logs (loss `seed-bce`); `bce` "
                       "here is the exact Bernoulli likelihood",
                       "the seed's number of epochs is not recorded"),
        note="the seed published no numbers, only its judgement by eye: \"MSE looked better\"",
        compare_losses=True),
)}


def paper_named(name: str) -> Paper:
    if name not in PAPERS:
        raise ReportError(f"unknown paper table {name!r}: choose from {', '.join(PAPERS)}")
    return PAPERS[name]


def paper_spec(name: str, full: bool = False) -> StudySpec:
    """The study behind paper `name`: its CPU budget, or the paper's (`full`). Run it with
    `bench.sweep.run_study`, then render it with `write_table`."""
    return load_spec(paper_named(name).spec_path(full))


def write_table(name: str, *, results: Path, full: bool = False, tracking_uri: str | None = None) -> str:
    """Write `<results>/tables/<study>.md` and `.tex` (plus `.png` where the paper is a figure)
    from the runs of the paper's study in MLflow and return the markdown. <study> is the spec's
    study name: `<name>` or `<name>-full`. Default store: `<results>/mlflow.db`."""
    study = paper_spec(name, full).name
    runs = load_runs(tracking_uri or tracking.default_uri(results), study)
    markdown, latex = render_table(name, runs, full=full)
    out = Path(results) / "tables"
    out.mkdir(parents=True, exist_ok=True)
    drawn = table_figure(name, runs)
    if drawn is not None:
        figure, caption = drawn
        figure.savefig(out / f"{study}.png", dpi=DPI, facecolor="white")
        markdown += f"\n![{study}]({study}.png)\n\n*{caption}*\n"
    (out / f"{study}.md").write_text(markdown)
    (out / f"{study}.tex").write_text(latex)
    return markdown


def table_figure(name: str, runs: pd.DataFrame):
    """(Figure, caption) of our metrics against the paper's plotted axis, or None."""
    paper = paper_named(name)
    if paper.plot_x is None:
        return None
    return figure_metrics(runs, metrics=paper.metrics, x=paper.plot_x)


def render_table(name: str, runs: pd.DataFrame, *, full: bool) -> tuple[str, str]:
    """(markdown, LaTeX) of paper `name` with our finished `runs` beside the published numbers;
    `full` says which budget the runs were meant to have (the text checks what they had)."""
    paper = paper_named(name)
    done = finished(runs)
    ours = _our_data(done)
    same_data = set(done["dataset"]) == {paper.dataset} if not done.empty else False
    header = ["model"]
    for metric in paper.metrics:
        header += [f"{_metric_name(metric)}: published ({paper.data})",
                   f"ours ({ours})"]
        if same_data:
            header.append("ours − published")
    rows, latex_rows = [], []
    for row in paper.rows:
        chosen = done
        for key, value in row.match.items():
            chosen = chosen[chosen[key] == value] if key in chosen else chosen.iloc[0:0]
        cells, latex_cells = [row.label], [row.label]
        for metric in paper.metrics:
            published = row.published.get(metric, "—")
            text, tex, mean = _ours(chosen, metric, trained=bool(row.match))
            cells += [published, text]
            latex_cells += [published, tex]
            if same_data:
                delta = "—"
                if mean is not None and metric in row.published:
                    delta = f"{mean - _leading_number(row.published[metric]):+.2f}"
                cells.append(delta)
                latex_cells.append(delta)
        rows.append(cells)
        latex_rows.append(latex_cells)

    budget = ("the paper's budget (`--full`)" if full else
              f"the CPU budget (`bench table {name}`; `--full` for the paper's)")
    differences = _differences(paper, done)
    notes = [f"Our numbers: mean ± sd over seeds (n, and se the standard error of the mean); * marks fewer "
             f"than {MIN_SEEDS} seeds, † nats of a likelihood that is not a density on this data."]
    if any("‡" in cell for row in rows for cell in row):
        notes.append(CONDITIONAL_NOTE)
    if not same_data:
        notes.append(f"Our numbers are on {ours}, not on the paper's {paper.data}: they are not "
                     "the published quantity and are not subtracted from it.")
    if paper.note:
        notes.append(f"Published column: {paper.note}.")
    lines = [f"## {name}: {paper.citation}", "",
             f"**Published** ({paper.data}): {paper.setup}.", "",
             f"**Ours**: {_our_budget(done)}; {budget}.", ""]
    if differences:
        lines += ["**Differs from the paper's setup:**", *(f"- {d}" for d in differences), ""]
    else:
        lines += ["**Differs from the paper's setup:** nothing that the spec can set.", ""]
    lines += [markdown_table(header, rows), "", *(f"- {note}" for note in notes)]
    if paper.compare_losses:
        lines += ["", *_loss_comparison(runs)]
    markdown = "\n".join(lines) + "\n"
    caption = (f"{paper.citation}. Published: {paper.data}. Ours: {_our_budget(done)}. "
               + " ".join(notes) + (" Differs from the paper: " + "; ".join(differences) + "."
                                    if differences else ""))
    latex = latex_table(header, latex_rows, caption, f"tab:{name}")
    return markdown, latex


def _our_data(done: pd.DataFrame) -> str:
    if done.empty:
        return "no finished runs"
    data = ", ".join(sorted(set(done["dataset"])))
    binarize = ", ".join(sorted(set(done["binarize"])))
    return f"{data}, binarize {binarize}"


def _our_budget(done: pd.DataFrame) -> str:
    if done.empty:
        return "no finished runs yet"

    def values(column):
        return ", ".join(map(str, sorted(set(done[column]))))

    seeds = sorted(set(done["seed"]))
    images = "all" if set(done["eval_n"]) == {0} else values("eval_n")
    return (f"{values('dataset')} (binarize {values('binarize')}), {values('epochs')} epochs, "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}), "
            f"test NLL with k = {values('eval_k')} on {images} test images")


def _ours(chosen: pd.DataFrame, metric: str, trained: bool) -> tuple[str, str, float | None]:
    """Our cell as markdown and LaTeX text, and its mean (None when there is none)."""
    if not trained:
        return "not trained here", "not trained here", None
    if chosen.empty:
        return "not run", "not run", None
    if metric not in chosen or chosen[metric].isna().all():
        return "—", "--", None
    values = chosen[metric].dropna()
    n = len(values)
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    proper = bool(chosen["proper_density"].eq(True).all())
    conditional = facts(metric)["given_label"] and bool(chosen["model"].map(conditional_model).all())
    marks = ("†" if facts(metric)["likelihood"] and not proper else "") + ("‡" if conditional else "")
    digits = 1 if metric == "test/active_units" else 2
    mean = float(values.mean())
    return (format_stat(mean, std, n, digits, marks=marks, se=True),
            format_stat(mean, std, n, digits, latex=True, marks=marks, se=True), mean)


def _metric_name(metric: str) -> str:
    """"test/nll (nats per image, lower is better)": the facts as the metric's entry states them."""
    unit = facts(metric)["unit"]
    return f"{metric} ({unit + ', ' if unit else ''}{better_text(metric)})"


def _leading_number(text: str) -> float:
    return float(re.match(r"\s*(-?[\d.]+)", text).group(1))


def _differences(paper: Paper, done: pd.DataFrame) -> list[str]:
    """Field by field, where our runs differ from the paper's budget (the -full spec), then
    what no budget here matches."""
    reference = load_spec(paper.spec_path(full=True))
    config = reference.config(reference.cells()[0]).to_dict()
    grid = {name for name, _ in reference.grid}
    found = []
    if not done.empty:
        for name in COMPARED:
            if name in grid or name not in done:
                continue
            ours = sorted(set(done[name]))
            if ours != [config[name]]:
                found.append(f"{name}: {', '.join(map(_show, ours))} here; "
                             f"{_show(config[name], name)} in the paper's budget"
                             + (f" ({paper.data})" if name == "dataset" else ""))
        seeds = len(set(done["seed"]))
        if seeds != len(reference.seeds):
            found.append(f"seeds: {seeds} here; {len(reference.seeds)} in the paper's budget")
    return found + list(paper.never_matched)


def _show(value, name: str = "") -> str:
    if name == "eval_n" and value == 0:
        return "0 (all test images)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _loss_comparison(runs: pd.DataFrame) -> list[str]:
    """The seed's question answered with paired intervals: bce − mse per model."""
    paired = paired_differences(runs, metrics=("test/bce", "test/mse", "test/nll"))
    if paired.empty:
        return [loss_verdict(paired)]
    return ["**BCE or MSE?** " + loss_verdict(paired), "", markdown_table(*differences_table(paired))]
