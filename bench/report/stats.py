"""Statistics of a study's runs, pure pandas and scipy: the part of a report a reader must trust.

- every number carries its n; cells with fewer than MIN_SEEDS seeds are flagged;
- nats under a run's own likelihood (ELBO, NLL, recon) are compared across losses only where
  that likelihood is a density on the data (the `proper_density` column); the loss-agnostic
  test/bce and test/mse are always comparable;
- a conditional model's numbers computed given the true label (a CVAE's ELBO and NLL are
  log p(x|y)) are flagged `conditional`; its test/nll_marginal is its log p(x);
- bce − mse is paired by seed, and the per-cell tests of one metric are one family under
  Holm's correction, so the verdict does not count chance wins.

What a metric is (which way is better, its unit, whether it is in the run's own likelihood's
nats, whether a conditional model computes it given the label) is read from its METRICS
registry entry (`facts`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from bench.registry import METRICS, MODELS

MIN_SEEDS = 3  # cells with fewer seeds are flagged: a spread from 1 or 2 numbers is not one
CONFIDENCE = 0.95
SAMPLE_QUALITY = ("test/fd", "test/precision", "test/recall", "test/cond_acc", "test/class_entropy",
                  "test/probe_acc")
HEADLINE = ("test/elbo", "test/nll", "test/nll_marginal", "test/mse", "test/bce", *SAMPLE_QUALITY)
SUMMARY_METRICS = ("objective", *HEADLINE, "test/recon", "test/kl", "test/active_units",
                   "test/bits_per_dim", "best_epoch", "trial_seconds")
PAIRED_METRICS = ("test/bce", "test/mse", "test/nll", "test/nll_marginal", *SAMPLE_QUALITY)
# The yardsticks of "BCE or MSE?": measured the same way whatever loss trained the model.
YARDSTICKS = ("test/bce", "test/mse", "test/fd", "test/precision", "test/recall",
              "test/class_entropy", "test/probe_acc")
SEED_CONCLUSION = "MSE looked better"
# Numbers a run logs besides evaluation's metrics (those declare their facts in METRICS).
RUN_FACTS = {"trial_seconds": {"better": "lower", "unit": "seconds"},
             "loss": {"better": "lower", "unit": "nats per image", "likelihood": True, "given_label": True}}
UNKNOWN = {"better": None, "unit": "", "likelihood": False, "given_label": False}


def facts(metric: str) -> dict:
    """{"better": "higher" | "lower" | None, "unit", "likelihood", "given_label"} of a metric
    ("test/elbo", "val/bce", "trial_seconds"), as the METRICS entry that computes it declares:
    `better` and `unit` per output; `likelihood` (in nats of the run's own likelihood) and
    `given_label` (a conditional model is given the true label to compute it) list outputs."""
    name = metric.rsplit("/", 1)[-1]
    for entry in METRICS.names():
        meta = METRICS.meta(entry)
        if name in meta.get("better", {}):
            unit = meta.get("unit", "")
            return {"better": meta["better"][name],
                    "unit": unit.get(name, "") if isinstance(unit, dict) else unit,
                    "likelihood": name in meta.get("likelihood", ()),
                    "given_label": name in meta.get("given_label", ())}
    return {**UNKNOWN, **RUN_FACTS.get(name, {})}


def better(metric: str) -> str | None:
    return facts(metric)["better"]


def better_text(metric: str) -> str:
    way = better(metric)
    return f"{way} is better" if way else "neither way is better"


def conditional_model(name) -> bool:
    """Whether a registered model conditions on the label (a CVAE)."""
    return isinstance(name, str) and name in MODELS and MODELS.get(name).conditional


def study_objective(runs: pd.DataFrame) -> tuple[str, str]:
    """(metric, direction) that every run shares, else ("", ""): runs trained outside a sweep
    fall back to their trainer's selection metric, which differs between an ae and a vae."""
    pairs = set(zip(runs["objective_metric"], runs["objective_direction"])) - {("", "")}
    return pairs.pop() if len(pairs) == 1 else ("", "")


def metric_facts(runs: pd.DataFrame, metric: str) -> dict:
    """`facts`, with "objective" standing for the study's objective metric."""
    if metric != "objective":
        return facts(metric)
    objective, direction = study_objective(runs)
    return {**facts(objective), "better": "higher" if direction == "maximize" else "lower"}


def grid_axes(runs: pd.DataFrame) -> list[str]:
    """The study's grid axes, read from the cell keys ("model=vae,loss=bce,latent=2,seed=0"),
    seed excluded: none for a search without a grid ("seed=0"). Runs without cell keys
    (trained outside a sweep) fall back to model, loss and latent."""
    cells = [str(c) for c in runs.get("cell", pd.Series(dtype=str)).dropna() if "=" in str(c)]
    if not cells:
        return [name for name in ("model", "loss", "latent") if name in runs]
    names = (part.split("=", 1)[0] for cell in cells for part in cell.split(",") if "=" in part)
    return [name for name in dict.fromkeys(names) if name != "seed" and name in runs]


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


def groups(frame: pd.DataFrame, by: list[str]):
    """(key tuple, rows) per value of the `by` columns in order of appearance; one group of
    everything when `by` is empty."""
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
    per (cell, metric) that was measured, in grid order. `proper_density`: every run of the
    cell had a likelihood that is a density on its data; `comparable`: the metric may be set
    beside other losses' (always for loss-agnostic metrics); `conditional`: computed given the
    true label (log p(x|y) for a CVAE); `flag`: "n<3" where fewer than MIN_SEEDS seeds."""
    by = grid_axes(runs) if by is None else by
    done = finished(runs)
    metrics = [m for m in metrics if m != "objective" or study_objective(runs)[0]]
    columns = [*by, "metric", "mean", "std", "n", "better", "proper_density", "comparable",
               "conditional", "flag"]
    rows = []
    for keys, group in groups(done, by):
        proper = bool(group["proper_density"].eq(True).all())
        conditional = bool(group["model"].map(conditional_model).all())
        for metric in metrics:
            values = group[metric].dropna() if metric in group else pd.Series(dtype=float)
            if values.empty:
                continue
            fact, n = metric_facts(runs, metric), len(values)
            rows.append({**dict(zip(by, keys)), "metric": metric, "mean": float(values.mean()),
                         "std": float(values.std(ddof=1)) if n > 1 else np.nan, "n": n,
                         "better": fact["better"] or "", "proper_density": proper,
                         "comparable": proper or not fact["likelihood"],
                         "conditional": conditional and fact["given_label"],
                         "flag": "n<3" if n < MIN_SEEDS else ""})
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


def paired_p(values: np.ndarray) -> float:
    """Two-sided p of the paired t-test that the mean difference is 0; NaN below two pairs.
    Identical differences: 0 when they are not all zero, else 1."""
    if len(values) < 2:
        return np.nan
    if np.ptp(values) == 0:
        return 0.0 if values[0] != 0 else 1.0
    return float(stats.ttest_1samp(values, 0.0).pvalue)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaN entries are not in the family): rejecting where
    the adjusted p < 1 - CONFIDENCE keeps the chance of any false win in the family below it."""
    p = np.asarray(p, dtype=float)
    out = np.full(len(p), np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def paired_differences(runs: pd.DataFrame, between: str = "loss", pair: tuple | None = None,
                       metrics=PAIRED_METRICS, by: list[str] | None = None) -> pd.DataFrame:
    """`pair[0]` minus `pair[1]` on each metric per cell, paired by seed (same cell, same seed,
    only `between` differs): mean difference, its 95% t-interval, n pairs, the paired t-test's
    p and Holm's adjusted p over the cells of that metric; `verdict` is decided on the
    adjusted p. Nats of a likelihood are paired only where both runs' likelihoods are
    densities on the data; a cell with no such pair is kept with n = 0 and says so. Default
    pair: bce vs mse, else the first two values of `between` in the study."""
    by = [a for a in grid_axes(runs) if a != between] if by is None else by
    columns = [*by, "metric", "a", "b", "mean_a", "mean_b", "difference", "ci_low", "ci_high",
               "n", "p", "p_holm", "verdict"]
    done = finished(runs)
    values = list(dict.fromkeys(done[between])) if between in done else []
    pair = pair or (("bce", "mse") if {"bce", "mse"} <= set(values) else tuple(values[:2]))
    if len(pair) < 2:
        return pd.DataFrame(columns=columns)
    a, b = (done[done[between] == value] for value in pair)
    merged = a.merge(b, on=[*by, "seed"], suffixes=("_a", "_b"))
    rows = []
    for keys, group in groups(merged, by):
        for metric in metrics:
            if f"{metric}_a" not in group or group[[f"{metric}_a", f"{metric}_b"]].dropna().empty:
                continue  # not measured for this model (an ae has no ELBO)
            pairs = group
            if facts(metric)["likelihood"]:
                pairs = group[group["proper_density_a"].eq(True) & group["proper_density_b"].eq(True)]
            pairs = pairs[[f"{metric}_a", f"{metric}_b"]].dropna()
            diff = (pairs[f"{metric}_a"] - pairs[f"{metric}_b"]).to_numpy(dtype=float)
            mean, low, high = mean_interval(diff)
            rows.append({**dict(zip(by, keys)), "metric": metric, "a": pair[0], "b": pair[1],
                         "mean_a": float(pairs[f"{metric}_a"].mean()) if len(pairs) else np.nan,
                         "mean_b": float(pairs[f"{metric}_b"].mean()) if len(pairs) else np.nan,
                         "difference": mean, "ci_low": low, "ci_high": high, "n": len(diff),
                         "p": paired_p(diff) if better(metric) else np.nan})
    paired = pd.DataFrame(rows, columns=columns)
    for _, family in paired.groupby("metric", sort=False):
        paired.loc[family.index, "p_holm"] = holm(family["p"].to_numpy(dtype=float))
    paired["verdict"] = [_verdict(r) for r in paired.itertuples()]
    return paired


def _verdict(row) -> str:
    if row.n == 0:
        return "not comparable: the two likelihoods are not both densities on this data"
    if row.n < 2:
        return "n < 2: no interval"
    if not better(row.metric):
        return "interval only"
    if not row.p_holm < 1 - CONFIDENCE:
        return "no clear difference"
    a_lower = row.difference < 0
    return f"{row.a if a_lower == (better(row.metric) == 'lower') else row.b} better"


def yardstick_counts(paired: pd.DataFrame) -> list[dict]:
    """Per yardstick present: how many cells favour each loss after Holm's correction, how
    many are undecided and how many had too few seeds to test."""
    out = []
    for metric in [m for m in YARDSTICKS if m in set(paired["metric"])]:
        group = paired[paired["metric"] == metric]
        a, b = group["a"].iloc[0], group["b"].iloc[0]
        out.append({"metric": metric, "cells": len(group), "wins": {
            v: int((group["verdict"] == f"{v} better").sum()) for v in (a, b)},
            "untested": int((group["n"] < 2).sum()),
            "undecided": int((group["verdict"] == "no clear difference").sum())})
    return out


def loss_verdict(paired: pd.DataFrame) -> str:
    """What the paired tests say about the seed's conclusion, derived by a rule from the counts
    per yardstick after Holm's correction: every surviving win for one loss, on every yardstick
    with any -> that loss is better where a difference is measurable; wins for both losses (on
    one yardstick or across them) -> split, with where each wins; no surviving win -> not
    settled."""
    counts = yardstick_counts(paired) if not paired.empty else []
    if not counts:
        return (f"The seed concluded \"{SEED_CONCLUSION}\" from samples viewed by eye; this study "
                "has no bce/mse pair on the same cells and seeds, so it cannot check that.")
    a, b = paired["a"].iloc[0], paired["b"].iloc[0]
    lines = []
    for c in counts:
        lines.append(f"on {c['metric']} ({better_text(c['metric'])}), {a} is better in "
                     f"{c['wins'][a]} and {b} in {c['wins'][b]} of {c['cells']} "
                     f"cell{'s' if c['cells'] != 1 else ''}, {c['undecided']} undecided"
                     + (f", {c['untested']} with fewer than 2 seeds (no test)" if c["untested"] else ""))
    winners = {v for c in counts for v in (a, b) if c["wins"][v]}
    mse = "mse" if "mse" in (a, b) else b  # the loss the seed preferred
    other = a if mse == b else b
    if winners == {mse}:
        verdict = (f"the measured numbers support it: every difference that survives the "
                   f"correction favours {mse}")
    elif winners == {other}:
        verdict = (f"the measured numbers contradict it: every difference that survives the "
                   f"correction favours {other}")
    elif winners:
        where = {v: [c["metric"] for c in counts if c["wins"][v]] for v in (a, b)}
        verdict = (f"the measured numbers are split: {a} wins cells on {', '.join(where[a])} and "
                   f"{b} on {', '.join(where[b])}, so neither loss is better on every yardstick")
    else:
        verdict = "the measured numbers do not settle it: no difference survives the correction"
    return (f"The seed concluded \"{SEED_CONCLUSION}\" from samples viewed by eye. Measured "
            f"({a} − {b}, paired by seed; a cell counts for a loss when its paired t-test "
            f"rejects no difference at {1 - CONFIDENCE:.0%} after Holm's correction over the "
            f"cells of that metric): {'; '.join(lines)}. So {verdict}.")
