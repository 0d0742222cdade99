"""Figures of a study: each a function of the runs returning (Figure, caption), or None when
there is nothing to draw; 1400 px wide, drawn headless. Every caption names the data, budget,
seeds and n behind the picture, with † and ‡ where they apply; the words are in
bench/templates/captions.j2, one macro per figure. A search's figures are Optuna's."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")  # a report is drawn headless

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bench.report.document import caption  # noqa: E402
from bench.report.stats import (HEADLINE, MIN_SEEDS, better_text, cell_label,  # noqa: E402
                                conditional_model, facts, finished, grid_axes, study_objective)

DPI = 100
WIDTH_IN = 14.0  # every figure is 1400 px wide
LINESTYLES = ["-", "--", ":", "-."]
DASHES = ["", (4, 2), (1, 2), (4, 1, 1, 1)]  # the same four styles as seaborn dash patterns
MARKERS = ["o", "s", "^", "D", "v", "P"]
CONDITIONAL_NOTE = caption("conditional")


def context_of(runs: pd.DataFrame) -> SimpleNamespace:
    """What every caption names: the data, the budget, the seeds and the objective behind the numbers."""
    def values(column):
        return sorted(set(runs[column].dropna())) if column in runs else []

    (objective, direction), epochs = study_objective(runs), values("epochs") or ["?"]
    return SimpleNamespace(dataset=", ".join(map(str, values("dataset"))),
                           binarize=", ".join(map(str, values("binarize"))),
                           epochs=str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}–{epochs[-1]}",
                           seeds=[int(s) for s in values("seed")], objective=objective, direction=direction)


def varies(frame: pd.DataFrame, axes: list[str], axis: str = "latent") -> bool:
    """Whether grid axis `axis` takes several values in `frame`: only then is it an x axis, a
    facet or named in a caption; one value is part of the cell label like any other."""
    return axis in axes and frame[axis].nunique() > 1


def _figure(height_in: float) -> Figure:
    return Figure(figsize=(WIDTH_IN, height_in), dpi=DPI, layout="constrained")


def _panels(count: int, row_height_in: float, columns: int = 4):
    """A figure of `count` panels, at most `columns` a row."""
    ncols = min(count, columns)
    fig = _figure(row_height_in * math.ceil(count / ncols) + 0.8)
    grid = fig.subplots(math.ceil(count / ncols), ncols, squeeze=False)
    for ax in grid.flat[count:]:
        ax.set_visible(False)
    return fig, grid


def _counts(done: pd.DataFrame, by: list[str]) -> tuple[int, int]:
    """The fewest and most runs (seeds) behind one cell of `by`."""
    counts = done.groupby(by, sort=False).size() if by else pd.Series([len(done)])
    return int(counts.min()), int(counts.max())


def _captioned(fig: Figure, title: str, name: str, done: pd.DataFrame, **values) -> tuple[Figure, str]:
    """`fig` with its title (formatted with `c` = `context_of(done)`, the runs drawn) and the
    caption `name` of captions.j2 on the same `c` and `values`."""
    context = context_of(done)
    fig.suptitle(title.format(c=context), fontsize=12)
    return fig, caption(name, c=context, **values)


def _labels(frame: pd.DataFrame, axes: list[str], metrics) -> pd.Series:
    """Series labels, with ‡ on a conditional model's where a drawn metric is conditional."""
    labels = cell_label(frame, axes)
    if any(facts(m)["given_label"] for m in metrics):
        labels = labels + np.where(frame["model"].map(conditional_model), " ‡", "")
    return labels


def _marked(labels) -> bool:
    return any(str(label).endswith("‡") for label in labels)


def _palette(labels) -> dict:
    labels = list(dict.fromkeys(labels))
    return dict(zip(labels, sns.color_palette("colorblind" if len(labels) <= 10 else "husl", len(labels))))


def _styles(frame: pd.DataFrame, labels: pd.Series) -> tuple[dict, dict]:
    """A colour per series label and a line style (index into LINESTYLES) by its loss."""
    losses = list(dict.fromkeys(frame["loss"]))
    return _palette(labels), {name: losses.index(loss) % len(LINESTYLES)
                              for name, loss in zip(labels, frame["loss"])}


def _handles(colors: dict, styles: dict, names: list, markers: bool = False) -> list[Line2D]:
    return [Line2D([], [], color=colors[name], linestyle=LINESTYLES[styles[name]], label=name,
                   marker=MARKERS[i % len(MARKERS)] if markers else None)
            for i, name in enumerate(names)]


def _legend(fig: Figure, handles: list, ncol: int = 7) -> None:
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), ncol), fontsize=9)


def _proper(p: pd.Series) -> bool:
    return bool(p.eq(True).all())


def figure_metrics(runs: pd.DataFrame, metrics=HEADLINE, x: str = "latent") -> tuple[Figure, str] | None:
    """Each metric against `x` (log2 axis, else side by side) per series, mean ± 1 sd over seeds;
    hollow, dotted where a likelihood is not a density on the data."""
    done, axes = finished(runs), grid_axes(runs)
    panels = [m for m in metrics if m in done and done[m].notna().any()]
    if not panels:
        return None
    numeric = varies(done, axes, x)
    done = done.assign(_series=_labels(done, [a for a in axes if a != x] if numeric else axes, panels),
                       _x=done[x] if numeric else 0)
    colors, styles = _styles(done, done["_series"])
    series, improper_seen = list(colors), False
    with sns.axes_style("whitegrid"):
        fig, grid = _panels(len(panels), 4.2)
        for ax, metric in zip(grid.flat, panels):
            for i, name in enumerate(series):
                rows = done[(done["_series"] == name) & done[metric].notna()]
                if rows.empty:
                    continue
                agg = rows.groupby("_x").agg(mean=(metric, "mean"), std=(metric, "std"),
                                             proper=("proper_density", _proper))
                fair = agg["proper"].to_numpy(dtype=bool) | (not facts(metric)["likelihood"])
                pos = agg.index.to_numpy(dtype=float) if numeric else np.array([i], dtype=float)
                marker = MARKERS[i % len(MARKERS)]
                ax.errorbar(pos, agg["mean"], yerr=agg["std"].fillna(0), color=colors[name], capsize=3,
                            linestyle=LINESTYLES[styles[name]] if fair.all() else ":", linewidth=1.6)
                ax.scatter(pos[fair], agg["mean"][fair], color=colors[name], s=36, zorder=3, marker=marker)
                ax.scatter(pos[~fair], agg["mean"][~fair], facecolor="white", edgecolor=colors[name],
                           s=36, zorder=3, marker=marker, linewidth=1.5)
                improper_seen |= bool((~fair).any())
            ax.set_title(f"{metric} ({better_text(metric)})", fontsize=11)
            if numeric:
                ticks = sorted(done[x].unique())
                ax.set_xscale("log", base=2)
                ax.set(xticks=ticks, xticklabels=[f"{t:g}" for t in ticks], xlabel=x)
                ax.minorticks_off()
            else:
                ax.set_xticks(range(len(series)), series, rotation=30, ha="right", fontsize=8)
                ax.set_xlim(-0.5, len(series) - 0.5)
            ax.set_ylabel(facts(metric)["unit"] or metric)
        hollow = Line2D([], [], color="grey", marker="o", markerfacecolor="white", linestyle=":",
                        label="hollow: not a density on this data")
        _legend(fig, _handles(colors, styles, series, markers=True) + ([hollow] if improper_seen else []))
    return _captioned(fig, "Test metrics — {c.dataset} ({c.binarize}), {c.epochs} epochs", "metrics", done,
                      n=_counts(done, axes), x=x if numeric else "cell", panels=panels, hollow=improper_seen,
                      likelihood=any(facts(m)["likelihood"] for m in panels), marked=_marked(series))


def figure_curves(runs: pd.DataFrame, curves: pd.DataFrame) -> tuple[Figure, str] | None:
    """Validation metrics per epoch, mean and ±1 sd band over seeds; one column per latent size."""
    if curves.empty:
        return None
    axes = grid_axes(runs)
    facet = varies(runs, axes)
    metrics = [m for m in ("val/elbo", "val/bce") if m in set(curves["metric"])]
    labels = _labels(runs, [a for a in axes if not (facet and a == "latent")], metrics)
    colors, styles = _styles(runs, labels)
    info = pd.DataFrame({"run_id": runs["run_id"], "series": labels, "facet": runs["latent"] if facet else 0})
    data = curves.merge(info, on="run_id")
    facets = sorted(data["facet"].unique())
    if len(facets) > 6:  # at most six columns stay readable: an evenly spread choice
        facets = [facets[i] for i in np.linspace(0, len(facets) - 1, 6).round().astype(int)]
    dashes = {name: DASHES[style] for name, style in styles.items()}
    with sns.axes_style("whitegrid"):
        fig = _figure(3.6 * len(metrics) + 0.9)
        grid = fig.subplots(len(metrics), len(facets), squeeze=False, sharex=True)
        for r, metric in enumerate(metrics):
            for c, value in enumerate(facets):
                ax = grid[r, c]
                part = data[(data["metric"] == metric) & (data["facet"] == value)]
                if not part.empty:
                    sns.lineplot(part, x="epoch", y="value", hue="series", style="series",
                                 palette=colors, dashes=dashes, errorbar="sd", ax=ax, legend=False)
                ax.set_title(f"{metric} ({better_text(metric)})" + (f" · latent {value}" if facet else ""),
                             fontsize=10)
                ax.set_ylabel("nats per image" if c == 0 else "")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        shown = [name for name in colors if name in set(data["series"])]
        _legend(fig, _handles(colors, styles, shown))
    per_line = data.groupby(["series", "facet"])["run_id"].nunique()
    return _captioned(fig, "Learning curves — {c.dataset} ({c.binarize})", "curves", runs,
                      n=(int(per_line.min()), int(per_line.max())), metrics=metrics, marked=_marked(shown))


def figure_heatmap(runs: pd.DataFrame) -> tuple[Figure, str] | None:
    """The study's objective over latent × loss, one heatmap per model (one colour scale)."""
    done, axes = finished(runs), grid_axes(runs)
    if not study_objective(runs)[0] or done["objective"].notna().sum() == 0:
        return None
    context = context_of(done)
    done = done.assign(_facet=_labels(done, [a for a in axes if a not in ("loss", "latent")],
                                      [context.objective]))
    nats = facts(context.objective)["likelihood"]
    facets = list(dict.fromkeys(done["_facet"]))
    cmap = "viridis" if context.direction == "maximize" else "viridis_r"  # bright = better
    with sns.axes_style("whitegrid"):
        fig, grid = _panels(len(facets), 3.4)
        for i, (ax, name) in enumerate(zip(grid.flat, facets)):
            agg = done[done["_facet"] == name].groupby(["loss", "latent"]).agg(
                mean=("objective", "mean"), n=("objective", "count"),
                proper=("proper_density", _proper)).reset_index()
            agg["text"] = [f"{m:.2f}\nn={n}{'*' if n < MIN_SEEDS else ''}{'†' if nats and not p else ''}"
                           for m, n, p in zip(agg["mean"], agg["n"], agg["proper"])]
            means = agg.pivot(index="loss", columns="latent", values="mean")
            texts = agg.pivot(index="loss", columns="latent", values="text").reindex_like(means)
            sns.heatmap(means, annot=texts.fillna("").to_numpy(), fmt="", cmap=cmap, ax=ax,
                        vmin=done["objective"].min(), vmax=done["objective"].max(),
                        cbar=i == len(facets) - 1, linewidths=0.5, annot_kws={"fontsize": 9},
                        cbar_kws={"label": f"{context.objective} ({better_text(context.objective)})"})
            ax.set_title(name, fontsize=11)
    return _captioned(fig, "Objective {c.objective} ({c.direction}) — {c.dataset}", "heatmap", done,
                      n=_counts(done, axes), nats=nats, marked=_marked(facets))


def figure_rate_distortion(runs: pd.DataFrame) -> tuple[Figure, str] | None:
    """KL(q(z|x) || p(z)) against -log p(x|z) per run, one panel per loss (its own nats)."""
    done, axes = finished(runs), grid_axes(runs)
    if "test/kl" not in done or done["test/kl"].notna().sum() == 0:
        return None
    done = done[done["test/kl"].notna() & done["test/recon"].notna()]
    done = done.assign(_series=_labels(done, [a for a in axes if a not in ("loss", "latent")],
                                       ["test/kl", "test/recon"]))
    colors = _palette(done["_series"])
    losses = list(dict.fromkeys(done["loss"]))
    with sns.axes_style("whitegrid"):
        fig = _figure(5.0)
        for ax, loss in zip(fig.subplots(1, len(losses), squeeze=False).flat, losses):
            part = done[done["loss"] == loss]
            sns.scatterplot(part, x="test/kl", y="test/recon", hue="_series", palette=colors,
                            ax=ax, legend=False, s=30, alpha=0.7)
            for name, rows in part.groupby("_series", sort=False):
                means = rows.groupby("latent")[["test/kl", "test/recon"]].mean().sort_index()
                ax.plot(means["test/kl"], means["test/recon"], color=colors[name], linewidth=1.2)
                for latent, point in means.iterrows():
                    ax.annotate(f"z={latent}", (point["test/kl"], point["test/recon"]),
                                fontsize=8, xytext=(4, 4), textcoords="offset points")
            proper = _proper(part["proper_density"])
            ax.set_title(f"loss {loss}" + ("" if proper else " (not a density on this data)"), fontsize=11)
            ax.set(xlabel="rate: test/kl (nats)", ylabel=f"distortion: test/recon (nats under {loss})")
        _legend(fig, [Line2D([], [], color=c, marker="o", label=s) for s, c in colors.items()], ncol=6)
    return _captioned(fig, "Rate vs distortion — {c.dataset} ({c.binarize})", "rate_distortion", done,
                      n=_counts(done, axes), lines=varies(done, axes), marked=_marked(colors),
                      skipped=sorted(set(finished(runs)["model"]) - set(done["model"])))


def figure_seconds(runs: pd.DataFrame) -> tuple[Figure, str] | None:
    """Wall-clock seconds per finished trial (training and evaluation), per cell."""
    done, axes = finished(runs), grid_axes(runs)
    if "trial_seconds" not in done or done["trial_seconds"].notna().sum() == 0:
        return None
    done = done.assign(cell_=cell_label(done, axes))
    cells = list(dict.fromkeys(done["cell_"]))
    with sns.axes_style("whitegrid"):
        fig = _figure(min(14.0, 1.6 + 0.32 * len(cells)))
        ax = fig.subplots()
        sns.barplot(done, y="cell_", x="trial_seconds", order=cells, errorbar="sd", ax=ax,
                    color=sns.color_palette("colorblind")[0], alpha=0.6)
        sns.stripplot(done, y="cell_", x="trial_seconds", order=cells, ax=ax, color="black", size=4)
        ax.set(xlabel="seconds per trial (lower is faster)", ylabel="")
    return _captioned(fig, "Seconds per trial — {c.dataset}, {c.epochs} epochs", "seconds", done,
                      n=_counts(done, axes), devices=sorted({d for d in done.get("hardware", ()) if d}))


def figure_seed(runs: pd.DataFrame, images) -> tuple[Figure, str] | None:
    """Per model, the samples and reconstructions the bce- and the mse-trained runs logged, side
    by side at the same latent size and seed; `images(run_id)` -> {"samples": ..., "recon": ...}."""
    done = finished(runs)
    if done.empty:
        return None
    latent = 32 if (done["latent"] == 32).any() else int(done["latent"].max())
    seed = int(done["seed"].min())
    chosen = done[(done["latent"] == latent) & (done["seed"] == seed)]
    chosen = chosen.assign(group=cell_label(chosen, [a for a in grid_axes(runs) if a not in ("loss", "latent")]))
    losses = sorted(set(chosen["loss"]), key=lambda loss: ({"bce": 0, "mse": 1}.get(loss, 2), loss))[:4]
    panels = {(row["group"], row["loss"]): (row, images(row["run_id"]))
              for _, row in chosen.iterrows() if row["loss"] in losses}
    groups = [g for g in dict.fromkeys(chosen["group"]) if any(panels.get((g, l), (0, {}))[1] for l in losses)]
    if not groups:
        return None
    column_in = WIDTH_IN / len(losses)

    def height(group, key, most):  # inches of one row of pictures, title included
        shapes = [panels[(group, l)][1][key].shape for l in losses if key in panels.get((group, l), (0, {}))[1]]
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
    what = f"{' and '.join(losses)} side by side" if len(losses) > 1 else f"Samples and reconstructions ({losses[0]})"
    return _captioned(fig, what + " — {c.dataset} ({c.binarize}), {c.epochs} epochs", "seed", done,
                      losses=losses, latent=latent, seed=seed)


def search_figures(study, params: list[str], objective: str) -> dict[str, tuple[Figure, str] | str]:
    """Optuna's own plots of a search (optuna.visualization.matplotlib), or why one cannot be drawn."""
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as plots

    def draw(name, plot, height, **kwargs):
        with warnings.catch_warnings(action="ignore"):
            try:
                axes = plot(study, **kwargs)
            except (ValueError, RuntimeError) as error:
                return f"Optuna could not draw it ({str(error).splitlines()[0]})"
        fig = np.ravel(axes)[0].figure
        fig.set(size_inches=(WIDTH_IN, height), dpi=DPI)
        plt.close(fig)  # drawn and saved like the others, not kept by pyplot
        return fig, caption(name, objective=objective, completed=completed)

    completed = sum(t.state.name == "COMPLETE" for t in study.trials)
    return {name: draw(name, plot, height, **kwargs) for name, plot, height, kwargs in (
        ("optimization_history", plots.plot_optimization_history, 5, {"target_name": objective}),
        ("intermediate_values", plots.plot_intermediate_values, 5, {}),
        ("param_importances", plots.plot_param_importances, 4,
         {"params": params, "evaluator": FanovaImportanceEvaluator(seed=0)}),
        ("objective_vs_params", plots.plot_slice, 4.5, {"params": params, "target_name": objective}))}
