"""Reports: a study's trial runs read back from MLflow into pandas, then CSV, LaTeX, seaborn
figures and a markdown + self-contained HTML report in `<results>/reports/<experiment>/`.
One job per module: `runs` (MLflow and Optuna -> DataFrame), `stats` (pure pandas/scipy, the
honesty rules), `figures` (matplotlib/seaborn, Optuna's plots), `document` (tables, templates);
this file assembles them: a grid gets its summary and figures, and "BCE or MSE?" where it
compares them; a search gets its best trials, history, importances and parameter plots.

    write_report("default", results=Path("results"))
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import warnings
from pathlib import Path

import pandas as pd

from bench import locations, tracking
from bench.report.document import (best_trials_table, caption, differences_table, latex_table, other_trials_table,
                                   render, summary_table)
from bench.report.figures import (DPI, context_of, figure_curves, figure_heatmap, figure_metrics,
                                  figure_rate_distortion, figure_seconds, figure_seed, search_figures, varies)
from bench.report.runs import (ReportError, latest_experiment, load_curves, load_runs, open_store,
                               optuna_study, run_images, study_tags)
from bench.report.stats import (CONFIDENCE, HEADLINE, MIN_SEEDS, cell_label, finished, grid_axes,
                                loss_verdict, mean_interval, paired_differences, summarize)

__all__ = ["MIN_SEEDS", "ReportError", "finished", "load_runs", "mean_interval", "paired_differences",
           "run_images", "summarize", "write_report"]

# figure file name -> (section title, why it may be missing)
FIGURES = {"metrics_vs_latent": ("Test metrics against latent size", "no finished run has test metrics"),
           "test_metrics": ("Test metrics per cell", "no finished run has test metrics"),
           "learning_curves": ("Learning curves", "no finished run logged val/elbo or val/bce"),
           "objective_heatmap": ("The objective per cell",
                                 "no finished run, or the runs share no objective (trained outside a sweep?)"),
           "rate_distortion": ("Rate vs distortion", "no finished run is variational (no KL)"),
           "seconds_per_trial": ("Seconds per trial", "no finished run logged trial_seconds"),
           "bce_vs_mse_pictures": ("BCE and MSE side by side",
                                   "no finished run logged samples and reconstructions")}
SUMMARY_COLUMNS = ("objective", *HEADLINE)
SEARCH_FIGURES = {"optimization_history": "Optimisation history",
                  "intermediate_values": "The objective per epoch",
                  "param_importances": "Parameter importances",
                  "objective_vs_params": "The objective against each parameter"}


def write_report(experiment: str | None, *, results: Path, tracking_uri: str | None = None,
                 storage: str | None = None) -> Path:
    """Write `<results>/reports/<experiment>/` (runs.csv, summary.csv, differences.csv,
    table.tex, figures/*.png, report.md, report.html) and return it. Defaults: the experiment
    whose trial run started last, `<results>/mlflow.db` and `<results>/optuna.db`."""
    results = Path(results)
    uri = tracking_uri or tracking.default_uri(results)
    client = open_store(uri)
    experiment = experiment or latest_experiment(client, uri)
    runs = load_runs(uri, experiment)
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    if safe_name != experiment:  # "a b c" and "a_b_c" must not share (and overwrite) one folder
        safe_name += "-" + hashlib.sha256(experiment.encode()).hexdigest()[:8]
    out = results / "reports" / safe_name
    (out / "figures").mkdir(parents=True, exist_ok=True)
    axes, done, context = grid_axes(runs), finished(runs), context_of(runs)
    summary, paired = summarize(runs), paired_differences(runs)
    for name, frame in (("runs", runs), ("summary", summary), ("differences", paired)):
        frame.to_csv(out / f"{name}.csv", index=False)
    (out / "table.tex").write_text(latex_table(*summary_table(summary, axes, SUMMARY_COLUMNS, latex=True),
                                               caption("table", experiment=experiment, c=context), f"tab:{safe_name}"))
    study, spec = optuna_study(storage or locations.default_storage(results), experiment)
    drawers = {"metrics_vs_latent": lambda: figure_metrics(runs), "test_metrics": lambda: figure_metrics(runs),
               "learning_curves": lambda: figure_curves(done, load_curves(uri, done)),
               "objective_heatmap": lambda: figure_heatmap(runs),
               "rate_distortion": lambda: figure_rate_distortion(runs),
               "seconds_per_trial": lambda: figure_seconds(runs),
               "bce_vs_mse_pictures": lambda: figure_seed(runs, lambda run_id: run_images(client, run_id))}
    compares = "loss" in axes and {"bce", "mse"} <= set(done["loss"])
    other = runs[runs["state"] != "FINISHED"]
    report = {"title": f"vaebench report: {experiment}", "experiment": experiment, "axes": axes,
              "context": context, "n_runs": len(runs),
              "states": ", ".join(f"{n} {s.lower()}" for s, n in runs["state"].value_counts().items()),
              "facts": _facts(uri, experiment, runs, study_tags(client, experiment)),
              "search": _search(study, spec, runs, context, out, axes) if spec.get("search") else None,
              "summary": summary_table(summary, axes, SUMMARY_COLUMNS) if not done.empty else None,
              "conditional": bool(summary["conditional"].any()), "min_seeds": MIN_SEEDS,
              "fair": _fairness(summary, axes) if done["loss"].nunique() > 1 else None,
              "verdict": loss_verdict(paired) if compares else None,
              "differences": differences_table(paired) if compares and not paired.empty else None,
              "alpha": f"{1 - CONFIDENCE:.0%}",
              "figures": [_save(out, name, drawers[name]() if not done.empty else None, title, missing)
                          for name, (title, missing) in _figures(axes, done, compares).items()],
              "other": other_trials_table(other) if not other.empty else None,
              "running": bool((other["state"] == "RUNNING").any())}
    markdown, html = render(report)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(html)
    return out


def _figures(axes: list[str], done: pd.DataFrame, compares: bool) -> dict:
    """The FIGURES that fit this grid: metrics against latent size where the grid varies it, else
    per cell; the heatmap only over loss or latent; the pictures only where bce meets mse."""
    fits = {"metrics_vs_latent": varies(done, axes), "test_metrics": not varies(done, axes),
            "objective_heatmap": bool({"loss", "latent"} & set(axes)), "bce_vs_mse_pictures": compares}
    return {name: entry for name, entry in FIGURES.items() if axes and fits.get(name, True)}


def _save(out: Path, name: str, drawn, title: str, missing: str) -> dict:
    """A figure as the templates show it (saved as figures/<name>.png), or why it is missing."""
    if drawn is None or isinstance(drawn, str):
        return {"name": name, "title": title, "missing": drawn or missing}
    path = out / "figures" / f"{name}.png"
    drawn[0].savefig(path, dpi=DPI, facecolor="white")
    return {"name": name, "title": title, "path": path, "caption": drawn[1],
            "link": path.relative_to(out).as_posix(), "data": base64.b64encode(path.read_bytes()).decode()}


def _search(study, spec: dict, runs: pd.DataFrame, context, out: Path, axes: list[str]) -> dict:
    """The search's settings, best finished trials, Optuna's importances and plots."""
    params = list(spec["search"]["params"])
    completed = runs[runs["state"] == "FINISHED"]
    drawn = search_figures(study, params, context.objective) if not completed.empty else {}
    return {**spec["search"], "params": params, "completed": len(completed),
            "best": best_trials_table(completed, params, HEADLINE, context.direction, axes=axes),
            "importances": _importances(study, params),
            "figures": [_save(out, name, drawn.get(name), title, "no trial finished")
                        for name, title in SEARCH_FIGURES.items()]}


def _facts(uri: str, experiment: str, runs: pd.DataFrame, tags: dict) -> list[str]:
    facts_ = [f"MLflow store: `{uri}`, experiment `{experiment}`"]
    if tags.get("vaebench.spec"):
        facts_.append(f"spec: `{tags['vaebench.spec']}`")
    hardware = sorted({h for h in runs["hardware"] if h})
    if hardware:
        facts_.append(f"device: {', '.join(hardware)}")
    if tags.get("vaebench.git_commit"):
        facts_.append(f"git commit {tags['vaebench.git_commit'][:12]}"
                      + (" (with uncommitted changes)" if tags.get("vaebench.git_dirty") == "true" else ""))
    if "test/classifier_acc" in runs and runs["test/classifier_acc"].notna().any():
        accuracy = runs["test/classifier_acc"].dropna().iloc[0]
        facts_.append(f"sample quality (test/fd, precision/recall, class entropy, cond_acc) judged by a "
                      f"classifier trained on {', '.join(sorted(set(runs['dataset'])))}: test accuracy "
                      f"{accuracy:.2%}")
    facts_.append(f"written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `bench report`")
    return facts_


def _fairness(summary: pd.DataFrame, axes: list[str]) -> dict:
    unfair = summary[(summary["metric"] == "test/nll") & ~summary["proper_density"]]
    quality = [m for m in ("test/fd", "test/precision", "test/recall") if m in set(summary["metric"])]
    return {"unfair": list(cell_label(unfair, axes)), "quality": quality}


def _importances(study, params: list[str]):
    """Optuna's fANOVA importances as a table; None below two finished trials."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    try:
        with warnings.catch_warnings(action="ignore"):
            found = get_param_importances(study, params=params, evaluator=FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError):
        return None
    return ["parameter", "importance (fANOVA, sums to 1)"], [[k, f"{v:.3f}"] for k, v in found.items()]
