"""A reproduction's record for the repository (`bench table NAME --full --publish DIR`): the
paper table as markdown and LaTeX, `results.json` with each seed's numbers and provenance (MLflow
run id, git commit, machine, wall time, epochs reached), and the validation curves, so that the
committed numbers can be checked against their runs and read without the store."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from bench import tracking
from bench.report.figures import DPI, WIDTH_IN
from bench.report.runs import load_curves, load_runs, open_store
from bench.report.stats import finished
from bench.tables import paper_named, paper_spec, write_table

SEED_METRICS = ("test/nll", "test/elbo", "test/active_units", "test/kl", "test/recon")


def publish(name: str, directory: str | Path, *, results: Path, full: bool = True,
            tracking_uri: str | None = None, goal_nats: float = 0.5) -> dict:
    """Write the record of paper `name`'s study into `directory` and return the JSON written."""
    uri = tracking_uri or tracking.default_uri(results)
    study = paper_spec(name, full).name
    write_table(name, results=results, full=full, tracking_uri=uri)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for suffix in (".md", ".tex", ".png"):
        made = Path(results) / "tables" / f"{study}{suffix}"
        if made.exists():
            shutil.copyfile(made, directory / f"table{suffix}")
    runs = finished(load_runs(uri, study))
    client = open_store(uri)
    seeds = [_seed_record(client, row) for _, row in runs.iterrows()]
    record = {"paper": paper_named(name).citation, "study": study, "published": _published(name),
              "ours": _summary([s["test/nll"] for s in seeds]), "seeds": seeds}
    target = _published_nll(name)
    if target is not None and record["ours"]["n"]:
        gap = record["ours"]["mean"] - target
        record["gap_nats"] = gap
        record["within_goal"] = bool(abs(gap) <= goal_nats)
    (directory / "results.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _curves_figure(uri, runs, directory / "validation_curves.png")
    return record


def _seed_record(client, row) -> dict:
    tags = client.get_run(row["run_id"]).data.tags
    out = {"seed": int(row["seed"]), "mlflow_run_id": row["run_id"], "git_commit": tags.get("vaebench.git_commit"),
           "git_dirty": tags.get("vaebench.git_dirty"), "machine": tags.get("vaebench.device"),
           "host": tags.get("vaebench.host"), "torch": tags.get("vaebench.torch"),
           "epochs_trained": _int(row.get("last_epoch")), "best_epoch": _int(row.get("best_epoch")),
           "wall_seconds": _float(row.get("trial_seconds")),
           "resumed_from_epoch": _int(tags.get("vaebench.resumed_from_epoch"))}
    out.update({metric: _float(row.get(metric)) for metric in SEED_METRICS})
    return out


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    mean = float(np.mean(values)) if n else None
    sd = float(np.std(values, ddof=1)) if n > 1 else None
    return {"metric": "test/nll", "n": n, "mean": mean, "sd": sd,
            "se": sd / math.sqrt(n) if sd is not None else None}


def _published(name: str) -> dict:
    return {row.label: row.published for row in paper_named(name).rows if row.published}


def _published_nll(name: str) -> float | None:
    for row in paper_named(name).rows:
        if row.match and "test/nll" in row.published:
            return float(row.published["test/nll"].split()[0])
    return None


def _curves_figure(uri: str, runs, path: Path) -> None:
    """val/elbo of every seed against the epoch: where each stopped and how flat it was."""
    from matplotlib.figure import Figure

    curves = load_curves(uri, runs, metrics=("val/elbo",))
    if curves.empty:
        return
    figure = Figure(figsize=(WIDTH_IN, 4.5))
    left, right = figure.subplots(1, 2)
    for (run_id, frame), (_, row) in zip(curves.groupby("run_id", sort=False), runs.iterrows()):
        frame = frame.sort_values("epoch")
        for ax in (left, right):
            ax.plot(frame["epoch"], frame["value"], label=f"seed {int(row['seed'])} (best epoch "
                                                          f"{_int(row.get('best_epoch'))})")
    top = curves["value"].max()
    right.set_ylim(top - 10, top + 1)
    for ax, title in ((left, "validation ELBO (nats) by epoch"), (right, "the last 10 nats")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    left.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, facecolor="white")


def _int(value):
    try:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
    except (TypeError, ValueError):
        return None


def _float(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
