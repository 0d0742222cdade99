"""A study read back: its MLflow trial runs as one pandas row each, their curves and pictures,
and its Optuna study where the storage holds one. Nothing here computes a statistic."""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings

import numpy as np
import pandas as pd
from PIL import Image

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per image is noise

from bench import locations, tracking  # noqa: E402
from bench.config import field_names, field_types  # noqa: E402
from bench.errors import BenchError  # noqa: E402
from bench.report.stats import better  # noqa: E402

CURVE_METRICS = ("val/elbo", "val/bce")
STATE_TAG = "vaebench.state"
TAG_COLUMNS = {"vaebench.fail_reason": "fail_reason", "vaebench.training_objective": "training_objective",
               "vaebench.device": "hardware", "vaebench.grid_key": "grid_key"}
# images/<key>+step+<step>+timestamp+<ms>+<uuid>.png (MLflow 3; older versions used % for +)
IMAGE_FILE = re.compile(r"^images/(?P<key>[^+%]+)[+%]step[+%](?P<step>\d+)[+%]timestamp[+%]\d+"
                        r"[+%][0-9a-f-]+\.png$")


class ReportError(BenchError):
    """A report that cannot be made: no store, no such experiment, or no runs in it."""


def open_store(tracking_uri: str):
    """An MLflow client on an existing store: a report never creates an empty one."""
    path = locations.sqlite_path(tracking_uri)
    if path is not None and not path.is_file():
        raise ReportError(f"no MLflow store at {path}: run a study first (`make sweep` or "
                          "`bench sweep SPEC --results DIR`), or pass --results / --tracking-uri "
                          "of the store that holds it")
    return tracking.connect(tracking_uri)


def _missing(client, tracking_uri: str, problem: str) -> ReportError:
    names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
    known = f"experiments in this store: {', '.join(names)}" if names else "the store has no experiments"
    return ReportError(f"{problem} ({tracking_uri}); {known}. Create runs with `make sweep` or "
                       f"`bench sweep SPEC`, whose study name is the experiment name")


def latest_experiment(client, tracking_uri: str = "") -> str:
    """The experiment whose newest trial run started last: the study most recently worked on."""
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, filter_string=f"tags.`{tracking.ROLE}` = 'trial' and tags.`{tracking.STUDY}` "
                               "LIKE '%'", order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not found:
        raise _missing(client, tracking_uri, "no trial runs in any experiment")
    return client.get_experiment(found[0].info.experiment_id).name


def load_runs(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per trial run of `experiment` (= study name), in trial order: state, typed
    RunConfig params, final metrics, wall-clock seconds, the objective at the chosen epoch, the
    last epoch logged and the vaebench tags."""
    client = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        raise _missing(client, tracking_uri, f"no experiment named {experiment!r}")
    runs = tracking.trial_runs(client, found.experiment_id, experiment)
    if not runs:
        alone = client.search_runs([found.experiment_id], f"tags.`{tracking.ROLE}` = 'trial'", max_results=1)
        raise _missing(client, tracking_uri, f"experiment {experiment!r} has no trial runs of a study"
                       + (" (its runs were trained one by one with `bench train`)" if alone else ""))
    frame = pd.DataFrame([_row(run) for run in runs])
    # {epoch: value} of the objective (else train/loss): what it optimised, how far a trial got
    histories = [{m.step: m.value for m in client.get_metric_history(row.run_id, row.objective_metric or "train/loss")}
                 for row in frame.itertuples()]
    best = frame["best_epoch"] if "best_epoch" in frame else pd.Series(np.nan, index=frame.index)
    frame["objective"] = [h.get(int(b), np.nan) if metric and pd.notna(b) else np.nan
                          for h, b, metric in zip(histories, best, frame["objective_metric"])]
    frame["last_epoch"] = [max(h, default=pd.NA) for h in histories]
    frame = frame.sort_values(["trial", "start_time"], kind="stable", na_position="last")
    return frame.reset_index(drop=True)


def _row(run) -> dict:
    info, tags = run.info, run.data.tags
    types, params = field_types(), {}
    for name, text in run.data.params.items():
        kind = types.get(name, str)
        try:
            params[name] = kind(float(text)) if kind is int else kind(text)
        except ValueError:
            params[name] = text
    start = pd.to_datetime(info.start_time, unit="ms", utc=True)
    end = pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT
    metric, direction = objective_of(tags)
    return {"trial": int(tags[tracking.TRIAL]) if tags.get(tracking.TRIAL, "").isdigit() else pd.NA,
            "run_id": info.run_id, "run_name": info.run_name, "cell": tags.get(tracking.CELL, ""),
            "state": tags.get(STATE_TAG) or info.status, "status": info.status,
            **{name: params.get(name) for name in field_names()},
            **dict(sorted(run.data.metrics.items())),
            "wall_seconds": (end - start).total_seconds() if info.end_time else np.nan,
            "objective_metric": metric, "objective_direction": direction,
            "start_time": start, "end_time": end,
            "proper_density": {"true": True, "false": False}.get(tags.get("vaebench.proper_density"), pd.NA),
            **{column: tags.get(tag, "") for tag, column in TAG_COLUMNS.items()}}


def objective_of(tags: dict) -> tuple[str, str]:
    """(metric, direction) of the study's objective from the sweep's tags; older runs carry
    only the sentence "val/bce (minimize) of the epoch ..."; a run trained outside a sweep
    falls back to its trainer's selection metric."""
    if tags.get("vaebench.objective_metric"):
        return tags["vaebench.objective_metric"], tags.get("vaebench.objective_direction", "")
    metric, _, rest = tags.get("vaebench.objective", "").partition(" (")
    direction = rest.partition(")")[0]
    if metric and direction in ("maximize", "minimize"):
        return metric, direction
    selection = tags.get("vaebench.selection", "")
    return (selection, "maximize" if better(selection) == "higher" else "minimize") if selection else ("", "")


def load_curves(tracking_uri: str, runs: pd.DataFrame, metrics=CURVE_METRICS) -> pd.DataFrame:
    """Per-epoch values of `metrics` for every run: long format (run_id, metric, epoch, value)."""
    client = open_store(tracking_uri)
    rows = [{"run_id": run_id, "metric": metric, "epoch": m.step, "value": m.value}
            for run_id in runs["run_id"] for metric in metrics
            for m in client.get_metric_history(run_id, metric)]
    return pd.DataFrame(rows, columns=["run_id", "metric", "epoch", "value"])


def run_images(client, run_id: str, keys=("samples", "recon")) -> dict[str, np.ndarray]:
    """The logged image of each key at its highest step (the best model's final pictures)."""
    found = [m for item in client.list_artifacts(run_id, "images")
             if (m := IMAGE_FILE.match(item.path)) and m["key"] in keys]
    # ascending steps, the highest written last; reversed first, so a tie goes to the first listed
    newest = {m["key"]: m.string for m in sorted(found[::-1], key=lambda m: int(m["step"]))}
    with tempfile.TemporaryDirectory() as tmp:
        return {key: np.asarray(Image.open(client.download_artifacts(run_id, path, tmp)).convert("L"))
                for key, path in newest.items()}


def study_tags(client, experiment: str) -> dict:
    """The tags of the study's parent run (spec file, git commit)."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1,
                              filter_string=f"tags.`{tracking.ROLE}` = 'study'")
    return dict(runs[0].data.tags) if runs else {}


def optuna_study(storage: str, name: str):
    """(the Optuna study named `name`, its spec as the sweep recorded it) in `storage`, or
    (None, {}) where there is none: a report never creates a storage."""
    path = locations.sqlite_path(storage)
    if path is not None and not path.is_file():
        return None, {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings(action="ignore"):
            study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no such study (runs trained by a study in another storage): no search section
        return None, {}
    except Exception as e:  # noqa: BLE001 - a storage that cannot be read must not silently drop a section
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ReportError(locations.redact(f"cannot read Optuna storage {storage}: {first}; fix --storage, or move "
                                           "the file away to report from MLflow alone")) from None
    return study, json.loads(study.user_attrs.get("spec", "{}"))
