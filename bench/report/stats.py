"""Statistics of a study's runs, pure pandas and scipy: the part of a report a reader must trust.
Every number carries its n (cells with fewer than MIN_SEEDS seeds are flagged); nats of a run's
own likelihood are compared across losses only where it is a density on the data; a conditional
model's numbers given the label are flagged; bce − mse is paired by seed, with Holm's correction
over the cells of a metric. What a metric is comes from its METRICS registry entry (`facts`)."""

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
YARDSTICKS = ("test/bce", "test/mse", *SAMPLE_QUALITY)
SEED_CONCLUSION = "MSE looked better"
# Numbers a run logs besides evaluation's metrics (those declare their facts in METRICS).
RUN_FACTS = {"trial_seconds": {"better": "lower", "unit": "seconds"},
             "loss": {"better": "lower", "unit": "nats per image", "likelihood": True, "given_label": True}}
UNKNOWN = {"better": None, "unit": "", "likelihood": False, "given_label": False}


def facts(metric: str) -> dict:
    """{"better": "higher" | "lower" | None, "unit", "likelihood" (in nats of the run's own
    likelihood), "given_label" (a conditional model is given the label)} of "test/elbo" etc."""
    name = metric.split("/")[-1]
    for meta in map(METRICS.meta, METRICS.names()):
        if name in meta.get("better", {}):
            unit = meta.get("unit", "")
            return {"better": meta["better"][name], "unit": unit.get(name, "") if isinstance(unit, dict) else unit,
                    "likelihood": name in meta.get("likelihood", ()), "given_label": name in meta.get("given_label", ())}
    return {**UNKNOWN, **RUN_FACTS.get(name, {})}


def better(metric: str) -> str | None:
    return facts(metric)["better"]


def better_text(metric: str) -> str:
    return f"{better(metric)} is better" if better(metric) else "neither way is better"


def conditional_model(name) -> bool:
    return isinstance(name, str) and name in MODELS and MODELS.get(name).conditional


def study_objective(runs: pd.DataFrame) -> tuple[str, str]:
    """(metric, direction) that every run shares, else ("", ""): runs trained outside a sweep
    fall back to their trainer's selection metric, which differs between an ae and a vae."""
    pairs = set(zip(runs["objective_metric"], runs["objective_direction"])) - {("", "")}
    return pairs.pop() if len(pairs) == 1 else ("", "")


def grid_axes(runs: pd.DataFrame) -> list[str]:
    """The grid axes named in the cell keys ("model=vae,latent=2,seed=0"), seed excluded; runs
    without cell keys (trained outside a sweep) fall back to model, loss and latent."""
    cells = [str(c) for c in runs["cell"] if "=" in str(c)]
    if not cells:
        return [name for name in ("model", "loss", "latent") if name in runs]
    names = (part.split("=")[0] for cell in cells for part in cell.split(",") if "=" in part)
    return [name for name in dict.fromkeys(names) if name != "seed" and name in runs]


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The FINISHED runs; where a search ran several trials per cell and seed, the one with the
    best objective (validation, never test; in the direction every tagged run shares) stands for it."""
    done = runs[runs["state"] == "FINISHED"]
    key = done["cell"].where(done["cell"] != "", done["run_id"])
    if not key.duplicated().any():
        return done
    ascending = set(done["objective_direction"]) - {""} != {"maximize"}
    ordered = done.assign(_key=key).sort_values("objective", ascending=ascending)  # NaN last
    return ordered.drop_duplicates("_key").drop(columns="_key").sort_index()


def groups(frame: pd.DataFrame, by: list[str]):
    """(key tuple, rows) per value of the columns `by` in order of appearance; everything when `by` is empty."""
    return frame.groupby(by, sort=False) if by else [((), frame)]


def cell_label(frame: pd.DataFrame, axes: list[str]) -> pd.Series:
    """"vae · bce · latent=32": strings as they are, numbers named; the model when no axis is left."""
    parts = [frame[a].map(lambda v, a=a: str(v) if isinstance(v, str) else f"{a}={v:g}") for a in axes or ["model"]]
    return parts[0].str.cat(parts[1:], sep=" · ")


def summarize(runs: pd.DataFrame, metrics=SUMMARY_METRICS, by: list[str] | None = None) -> pd.DataFrame:
    """Mean, std (ddof 1) and n over seeds per (cell, metric) measured in the finished runs, in
    grid order. `comparable`: every run's likelihood is a density on its data, or the metric is
    loss-agnostic; `conditional`: computed given the true label (a CVAE's log p(x|y))."""
    by = grid_axes(runs) if by is None else by
    objective, direction = study_objective(runs)
    metrics = [m for m in metrics if m in runs and (m != "objective" or objective)]
    rows = []
    for keys, group in groups(finished(runs), by):
        proper = bool(group["proper_density"].eq(True).all())
        conditional = bool(group["model"].map(conditional_model).all())
        for metric in (m for m in metrics if group[m].notna().any()):
            values = group[metric].dropna()
            fact, n = facts(objective if metric == "objective" else metric), len(values)
            if metric == "objective":
                fact["better"] = "higher" if direction == "maximize" else "lower"
            rows.append({**dict(zip(by, keys)), "metric": metric, "mean": float(values.mean()),
                         "std": float(values.std(ddof=1)), "n": n,
                         "better": fact["better"] or "", "proper_density": proper,
                         "comparable": proper or not fact["likelihood"],
                         "conditional": conditional and fact["given_label"], "flag": "n<3" if n < MIN_SEEDS else ""})
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "std", "n", "better", "proper_density",
                                       "comparable", "conditional", "flag"])


def mean_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and Student's two-sided t-interval; NaN bounds for fewer than two values."""
    n = len(values)
    if n < 2:
        return (float(np.mean(values)) if n else np.nan), np.nan, np.nan
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def paired_p(values: np.ndarray) -> float:
    """Two-sided p of the paired t-test (NaN below two pairs; identical differences: 0, or 1 if zero)."""
    if len(values) < 2:
        return np.nan
    if np.ptp(values) == 0:
        return float(not values.any())
    return float(stats.ttest_1samp(values, 0.0).pvalue)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values of a float array; NaN entries are not in the family.
    Tied p-values get the same adjusted value whichever of them sorts first."""
    out = np.full(len(p), np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested])]
    m = len(order)
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def paired_differences(runs: pd.DataFrame, between: str = "loss", pair: tuple | None = None,
                       metrics=PAIRED_METRICS, by: list[str] | None = None) -> pd.DataFrame:
    """`pair[0]` − `pair[1]` per cell and metric, paired by seed: mean, 95% t-interval, n, the
    paired t-test's p and Holm's p over the cells of a metric, which decides `verdict`. Nats
    of a likelihood are paired only where both are densities on the data (else n = 0).
    Default pair: bce and mse, else the first two values of `between`."""
    by = [a for a in grid_axes(runs) if a != between] if by is None else by
    columns = [*by, "metric", "a", "b", "mean_a", "mean_b", "difference", "ci_low", "ci_high",
               "n", "p", "p_holm", "verdict"]
    done = finished(runs)
    values = list(dict.fromkeys(done[between])) if between in done else []
    pair = pair or (("bce", "mse") if {"bce", "mse"} <= set(values) else tuple(values[:2]))
    if len(pair) < 2:
        return pd.DataFrame(columns=columns)
    a, b = (done[done[between] == value] for value in pair)
    rows = []
    for keys, group in groups(a.merge(b, on=[*by, "seed"], suffixes=("_a", "_b")), by):
        for metric in metrics:
            ab = [f"{metric}_a", f"{metric}_b"]
            if metric not in done or group[ab].dropna().empty:
                continue  # not measured for this model (an ae has no ELBO)
            both = group["proper_density_a"].eq(True) & group["proper_density_b"].eq(True)
            pairs = (group[both] if facts(metric)["likelihood"] else group)[ab].dropna()
            diff = (pairs[ab[0]] - pairs[ab[1]]).to_numpy()
            mean, low, high = mean_interval(diff)
            rows.append({**dict(zip(by, keys)), "metric": metric, "a": pair[0], "b": pair[1],
                         "mean_a": float(pairs[ab[0]].mean()), "mean_b": float(pairs[ab[1]].mean()),
                         "difference": mean, "ci_low": low, "ci_high": high, "n": len(diff),
                         "p": paired_p(diff) if better(metric) else np.nan})
    paired = pd.DataFrame(rows, columns=columns)
    for _, family in paired.groupby("metric"):
        paired.loc[family.index, "p_holm"] = holm(family["p"].to_numpy())
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
    return f"{row.a if (row.difference < 0) == (better(row.metric) == 'lower') else row.b} better"


def loss_verdict(paired: pd.DataFrame) -> str:
    """What the paired tests say about the seed's conclusion, by one rule over the wins per
    yardstick after Holm's correction: wins for one loss only -> that loss; wins for both -> split;
    no win -> not settled."""
    present = [m for m in YARDSTICKS if m in set(paired["metric"])]
    if not present:
        return (f"The seed concluded \"{SEED_CONCLUSION}\" from samples viewed by eye; this study "
                "has no bce/mse pair on the same cells and seeds, so it cannot check that.")
    a, b = paired["a"].iloc[0], paired["b"].iloc[0]
    lines, wins = [], {a: [], b: []}
    for metric in present:
        group = paired[paired["metric"] == metric]
        won = {v: int((group["verdict"] == f"{v} better").sum()) for v in (a, b)}
        untested = int((group["n"] < 2).sum())
        for v in (a, b):
            wins[v] += [metric] if won[v] else []
        lines.append(f"on {metric} ({better_text(metric)}), {a} is better in {won[a]} and {b} in {won[b]} "
                     f"of {len(group)} cell{'s' if len(group) != 1 else ''}, "
                     f"{int((group['verdict'] == 'no clear difference').sum())} undecided"
                     + (f", {untested} with fewer than 2 seeds (no test)" if untested else ""))
    mse, other = (a, b) if a == "mse" else (b, a)  # the loss the seed preferred (b unless a is mse)
    if wins[a] and wins[b]:
        verdict = (f"the measured numbers are split: {a} wins cells on {', '.join(wins[a])} and "
                   f"{b} on {', '.join(wins[b])}, so neither loss is better on every yardstick")
    elif wins[a] or wins[b]:
        verdict = (f"the measured numbers {'support' if wins[mse] else 'contradict'} it: every difference "
                   f"that survives the correction favours {mse if wins[mse] else other}")
    else:
        verdict = "the measured numbers do not settle it: no difference survives the correction"
    return (f"The seed concluded \"{SEED_CONCLUSION}\" from samples viewed by eye. Measured "
            f"({a} − {b}, paired by seed; a cell counts for a loss when its paired t-test "
            f"rejects no difference at {1 - CONFIDENCE:.0%} after Holm's correction over the "
            f"cells of that metric): {'; '.join(lines)}. So {verdict}.")
