"""Reports: a study's trial runs read back from MLflow into pandas, then CSV, LaTeX, seaborn
figures and a markdown + self-contained HTML report in `<results>/reports/<experiment>/`.

    runs = load_runs("sqlite:///results/mlflow.db", "default")   # one row per trial run
    summarize(runs)            # mean, std and n over seeds per cell and metric
    paired_differences(runs)   # bce - mse per cell, paired by seed, with a 95% t-interval
    write_report("default", results=Path("results"))

Honesty rules the whole module follows:
- every number carries its n, and cells with fewer than MIN_SEEDS seeds are flagged;
- likelihoods in nats (ELBO, NLL, recon) are compared across losses only where the run's
  likelihood is a normalised density on its data (the `vaebench.proper_density` tag that
  evaluation sets); other cells are marked, never silently mixed in. The loss-agnostic
  test/mse and test/bce are always shown, so losses are judged on one yardstick;
- failed, diverged and pruned trials are listed with their reason, not dropped.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per image is noise
matplotlib.use("Agg")  # a report is drawn headless; figures are drawn on Figure objects, no pyplot

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import stats  # noqa: E402

from bench import tracking  # noqa: E402
from bench.config import field_names, field_types  # noqa: E402
from bench.errors import BenchError  # noqa: E402

MIN_SEEDS = 3  # cells with fewer seeds are flagged: a spread from 1 or 2 numbers is not one
CONFIDENCE = 0.95
# Figure of the four headline metrics, and which way each metric is better (None: neither).
HEADLINE = ("test/elbo", "test/nll", "test/mse", "test/bce")
BETTER = {"test/elbo": "higher", "test/nll": "lower", "test/mse": "lower", "test/bce": "lower",
          "test/recon": "lower", "test/bits_per_dim": "lower", "test/kl": None,
          "test/active_units": None, "trial_seconds": "lower", "best_epoch": None,
          "val/elbo": "higher", "val/bce": "lower", "val/mse": "lower", "val/loss": "lower",
          "val/recon": "lower"}
# Nats under the run's own likelihood: comparable across losses only where it is a density.
LIKELIHOOD_METRICS = {"test/elbo", "test/nll", "test/recon", "test/bits_per_dim",
                      "val/elbo", "val/loss", "val/recon"}
SUMMARY_METRICS = ("objective", "test/elbo", "test/nll", "test/mse", "test/bce", "test/recon",
                   "test/kl", "test/active_units", "test/bits_per_dim", "best_epoch", "trial_seconds")
CURVE_METRICS = ("val/elbo", "val/bce")
SEED_CONCLUSION = "MSE looked better"
STATE_TAG, OBJECTIVE_TAG = "vaebench.state", "vaebench.objective"
TAG_COLUMNS = {"vaebench.proper_density": "proper_density", "vaebench.fail_reason": "fail_reason",
               "vaebench.training_objective": "training_objective", "vaebench.device": "hardware",
               "vaebench.grid_key": "grid_key"}
# images/<key>+step+<step>+timestamp+<ms>+<uuid>.png (MLflow 3; older versions used % for +)
IMAGE_FILE = re.compile(r"^images/(?P<key>[^+%]+)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]\d+"
                        r"[+%][0-9a-f-]+\.png$")
DPI = 100
WIDTH_IN = 14.0  # every figure is 1400 px wide


class ReportError(BenchError):
    """A report that cannot be made: no store, no such experiment, or no runs in it."""


# ---------------------------------------------------------------------------- reading MLflow

def open_store(tracking_uri: str):
    """An MLflow client on an existing store: a report never creates an empty one."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"no MLflow store at {tracking_uri[len('sqlite:///'):]}: run a study first "
                          "(`make sweep` or `bench sweep SPEC --results DIR`), or pass --results / "
                          "--tracking-uri of the store that holds it")
    return tracking.connect(tracking_uri)


def _experiment_names(client) -> list[str]:
    return sorted(e.name for e in client.search_experiments() if e.name != "Default")


def _missing(client, tracking_uri: str, problem: str) -> ReportError:
    names = _experiment_names(client)
    known = f"experiments in this store: {', '.join(names)}" if names else "the store has no experiments"
    return ReportError(f"{problem} ({tracking_uri}); {known}. Create runs with `make sweep` or "
                       f"`bench sweep SPEC`, whose study name is the experiment name")


def latest_experiment(client, tracking_uri: str = "") -> str:
    """The experiment whose newest trial run started last: the study most recently worked on."""
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, filter_string=f"tags.`{tracking.ROLE}` = 'trial'",
                               order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not found:
        raise _missing(client, tracking_uri, "no trial runs in any experiment")
    return client.get_experiment(found[0].info.experiment_id).name


def load_runs(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per trial run of `experiment` (= study name), in trial order: identity and state,
    every RunConfig param (typed), every final metric (the value at the last step), wall-clock
    seconds, the study's objective at the epoch validation chose, and the vaebench tags."""
    client = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        raise _missing(client, tracking_uri, f"no experiment named {experiment!r}")
    runs = tracking.trial_runs(client, found.experiment_id, experiment)
    if not runs:
        raise _missing(client, tracking_uri, f"experiment {experiment!r} has no trial runs")
    frame = pd.DataFrame([_row(run) for run in runs])
    frame["objective"] = [_objective_value(client, row) for row in frame.itertuples()]
    frame = frame.sort_values(["trial", "start_time"], kind="stable", na_position="last")
    return frame.reset_index(drop=True)


def _row(run) -> dict:
    info, tags = run.info, run.data.tags
    types = field_types()
    params = {}
    for name, text in run.data.params.items():
        kind = types.get(name, str)
        try:
            params[name] = kind(float(text)) if kind is int else kind(text)
        except ValueError:
            params[name] = text
    start = pd.to_datetime(info.start_time, unit="ms", utc=True)
    end = pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT
    metric, direction = _parse_objective(tags.get(OBJECTIVE_TAG, ""), tags.get("vaebench.selection", ""))
    row = {"trial": int(tags[tracking.TRIAL]) if tags.get(tracking.TRIAL, "").isdigit() else pd.NA,
           "run_id": info.run_id, "run_name": info.run_name, "cell": tags.get(tracking.CELL, ""),
           "state": tags.get(STATE_TAG) or info.status, "status": info.status,
           **{name: params.get(name) for name in field_names()},
           **dict(sorted(run.data.metrics.items())),
           "wall_seconds": (end - start).total_seconds() if info.end_time else np.nan,
           "objective_metric": metric, "objective_direction": direction,
           "start_time": start, "end_time": end}
    for tag, column in TAG_COLUMNS.items():
        row[column] = tags.get(tag, "")
    proper = tags.get("vaebench.proper_density")
    row["proper_density"] = {"true": True, "false": False}.get(proper, pd.NA)
    return row


def _parse_objective(tag: str, selection: str) -> tuple[str, str]:
    """('val/bce', 'minimize') from the sweep's tag "val/bce (minimize) of the epoch chosen by
    validation"; a run trained outside a sweep falls back to the trainer's selection metric."""
    found = re.match(r"(\S+) \((maximize|minimize)\)", tag)
    if found:
        return found.group(1), found.group(2)
    if selection:
        return selection, "maximize" if BETTER.get(selection) == "higher" else "minimize"
    return "", ""


def study_objective(runs: pd.DataFrame) -> tuple[str, str]:
    """(metric, direction) that every run shares, else ("", ""): runs trained outside a sweep
    fall back to their trainer's selection metric, which differs between an ae and a vae."""
    pairs = set(zip(runs["objective_metric"], runs["objective_direction"])) - {("", "")}
    return pairs.pop() if len(pairs) == 1 else ("", "")


def _objective_value(client, row) -> float:
    """The objective at the epoch validation chose (best_epoch): what the study optimised."""
    best = getattr(row, "best_epoch", np.nan)
    if not row.objective_metric or pd.isna(best):
        return np.nan
    history = client.get_metric_history(row.run_id, row.objective_metric)
    values = [m.value for m in history if m.step == int(best)]
    return values[-1] if values else np.nan


def load_curves(tracking_uri: str, runs: pd.DataFrame, metrics=CURVE_METRICS) -> pd.DataFrame:
    """Per-epoch values of `metrics` for every run: long format (run_id, metric, epoch, value)."""
    client = open_store(tracking_uri)
    rows = []
    for run_id in runs["run_id"]:
        for metric in metrics:
            rows += [{"run_id": run_id, "metric": metric, "epoch": m.step, "value": m.value}
                     for m in client.get_metric_history(run_id, metric)]
    return pd.DataFrame(rows, columns=["run_id", "metric", "epoch", "value"])


def run_images(client, run_id: str, keys=("samples", "recon")) -> dict[str, np.ndarray]:
    """The logged image of each key at its highest step (the best model's final pictures)."""
    newest: dict[str, tuple[int, str]] = {}
    for item in client.list_artifacts(run_id, "images"):
        found = IMAGE_FILE.match(item.path)
        if found and found["key"] in keys:
            step = int(found["step"])
            if found["key"] not in newest or step > newest[found["key"]][0]:
                newest[found["key"]] = (step, item.path)
    pictures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (_, path) in newest.items():
            local = client.download_artifacts(run_id, path, tmp)
            pictures[key] = np.asarray(Image.open(local).convert("L"))
    return pictures


# ---------------------------------------------------------------------------- statistics

def grid_axes(runs: pd.DataFrame) -> list[str]:
    """The study's grid axes, read from the cell keys ("model=vae,loss=bce,latent=2,seed=0"),
    seed excluded; runs without cell keys fall back to model, loss and latent."""
    axes: list[str] = []
    for cell in runs.get("cell", pd.Series(dtype=str)).dropna():
        for part in str(cell).split(","):
            name = part.split("=", 1)[0]
            if "=" in part and name != "seed" and name not in axes and name in runs:
                axes.append(name)
    return axes or [name for name in ("model", "loss", "latent") if name in runs]


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The FINISHED runs; where a search ran several trials per cell and seed, the one with the
    best objective (validation, never test) stands for it."""
    done = runs[runs["state"] == "FINISHED"]
    key = done["cell"].where(done["cell"] != "", done["run_id"])
    if not key.duplicated().any():
        return done
    ascending = done["objective_direction"].iloc[0] != "maximize"
    ordered = done.assign(_key=key).sort_values("objective", ascending=ascending, na_position="last")
    return ordered.drop_duplicates("_key").drop(columns="_key").sort_index()


def _groups(frame: pd.DataFrame, by: list[str]):
    """(key tuple, rows) per value of the `by` columns in order of appearance; one group
    of everything when `by` is empty."""
    if not by:
        yield (), frame
        return
    for keys, rows in frame.groupby(by, sort=False):
        yield (keys if isinstance(keys, tuple) else (keys,)), rows


def cell_label(frame: pd.DataFrame, axes: list[str]) -> pd.Series:
    """"vae · bce · latent=32": strings as they are, numbers named; the model when no axis is
    left to name."""
    axes = axes or ["model"]
    parts = [frame[a].map(lambda v, a=a: str(v) if isinstance(v, str) else f"{a}={v:g}") for a in axes]
    label = parts[0]
    for part in parts[1:]:
        label = label + " · " + part
    return label


def summarize(runs: pd.DataFrame, metrics=SUMMARY_METRICS, by: list[str] | None = None) -> pd.DataFrame:
    """Mean, std (ddof 1) and n over seeds per cell and metric, of the finished runs: one row
    per (cell, metric), in grid order. `proper_density`: every run of the cell had a likelihood
    that is a density on its data; `comparable`: the metric may be set beside other losses'
    (always for loss-agnostic metrics); `flag`: "n<3" where fewer than MIN_SEEDS seeds."""
    by = grid_axes(runs) if by is None else by
    done = finished(runs)
    objective, direction = study_objective(runs)
    if not objective:
        metrics = [m for m in metrics if m != "objective"]
    columns = [*by, "metric", "mean", "std", "n", "better", "proper_density", "comparable", "flag"]
    rows = []
    for keys, group in _groups(done, by):
        proper = bool(group["proper_density"].eq(True).all())
        for metric in metrics:
            values = group[metric].dropna() if metric in group else pd.Series(dtype=float)
            if values.empty:
                continue
            n = len(values)
            better = (("higher" if direction == "maximize" else "lower") if metric == "objective"
                      else BETTER.get(metric))
            nats = metric in LIKELIHOOD_METRICS or (metric == "objective" and objective in LIKELIHOOD_METRICS)
            rows.append({**dict(zip(by, keys)), "metric": metric, "mean": float(values.mean()),
                         "std": float(values.std(ddof=1)) if n > 1 else np.nan, "n": n,
                         "better": better or "", "proper_density": proper,
                         "comparable": proper or not nats, "flag": "n<3" if n < MIN_SEEDS else ""})
    return pd.DataFrame(rows, columns=columns)


def paired_differences(runs: pd.DataFrame, between: str = "loss", pair: tuple | None = None,
                       metrics=("test/bce", "test/mse", "test/nll"),
                       by: list[str] | None = None) -> pd.DataFrame:
    """`pair[0]` minus `pair[1]` on each metric per cell, paired by seed (same cell, same seed,
    only `between` differs): mean difference, a t-based 95% interval and n pairs. Likelihoods in
    nats are paired only where both runs' likelihoods are densities on the data; a cell with no
    such pair is kept with n = 0 and says so. Default pair: bce vs mse, else the first two
    values of `between` in the study."""
    by = [a for a in grid_axes(runs) if a != between] if by is None else by
    columns = [*by, "metric", "a", "b", "mean_a", "mean_b", "difference", "ci_low", "ci_high",
               "n", "verdict"]
    done = finished(runs)
    if between not in done:
        return pd.DataFrame(columns=columns)
    values = list(dict.fromkeys(done[between]))
    pair = pair or (("bce", "mse") if {"bce", "mse"} <= set(values) else tuple(values[:2]))
    if len(pair) < 2:
        return pd.DataFrame(columns=columns)
    a, b = (done[done[between] == value] for value in pair)
    merged = a.merge(b, on=[*by, "seed"], suffixes=("_a", "_b"))
    rows = []
    for keys, group in _groups(merged, by):
        for metric in metrics:
            if f"{metric}_a" not in group:
                continue
            pairs = group
            if metric in LIKELIHOOD_METRICS:
                pairs = group[group["proper_density_a"].eq(True) & group["proper_density_b"].eq(True)]
            pairs = pairs[[f"{metric}_a", f"{metric}_b"]].dropna()
            if pairs.empty and group[[f"{metric}_a", f"{metric}_b"]].dropna().empty:
                continue  # the metric does not exist for this model (an ae has no ELBO)
            diff = (pairs[f"{metric}_a"] - pairs[f"{metric}_b"]).to_numpy(dtype=float)
            mean, low, high = mean_interval(diff)
            rows.append({**dict(zip(by, keys)), "metric": metric, "a": pair[0], "b": pair[1],
                         "mean_a": float(pairs[f"{metric}_a"].mean()) if len(pairs) else np.nan,
                         "mean_b": float(pairs[f"{metric}_b"].mean()) if len(pairs) else np.nan,
                         "difference": mean, "ci_low": low, "ci_high": high, "n": len(diff),
                         "verdict": _verdict(metric, pair, len(diff), low, high)})
    return pd.DataFrame(rows, columns=columns)


def mean_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and the two-sided t-interval (Student, n - 1 degrees of freedom); NaN bounds for
    fewer than two values."""
    n = len(values)
    if n == 0:
        return np.nan, np.nan, np.nan
    mean = float(np.mean(values))
    if n < 2:
        return mean, np.nan, np.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def _verdict(metric: str, pair: tuple, n: int, low: float, high: float) -> str:
    if n == 0:
        return "not comparable: the two likelihoods are not both densities on this data"
    if n < 2:
        return "n < 2: no interval"
    better = BETTER.get(metric)
    if better is None or low <= 0 <= high:
        return "no clear difference" if better else "interval only"
    first_lower = high < 0
    return f"{pair[0] if first_lower == (better == 'lower') else pair[1]} better"


def loss_verdict(paired: pd.DataFrame) -> str:
    """What the paired intervals say about the seed's conclusion, in words."""
    agnostic = paired[paired["metric"].isin(["test/bce", "test/mse"])]
    if agnostic.empty:
        return (f"The seed concluded \"{SEED_CONCLUSION}\" from samples viewed by eye; this study "
                "has no bce/mse pair on the same cells and seeds, so it cannot check that.")
    a, b = agnostic["a"].iloc[0], agnostic["b"].iloc[0]
    lines = []
    for metric, group in agnostic.groupby("metric", sort=False):
        counts = {v: int((group["verdict"] == f"{v} better").sum()) for v in (a, b)}
        unclear = int((group["verdict"] == "no clear difference").sum())
        short = int(group["verdict"].str.startswith("n < 2").sum())
        lines.append(f"on {metric}, {a} is better in {counts[a]} and {b} in {counts[b]} of "
                     f"{len(group)} cell{'s' if len(group) != 1 else ''}, {unclear} undecided"
                     + (f", {short} with fewer than 2 seeds (no interval)" if short else ""))
    wins = {v: int((agnostic["verdict"] == f"{v} better").sum()) for v in (a, b)}
    mse = "mse" if "mse" in (a, b) else b  # the loss the seed preferred
    other = a if mse == b else b
    if wins[mse] and not wins[other]:
        verdict = f"the measured numbers support it: where an interval excludes 0, {mse} is better"
    elif wins[other] and not wins[mse]:
        verdict = f"the measured numbers contradict it: where an interval excludes 0, {other} is better"
    elif wins[other] and wins[mse]:
        verdict = ("the measured numbers are mixed: each loss wins somewhere, typically on its own "
                   "yardstick (a bce-trained model minimises bce), so neither is better overall")
    else:
        verdict = "the measured numbers do not settle it: no 95% interval excludes 0"
    return (f"The seed concluded \"{SEED_CONCLUSION}\" from samples viewed by eye. Measured "
            f"({a} − {b}, paired by seed, {CONFIDENCE:.0%} t-intervals): {'; '.join(lines)}. "
            f"So {verdict}.")


# ---------------------------------------------------------------------------- formatting

def format_stat(mean: float, std: float, n: int, digits: int = 2, latex: bool = False,
                marks: str = "") -> str:
    """"123.45 ± 0.67 (n=3)", with a "*" when n < MIN_SEEDS and `marks` (e.g. "†") appended."""
    if n == 0 or pd.isna(mean):
        return "—" if not latex else "--"
    pm = r" $\pm$ " if latex else " ± "
    spread = f"{pm}{std:.{digits}f}" if not pd.isna(std) else ""
    flag = "*" if n < MIN_SEEDS else ""
    return f"{mean:.{digits}f}{spread} (n={n}){flag}{marks}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)])


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                 "±": r"$\pm$", "−": "$-$", "†": r"$^\dagger$", "·": r"$\cdot$", "—": "--",
                 "Δ": r"$\Delta$"}


def latex_escape(text: str) -> str:
    """Plain text (with ±, †, · and —) as LaTeX; `$...$` runs are kept as math."""
    parts = re.split(r"(\$[^$]*\$)", str(text))
    return "".join(p if p.startswith("$") and p.endswith("$") and len(p) > 1
                   else "".join(LATEX_ESCAPES.get(ch, ch) for ch in p) for p in parts)


def latex_table(header: list[str], rows: list[list[str]], caption: str, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); cells are escaped text."""
    spec = "l" * len(header)
    body = [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
    return "\n".join([r"\begin{table}[ht]", r"\centering", r"\small",
                      rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                      " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule", *body,
                      r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption)}}}",
                      rf"\label{{{label}}}", r"\end{table}", ""])


def summary_table(summary: pd.DataFrame, axes: list[str], metrics=("objective", *HEADLINE),
                  latex: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the cells × metrics table: "mean ± std (n=…)", † where a likelihood
    is not a density on the data (not comparable across losses), * where n < MIN_SEEDS."""
    present = [m for m in metrics if m in set(summary["metric"])]
    header = [*axes, *(f"{m} ({_better_text(m) if m in BETTER else _objective_better(summary)})"
                       for m in present)]
    rows = []
    for keys, group in _groups(summary, axes):
        by_metric = group.set_index("metric")
        cells = []
        for m in present:
            if m not in by_metric.index:
                cells.append("—" if not latex else "--")
                continue
            r = by_metric.loc[m]
            digits = 1 if m in ("test/active_units", "trial_seconds") else 2
            cells.append(format_stat(r["mean"], r["std"], int(r["n"]), digits, latex,
                                     "" if r["comparable"] else "†"))
        rows.append([*(str(k) for k in keys), *cells])
    return header, rows


def _objective_better(summary: pd.DataFrame) -> str:
    found = summary.loc[summary["metric"] == "objective", "better"]
    return f"{found.iloc[0]} is better" if len(found) else ""


def differences_table(paired: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows of `paired_differences`: difference, 95% CI, n (* below MIN_SEEDS)."""
    by = list(paired.columns[:list(paired.columns).index("metric")])
    header = [*by, "metric", f"{paired['a'].iloc[0]} − {paired['b'].iloc[0]}",
              f"{CONFIDENCE:.0%} CI", "n", "verdict"]
    rows = [[*(str(r[c]) for c in by), r["metric"],
             "—" if pd.isna(r["difference"]) else f"{r['difference']:+.2f}",
             "—" if pd.isna(r["ci_low"]) else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]",
             f"{r['n']}{'*' if 0 < r['n'] < MIN_SEEDS else ''}", r["verdict"]]
            for _, r in paired.iterrows()]
    return header, rows


# ---------------------------------------------------------------------------- figures

@dataclass
class Context:
    """What every caption names: the data, the budget and the seeds behind the numbers."""

    dataset: str
    binarize: str
    epochs: str
    seeds: list[int]
    objective: str = ""
    direction: str = ""

    @classmethod
    def of(cls, runs: pd.DataFrame) -> "Context":
        def values(column):
            return sorted(set(runs[column].dropna())) if column in runs else []

        epochs = values("epochs")
        return cls(", ".join(map(str, values("dataset"))), ", ".join(map(str, values("binarize"))),
                   (str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]}") if epochs else "?",
                   [int(s) for s in values("seed")], *study_objective(runs))

    def text(self, n: str) -> str:
        seeds = ", ".join(map(str, self.seeds))
        return (f"Dataset {self.dataset} (binarize {self.binarize}), {self.epochs} epochs, "
                f"seed{'s' if len(self.seeds) != 1 else ''} {seeds}; {n}.")


def _figure(height_in: float, width_in: float = WIDTH_IN) -> Figure:
    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _panels(count: int, row_height_in: float, columns: int = 4):
    """A figure with `count` panels, at most `columns` a row; unused cells are hidden."""
    ncols = min(count, columns)
    nrows = math.ceil(count / ncols)
    fig = _figure(row_height_in * nrows + 0.8)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    for ax in grid.flat[count:]:
        ax.set_visible(False)
    return fig, grid


def _style():
    return sns.axes_style("whitegrid")


def _better_text(metric: str) -> str:
    better = BETTER.get(metric)
    return f"{better} is better" if better else "neither way is better"


def _n_text(done: pd.DataFrame, by: list[str]) -> str:
    counts = done.groupby(by, sort=False).size() if by else pd.Series([len(done)])
    low, high = int(counts.min()), int(counts.max())
    n = f"n = {low}" if low == high else f"n = {low} to {high}"
    seeds = " seed per point" if high == 1 else " seeds per point"
    return n + seeds + (f" (fewer than {MIN_SEEDS}: flagged)" if low < MIN_SEEDS else "")


def _series_styles(frame: pd.DataFrame, labels: pd.Series) -> tuple[dict, dict]:
    """A colour per series label and a line style (index into LINESTYLES / DASHES) by its loss,
    so a loss looks the same in every figure."""
    losses = list(dict.fromkeys(frame["loss"]))
    styles = {name: losses.index(loss) % len(LINESTYLES) for name, loss in zip(labels, frame["loss"])}
    return _palette(labels), styles


def _legend(colors: dict, styles: dict, names: list, markers: bool = False) -> list[Line2D]:
    return [Line2D([], [], color=colors[name], linestyle=LINESTYLES[styles[name]], label=name,
                   marker=MARKERS[i % len(MARKERS)] if markers else None)
            for i, name in enumerate(names)]


def _palette(labels) -> dict:
    labels = list(dict.fromkeys(labels))
    return dict(zip(labels, sns.color_palette("colorblind" if len(labels) <= 10 else "husl", len(labels))))


LINESTYLES = ["-", "--", ":", "-."]
DASHES = ["", (4, 2), (1, 2), (4, 1, 1, 1)]  # the same four styles as seaborn dash patterns
MARKERS = ["o", "s", "^", "D", "v", "P"]


def figure_metrics(runs: pd.DataFrame, metrics=HEADLINE, x: str = "latent") -> tuple[Figure, str] | None:
    """Each metric against `x` (log2 axis) per series (the other grid axes), mean ± 1 sd over
    seeds. Likelihood panels draw hollow, dotted markers where the likelihood is not a density
    on the data. Without an `x` axis in the grid the series are placed side by side."""
    done = finished(runs)
    panels = [m for m in metrics if m in done and done[m].notna().any()]
    if not panels:
        return None
    axes = grid_axes(runs)
    numeric = x in axes and done[x].nunique() > 1
    series_axes = [a for a in axes if a != x] if numeric else axes
    done = done.assign(_series=cell_label(done, series_axes), _x=done[x] if numeric else 0)
    colors, styles = _series_styles(done, done["_series"])
    series = list(colors)
    with _style():
        fig, grid = _panels(len(panels), 4.2)
        improper_seen = False
        for ax, metric in zip(grid.flat, panels):
            for i, name in enumerate(series):
                rows = done[(done["_series"] == name) & done[metric].notna()]
                if rows.empty:
                    continue
                agg = rows.groupby("_x").agg(mean=(metric, "mean"), std=(metric, "std"),
                                             proper=("proper_density", lambda p: bool(p.eq(True).all())))
                fair = agg["proper"].to_numpy(dtype=bool) | (metric not in LIKELIHOOD_METRICS)
                pos = agg.index.to_numpy(dtype=float) if numeric else np.array([i], dtype=float)
                color = colors[name]
                ax.errorbar(pos, agg["mean"], yerr=agg["std"].fillna(0), color=color, capsize=3,
                            linestyle=LINESTYLES[styles[name]] if fair.all() else ":", linewidth=1.6)
                ax.scatter(pos[fair], agg["mean"][fair], color=color, s=36, zorder=3,
                           marker=MARKERS[i % len(MARKERS)])
                ax.scatter(pos[~fair], agg["mean"][~fair], facecolor="white", edgecolor=color, s=36,
                           zorder=3, marker=MARKERS[i % len(MARKERS)], linewidth=1.5)
                improper_seen |= bool((~fair).any())
            ax.set_title(f"{metric} ({_better_text(metric)})", fontsize=11)
            if numeric:
                ticks = sorted(done[x].unique())
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
                ax.minorticks_off()
                ax.set_xlabel(x)
            else:
                ax.set_xticks(range(len(series)), series, rotation=30, ha="right", fontsize=8)
                ax.set_xlim(-0.5, len(series) - 0.5)
            ax.set_ylabel("nats per image" if metric != "test/mse" else "squared error per image")
        handles = _legend(colors, styles, series, markers=True)
        if improper_seen:
            handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="white",
                                  linestyle=":", label="hollow: not a density on this data"))
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=9)
    context = Context.of(done)
    fig.suptitle(f"Test metrics — {context.dataset} ({context.binarize}), {context.epochs} epochs",
                 fontsize=12)
    notes = []
    if {"test/mse", "test/bce"} & set(panels):
        notes.append("test/mse and test/bce are measured the same way whatever loss trained the "
                     "model: one yardstick for every loss.")
    if LIKELIHOOD_METRICS & set(panels):
        notes.append("test/elbo and test/nll are nats under each run's own likelihood, comparable "
                     "across losses only where it is a density on the data"
                     + (" (hollow markers and dotted lines mark where it is not)." if improper_seen else "."))
    caption = (f"Test metrics of the best epoch against {x if numeric else 'cell'}, mean ± 1 sd "
               f"over seeds. " + "; ".join(f"{m}: {_better_text(m)}" for m in panels) + ". "
               + " ".join(notes) + " " + context.text(_n_text(done, axes)))
    return fig, caption


def figure_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> tuple[Figure, str] | None:
    """Validation metrics per epoch, mean and ±1 sd band over seeds; one column per latent size."""
    if curves.empty:
        return None
    axes = grid_axes(runs)
    facet = "latent" in axes and runs["latent"].nunique() > 1
    labels = cell_label(runs, [a for a in axes if not (facet and a == "latent")])
    colors, styles = _series_styles(runs, labels)
    info = pd.DataFrame({"run_id": runs["run_id"], "series": labels,
                         "facet": runs["latent"] if facet else 0})
    data = curves.merge(info, on="run_id")
    metrics = [m for m in CURVE_METRICS if m in set(data["metric"])]
    facets = sorted(data["facet"].unique())
    if len(facets) > 6:  # at most six columns stay readable: an evenly spread choice
        facets = [facets[i] for i in np.linspace(0, len(facets) - 1, 6).round().astype(int)]
    dashes = {name: DASHES[style] for name, style in styles.items()}
    with _style():
        fig = _figure(3.6 * len(metrics) + 0.9)
        grid = fig.subplots(len(metrics), len(facets), squeeze=False, sharex=True)
        for r, metric in enumerate(metrics):
            for c, value in enumerate(facets):
                ax = grid[r, c]
                part = data[(data["metric"] == metric) & (data["facet"] == value)]
                if not part.empty:
                    sns.lineplot(part, x="epoch", y="value", hue="series", style="series",
                                 palette=colors, dashes=dashes, errorbar="sd", ax=ax, legend=False)
                latent = f" · latent {value}" if facet else ""
                ax.set_title(f"{metric} ({_better_text(metric)}){latent}", fontsize=10)
                ax.set_ylabel("nats per image" if c == 0 else "")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        shown = set(data["series"])
        fig.legend(handles=_legend(colors, styles, [name for name in colors if name in shown]),
                   loc="outside lower center", ncol=min(len(shown), 7), fontsize=9)
    context = Context.of(runs)
    fig.suptitle(f"Learning curves — {context.dataset} ({context.binarize})", fontsize=12)
    per_line = data.groupby(["series", "facet"])["run_id"].nunique()
    n = f"{per_line.min()}" if per_line.min() == per_line.max() else f"{per_line.min()} to {per_line.max()}"
    caption = ("Validation metrics per epoch: the line is the mean over seeds, the band ±1 sd "
               "(no band where a cell has one seed). "
               + "; ".join(f"{m}: {_better_text(m)}" for m in metrics) + ". val/elbo is in nats of "
               "each run's own likelihood; val/bce is the same yardstick for every loss. "
               + context.text(f"n = {n} runs per line"))
    return fig, caption


def figure_heatmap(runs: pd.DataFrame) -> tuple[Figure, str] | None:
    """The study's objective over latent × loss, one heatmap per remaining cell (e.g. model),
    on one colour scale; the annotation gives mean and n, † where it is not comparable."""
    done = finished(runs)
    if not study_objective(runs)[0] or done["objective"].notna().sum() == 0:
        return None
    axes = grid_axes(runs)
    done = done.assign(_facet=cell_label(done, [a for a in axes if a not in ("loss", "latent")]))
    context = Context.of(done)
    nats = context.objective in LIKELIHOOD_METRICS
    facets = list(dict.fromkeys(done["_facet"]))
    lowest, highest = done["objective"].min(), done["objective"].max()
    cmap = "viridis" if context.direction == "maximize" else "viridis_r"  # bright = better
    with _style():
        fig, grid = _panels(len(facets), 3.4)
        for i, (ax, name) in enumerate(zip(grid.flat, facets)):
            part = done[done["_facet"] == name]
            agg = part.groupby(["loss", "latent"]).agg(
                mean=("objective", "mean"), n=("objective", "count"),
                proper=("proper_density", lambda p: bool(p.eq(True).all()))).reset_index()
            agg["text"] = [f"{m:.2f}\nn={n}{'*' if n < MIN_SEEDS else ''}{'†' if nats and not p else ''}"
                           for m, n, p in zip(agg["mean"], agg["n"], agg["proper"])]
            means = agg.pivot(index="loss", columns="latent", values="mean")
            texts = agg.pivot(index="loss", columns="latent", values="text").reindex_like(means)
            sns.heatmap(means, annot=texts.fillna("").to_numpy(), fmt="", cmap=cmap, vmin=lowest,
                        vmax=highest, ax=ax, cbar=i == len(facets) - 1, linewidths=0.5,
                        annot_kws={"fontsize": 9},
                        cbar_kws={"label": f"{context.objective} ({_better_text(context.objective)})"})
            ax.set_title(name, fontsize=11)
    fig.suptitle(f"Objective {context.objective} ({context.direction}) — {context.dataset}", fontsize=12)
    caption = (f"The study's objective {context.objective} at the epoch validation chose, mean over "
               f"seeds per cell ({_better_text(context.objective)}; brighter is better), one colour "
               "scale for all panels. * marks fewer than 3 seeds"
               + ("; † marks cells whose likelihood is not a density on this data, whose nats are "
                  "not comparable with the other losses'" if nats else
                  f"; {context.objective} is loss-agnostic, so every cell is comparable")
               + ". " + context.text(_n_text(done, axes)))
    return fig, caption


def figure_rate_distortion(runs: pd.DataFrame) -> tuple[Figure, str] | None:
    """KL(q(z|x) || p(z)) against -log p(x|z) per run, one panel per loss (distortion is in
    that likelihood's nats); cell means joined in order of latent size."""
    done = finished(runs)
    if "test/kl" not in done or done["test/kl"].notna().sum() == 0:
        return None
    done = done[done["test/kl"].notna() & done["test/recon"].notna()]
    axes = grid_axes(runs)
    losses = list(dict.fromkeys(done["loss"]))
    series_axes = [a for a in axes if a not in ("loss", "latent")]
    done = done.assign(_series=cell_label(done, series_axes))
    colors = _palette(done["_series"])
    with _style():
        fig = _figure(5.0)
        grid = fig.subplots(1, len(losses), squeeze=False)
        for ax, loss in zip(grid.flat, losses):
            part = done[done["loss"] == loss]
            sns.scatterplot(part, x="test/kl", y="test/recon", hue="_series", palette=colors,
                            ax=ax, legend=False, s=30, alpha=0.7)
            for name, rows in part.groupby("_series", sort=False):
                by = "latent" if "latent" in rows else "_series"
                means = rows.groupby(by)[["test/kl", "test/recon"]].mean().sort_index()
                ax.plot(means["test/kl"], means["test/recon"], color=colors[name], linewidth=1.2)
                if by == "latent":
                    for latent, point in means.iterrows():
                        ax.annotate(f"z={latent}", (point["test/kl"], point["test/recon"]),
                                    fontsize=8, xytext=(4, 4), textcoords="offset points")
            proper = bool(part["proper_density"].eq(True).all())
            ax.set_title(f"loss {loss}" + ("" if proper else " (not a density on this data)"), fontsize=11)
            ax.set_xlabel("rate: test/kl (nats)")
            ax.set_ylabel(f"distortion: test/recon (nats under {loss})")
        handles = [Line2D([], [], color=c, marker="o", label=s) for s, c in colors.items()]
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=9)
    context = Context.of(done)
    fig.suptitle(f"Rate vs distortion — {context.dataset} ({context.binarize})", fontsize=12)
    skipped = sorted(set(finished(runs)["model"]) - set(done["model"]))
    caption = ("Rate (KL from the encoder to the prior) against distortion (−log p(x|z)) on the "
               "test set, one point per run and lines through the cell means by latent size (z). "
               "Lower-left is better; the negative ELBO is their sum, so lines of slope −1 are "
               "lines of equal ELBO. Distortion is in each loss's own nats, so panels are not "
               "compared with each other." + (f" Not shown (no KL, not variational): {', '.join(skipped)}."
                                              if skipped else "") + " " + context.text(_n_text(done, axes)))
    return fig, caption


def figure_seconds(runs: pd.DataFrame) -> tuple[Figure, str] | None:
    """Wall-clock seconds per finished trial (training and evaluation), per cell."""
    done = finished(runs)
    if "trial_seconds" not in done or done["trial_seconds"].notna().sum() == 0:
        return None
    axes = grid_axes(runs)
    done = done.assign(cell_=cell_label(done, axes))
    cells = list(dict.fromkeys(done["cell_"]))
    with _style():
        fig = _figure(min(14.0, 1.6 + 0.32 * len(cells)))
        ax = fig.subplots()
        sns.barplot(done, y="cell_", x="trial_seconds", order=cells, errorbar="sd", ax=ax,
                    color=sns.color_palette("colorblind")[0], alpha=0.6)
        sns.stripplot(done, y="cell_", x="trial_seconds", order=cells, ax=ax, color="black", size=4)
        ax.set_xlabel("seconds per trial (lower is faster)")
        ax.set_ylabel("")
    context = Context.of(done)
    devices = ", ".join(sorted({d for d in done.get("hardware", pd.Series(dtype=str)) if d})) or "unknown"
    fig.suptitle(f"Seconds per trial — {context.dataset}, {context.epochs} epochs", fontsize=12)
    caption = ("Seconds per finished trial, training and evaluation (MLflow metric trial_seconds): "
               "bar = mean, whisker = ±1 sd, dots = runs; lower is faster. Failed and pruned trials "
               f"are not timed here (see the list below). Device: {devices}. "
               + context.text(_n_text(done, axes)))
    return fig, caption


def figure_seed(runs: pd.DataFrame, tracking_uri: str) -> tuple[Figure, str] | None:
    """The seed's figure done properly: per model, samples and reconstructions of the bce- and
    the mse-trained run side by side, same latent size and seed, from the logged images."""
    done = finished(runs)
    if done.empty:
        return None
    latent = 32 if (done["latent"] == 32).any() else int(done["latent"].max())
    seed = int(done["seed"].min())
    chosen = done[(done["latent"] == latent) & (done["seed"] == seed)]
    chosen = chosen.assign(group=cell_label(chosen, [a for a in grid_axes(runs) if a not in ("loss", "latent")]))
    losses = sorted(set(chosen["loss"]), key=lambda loss: ({"bce": 0, "mse": 1}.get(loss, 2), loss))[:4]
    client = open_store(tracking_uri)
    panels = {(row["group"], row["loss"]): (row, run_images(client, row["run_id"]))
              for _, row in chosen.iterrows() if row["loss"] in losses}
    groups = [g for g in dict.fromkeys(chosen["group"]) if any(panels.get((g, l), (0, {}))[1] for l in losses)]
    if not groups:
        return None
    column_in = WIDTH_IN / len(losses)

    def height(group, key, most):  # inches of one row of pictures, title included
        shapes = [panels[(group, l)][1][key].shape for l in losses
                  if key in panels.get((group, l), (0, {}))[1]]
        return (min(most, column_in * 0.92 * max(h / w for h, w in shapes)) if shapes else 0.1) + 0.4

    rows = [(group, key) for group in groups for key in ("samples", "recon")]
    heights = [height(group, key, 4.0 if key == "samples" else 2.5) for group, key in rows]
    fig = _figure(sum(heights) + 0.8)
    grid = fig.subplots(len(rows), len(losses), squeeze=False, gridspec_kw={"height_ratios": heights})
    for (group, key), axes_row in zip(rows, grid):
        for loss, ax in zip(losses, axes_row):
            ax.set_axis_off()
            run, pictures = panels.get((group, loss), (None, {}))
            if key not in pictures:
                ax.text(0.5, 0.5, f"{group} · {loss}: no {key} logged", ha="center", va="center",
                        transform=ax.transAxes)
                continue
            ax.imshow(pictures[key], cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
            what = "samples from the prior" if key == "samples" else "test images (top) and reconstructions"
            numbers = ", ".join(f"{m} {run[m]:.2f}" for m in ("test/bce", "test/mse") if pd.notna(run.get(m)))
            ax.set_title(f"{group} · {loss} · latent {latent} · seed {seed}: {what}"
                         + (f"\n{numbers}" if key == "samples" and numbers else ""), fontsize=9)
    context = Context.of(done)
    what = f"{' and '.join(losses)} side by side" if len(losses) > 1 else f"Samples and reconstructions ({losses[0]})"
    fig.suptitle(f"{what} — {context.dataset} ({context.binarize}), {context.epochs} epochs", fontsize=12)
    caption = (f"The seed's comparison done properly: for each model, the run trained with "
               f"{' and with '.join(losses)} at the same latent size ({latent}) and seed ({seed}), "
               "each showing mean images of prior samples and the same ten test images with their "
               "reconstructions, taken from the images the run logged for its best epoch. The titles "
               "give test/bce and test/mse, the loss-agnostic yardsticks (lower is better): judge "
               "by eye, then by number. " + context.text("one run per panel"))
    return fig, caption


# ---------------------------------------------------------------------------- the report

@dataclass
class Document:
    """Blocks rendered to markdown and to self-contained HTML from one source."""

    blocks: list[tuple] = field(default_factory=list)

    def heading(self, level: int, text: str):
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str):
        self.blocks.append(("paragraph", text))

    def items(self, lines: list[str]):
        self.blocks.append(("items", lines))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def figure(self, path: Path, caption: str):
        self.blocks.append(("figure", path, caption))

    def markdown(self, root: Path) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out.append("#" * block[1] + " " + block[2])
            elif kind == "paragraph":
                out.append(block[1])
            elif kind == "items":
                out.append("\n".join(f"- {line}" for line in block[1]))
            elif kind == "table":
                out.append(markdown_table(block[1], block[2]))
            else:
                out.append(f"![{block[1].stem}]({block[1].relative_to(root).as_posix()})\n\n*{block[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
               f"</title>\n<style>{CSS}</style></head><body>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out.append(f"<h{block[1]}>{_inline(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                out.append(f"<p>{_inline(block[1])}</p>")
            elif kind == "items":
                out.append("<ul>" + "".join(f"<li>{_inline(line)}</li>" for line in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                               for row in block[2])
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                data = base64.b64encode(block[1].read_bytes()).decode("ascii")
                out.append(f"<figure><img alt=\"{html.escape(block[1].stem)}\" "
                           f"src=\"data:image/png;base64,{data}\"><figcaption>{_inline(block[2])}"
                           "</figcaption></figure>")
        out.append("</body></html>\n")
        return "\n".join(out)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1450px;margin:2em auto;padding:0 1em;"
       "line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
       "th,td{border-bottom:1px solid #ccc;padding:0.3em 0.7em;text-align:left}"
       "th{border-bottom:2px solid #444}img{max-width:100%}figure{margin:1.5em 0}"
       "figcaption{font-size:0.9em;color:#444}code{background:#f3f3f3;padding:0 0.2em}")


def _inline(text: str) -> str:
    """Escaped text with the markdown this module writes: `code` and **bold**."""
    text = html.escape(str(text))
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _safe_name(experiment: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"


def _study_run_tags(client, experiment: str) -> dict:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1,
                              filter_string=f"tags.`{tracking.ROLE}` = 'study'")
    return dict(runs[0].data.tags) if runs else {}


def write_report(experiment: str | None, *, results: Path, tracking_uri: str | None = None) -> Path:
    """Write `<results>/reports/<experiment>/` (runs.csv, summary.csv, differences.csv,
    table.tex, figures/*.png, report.md, report.html) and return that directory. Default
    experiment: the one whose trial run started last; default store: `<results>/mlflow.db`."""
    results = Path(results)
    uri = tracking_uri or tracking.default_uri(results)
    client = open_store(uri)
    experiment = experiment or latest_experiment(client, uri)
    runs = load_runs(uri, experiment)
    out = results / "reports" / _safe_name(experiment)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    axes = grid_axes(runs)
    summary = summarize(runs)
    paired = paired_differences(runs)
    runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    paired.to_csv(out / "differences.csv", index=False)
    context = Context.of(runs)
    caption = (f"Study {experiment}: test metrics per cell, mean ± sd (n seeds) on {context.dataset} "
               f"(binarize {context.binarize}), {context.epochs} epochs. * fewer than {MIN_SEEDS} "
               "seeds; † nats of a likelihood that is not a density on this data (not comparable "
               "across losses).")
    header, rows = summary_table(summary, axes, latex=True)
    (out / "table.tex").write_text(latex_table(header, rows, caption, f"tab:{_safe_name(experiment)}"))

    figures = {}
    done = finished(runs)
    drawers = {"metrics_vs_latent": lambda: figure_metrics(runs),
               "learning_curves": lambda: figure_curves(done, load_curves(uri, done)),
               "objective_heatmap": lambda: figure_heatmap(runs),
               "rate_distortion": lambda: figure_rate_distortion(runs),
               "seconds_per_trial": lambda: figure_seconds(runs),
               "bce_vs_mse_pictures": lambda: figure_seed(runs, uri)}
    for name, draw in drawers.items() if not done.empty else ():
        drawn = draw()
        if drawn is not None:
            path = out / "figures" / f"{name}.png"
            drawn[0].savefig(path, dpi=DPI, facecolor="white")
            figures[name] = (path, drawn[1])

    doc = _document(experiment, uri, runs, summary, paired, figures, _study_run_tags(client, experiment))
    (out / "report.md").write_text(doc.markdown(out))
    (out / "report.html").write_text(doc.html(f"vaebench report: {experiment}"))
    return out


# figure file name -> (section title, why it may be missing)
FIGURES = {"metrics_vs_latent": ("Test metrics against latent size", "no finished run has test metrics"),
           "learning_curves": ("Learning curves", "no finished run logged val/elbo or val/bce"),
           "objective_heatmap": ("The objective per cell",
                                 "no finished run, or the runs share no objective (trained outside a sweep?)"),
           "rate_distortion": ("Rate vs distortion", "no finished run is variational (no KL)"),
           "seconds_per_trial": ("Seconds per trial", "no finished run logged trial_seconds"),
           "bce_vs_mse_pictures": ("BCE and MSE side by side",
                                   "no finished run logged samples and reconstructions")}


def _document(experiment, uri, runs, summary, paired, figures, study_tags) -> Document:
    doc = Document()
    done = finished(runs)
    context = Context.of(runs)
    axes = grid_axes(runs)
    counts = runs["state"].value_counts()
    doc.heading(1, f"Report: {experiment}")
    states = ", ".join(f"{counts[s]} {s.lower()}" for s in counts.index)
    seeds = ", ".join(map(str, context.seeds))
    doc.paragraph(f"Dataset **{context.dataset}** (binarize {context.binarize}), {context.epochs} "
                  f"epochs, seeds {seeds}, grid axes {', '.join(axes) or 'none'}, objective "
                  f"`{context.objective}` ({context.direction}). {len(runs)} trial runs: {states}.")
    facts = [f"MLflow store: `{uri}`, experiment `{experiment}`"]
    if study_tags.get("vaebench.spec"):
        facts.append(f"spec: `{study_tags['vaebench.spec']}`")
    hardware = sorted({h for h in runs["hardware"] if h})
    if hardware:
        facts.append(f"device: {', '.join(hardware)}")
    commit = study_tags.get("vaebench.git_commit")
    if commit:
        facts.append(f"git commit {commit[:12]}" + (" (with uncommitted changes)"
                                                    if study_tags.get("vaebench.git_dirty") == "true" else ""))
    facts.append(f"written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `bench report`")
    doc.items(facts)

    doc.heading(2, "Summary")
    if done.empty:
        doc.paragraph("No trial finished: there is nothing to summarise (see the failed and pruned "
                      "trials below).")
    else:
        header, rows = summary_table(summary, axes)
        doc.table(header, rows)
        doc.paragraph(f"Mean ± sample sd over seeds, n = number of seeds. * marks fewer than "
                      f"{MIN_SEEDS} seeds: treat those spreads as anecdotes. † marks nats of a "
                      "likelihood that is not a density on this data. Every metric per cell is in "
                      "`summary.csv`, every run in `runs.csv`, the table as LaTeX in `table.tex`.")
    doc.heading(2, "A fair comparison across losses")
    unfair = summary[(summary["metric"] == "test/nll") & ~summary["proper_density"]]
    doc.paragraph("Likelihoods in nats (test/elbo, test/nll, test/recon) are comparable across "
                  "losses only where each is a normalised density on the data: bce on binary data, "
                  "mse/gaussian/laplace/cbernoulli on continuous (grey) data, as each loss "
                  "declares in bench/losses.py (a density on [0,1] is not a probability of a "
                  "binary image). "
                  + (f"Here that fails for {len(unfair)} cell(s): "
                     + ", ".join(cell_label(unfair, axes)) + "; their nats are marked † and left "
                     "out of cross-loss differences." if len(unfair) else
                     "Here every cell with an NLL passes.")
                  + " test/mse (squared error) and test/bce (Bernoulli cross-entropy) of the mean "
                    "reconstruction are measured the same way for every model and loss: they are the "
                    "one yardstick on which the losses are judged.")
    doc.heading(2, "BCE or MSE?")
    doc.paragraph(loss_verdict(paired))
    if not paired.empty:
        doc.table(*differences_table(paired))
        doc.paragraph("Differences are paired by seed (same cell, same seed, only the loss "
                      "differs); the interval is Student's t with n − 1 degrees of freedom. "
                      f"* marks fewer than {MIN_SEEDS} pairs. Also in `differences.csv`.")
    doc.heading(2, "Figures")
    for name, (title, missing) in FIGURES.items():
        doc.heading(3, title)
        if name in figures:
            doc.figure(*figures[name])
        else:
            doc.paragraph(f"Not drawn: {missing}.")
    doc.heading(2, "Failed and pruned trials")
    other = runs[runs["state"] != "FINISHED"]
    if other.empty:
        doc.paragraph("None: every trial run finished.")
    else:
        doc.table(["trial", "cell", "state", "seconds", "reason"],
                  [["" if pd.isna(r["trial"]) else str(r["trial"]), r["cell"] or r["run_name"], r["state"],
                    "—" if pd.isna(r["wall_seconds"]) else f"{r['wall_seconds']:.1f}",
                    (r["fail_reason"] or "—").splitlines()[0][:200]] for _, r in other.iterrows()])
        if (other["state"] == "RUNNING").any():
            doc.paragraph("A trial still RUNNING is in progress, or its worker died; the next "
                          "`bench sweep` of the same spec marks those FAILED and trains them again.")
    return doc
