"""Everything MLflow, and the only module that imports it.

Layout of a store: one experiment per study (tagged as model development), one parent run
per study (tag `vaebench.role=study`) and one nested run per trial (tags `vaebench.study`,
`vaebench.trial`, `vaebench.cell`). A trial's run is found by those tags, never by name.
Params are the full RunConfig; metrics go in one batch per epoch (`step=epoch`); images with
`log_image(key=..., step=epoch)` for the UI's step slider; the model as state dict + config
JSON (loaded back with weights_only=True through the registry), never a pickled module.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# A tracking server lost mid-study: a few retries with exponential backoff (about 30 s in all),
# then the call fails, so the trial fails with the reason and the study goes on.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from bench import locations  # noqa: E402
from bench.config import RunConfig  # noqa: E402
from bench.errors import TrackingError  # noqa: E402

logging.getLogger("mlflow").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
logging.getLogger("alembic").setLevel(logging.ERROR)

ROLE, STUDY, TRIAL, CELL = "vaebench.role", "vaebench.study", "vaebench.trial", "vaebench.cell"
SLOT = "vaebench.slot"
FAIL_REASON = "vaebench.fail_reason"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_uri(results: str | Path) -> str:
    """sqlite:///<results>/mlflow.db: MLflow 3's own default backend (./mlruns is legacy)."""
    return locations.sqlite_url(Path(results) / "mlflow.db")


def connect(uri: str) -> MlflowClient:
    """A client on `uri`, creating (and migrating) a new sqlite store first. Call this once in
    the coordinating process before workers start: concurrent creation of one store crashes.
    A tracking server that does not answer fails here, in one line, before anything trains."""
    locations.check_driver(uri, "MLflow tracking store")
    locations.check_not_the_other_store(uri, "MLflow tracking store")
    locations.ensure_parent(uri)
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    try:  # a bad URI, a file that is no database or a folder fails in the client's constructor
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MlflowException, SQLAlchemy and HTTP errors alike
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrackingError(locations.redact(f"cannot open MLflow store {uri}: {first}; check the tracking "
                                             "URI (--tracking-uri) or start the server")) from None
    return client


def _check_server(uri: str, timeout_s: float = 5.0) -> None:
    """One quick request to the server's /health (the client's own retries take minutes)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(locations.redact(f"MLflow tracking server {uri} does not answer ({reason}); start "
                                             "it (make services) or fix --tracking-uri")) from None


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment `name`, created with the model-development tag if it does not exist."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it in the UI "
                                "or rename the study")
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name),
                                        tags=EXPERIMENT_KIND)
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a local sqlite store (`<store dir>/artifacts/<experiment>`), not in
    ./mlruns of whatever directory the command ran in; a tracking server decides its own."""
    path = locations.sqlite_path(uri)
    return None if path is None else (path.resolve().parent / "artifacts" / experiment).as_uri()


def experiment_url(base: str, exp_id: str) -> str:
    """The experiment's page in the MLflow UI at `base`, in its "Model training" view: MLflow 3's
    UI opens in its GenAI view unless the URL asks for `workflowType=machine_learning`."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}?workflowType=machine_learning"


def ui_base(uri: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """Where a user sees the store `uri`: the tracking server itself, or `make ui`'s address."""
    return uri if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"


@functools.cache
def _environment_tags() -> dict[str, str]:
    """Versions, device and git state: what is needed to trust and reproduce a number. Read
    once per process (two git calls): the code a process runs is the code it imported."""
    import optuna

    tags = {"vaebench.torch": torch.__version__, "vaebench.mlflow": mlflow.__version__,
            "vaebench.optuna": optuna.__version__, "vaebench.python": platform.python_version(),
            "vaebench.host": platform.node()}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if commit:
            tags.update({"mlflow.source.git.commit": commit, "vaebench.git_commit": commit,
                         "vaebench.git_dirty": str(bool(dirty)).lower()})
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def environment_tags() -> dict[str, str]:
    return dict(_environment_tags())


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def study_run(client: MlflowClient, exp_id: str, study: str) -> str:
    """The parent run of study `study`: reused on resume, created otherwise."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{ROLE}` = 'study' and tags.`{STUDY}` = '{study}'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    if runs:
        run_id = runs[0].info.run_id
        if runs[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=f"study {study}",
                            tags={ROLE: "study", STUDY: study, **environment_tags()})
    return run.info.run_id


def start_trial_run(client: MlflowClient, exp_id: str, cfg: RunConfig, *, run_name: str,
                    parent_run_id: str | None = None, tags: dict | None = None) -> str:
    """A run for one trial with the full config as params, nested under the study run."""
    all_tags = {ROLE: "trial", **environment_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_id = client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in cfg.to_dict().items()])
    return run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """All metrics of one step in one call (each call costs 7-50 ms on sqlite)."""
    log_steps(client, run_id, {step: metrics})


def log_steps(client: MlflowClient, run_id: str, steps: dict[int, dict[str, float]]) -> None:
    """The metrics of several steps ({step: {name: value}}) in as few calls as MLflow allows."""
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for step, metrics in steps.items() for k, v in metrics.items()
             if v is not None and np.isfinite(v)]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])


def last_step(client: MlflowClient, run_id: str, key: str) -> int:
    """The highest step logged for metric `key` in the run (0 when none)."""
    return max((m.step for m in client.get_metric_history(run_id, key)), default=0)


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_dataset(client: MlflowClient, run_id: str, data) -> None:
    """Each split as an MLflow dataset input with its digest, so runs on different data are
    never mixed up in the UI."""
    inputs = _dataset_inputs(data)
    try:
        client.log_inputs(run_id, datasets=inputs)
    except MlflowException:  # another process created the same dataset row just now
        time.sleep(0.5)
        client.log_inputs(run_id, datasets=inputs)


_INPUTS: dict[int, tuple] = {}  # id(data) -> (data, its inputs): digests cost 50-400 ms a trial


def _dataset_inputs(data) -> list[DatasetInput]:
    """The splits of `data` as dataset inputs, digested once per Dataset object per process
    (the object is kept beside them, so its id is not reused while cached)."""
    if id(data) not in _INPUTS:
        inputs = []
        for context, split in (("train", data.train), ("validation", data.val), ("test", data.test)):
            ds = mlflow.data.from_numpy(split.x.flatten(1).numpy(), targets=split.y.numpy(),
                                        source=data.source, name=f"{data.name}-{data.binarize}-{context}")
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        if len(_INPUTS) >= 4:
            _INPUTS.pop(next(iter(_INPUTS)))
        _INPUTS[id(data)] = (data, inputs)
    return _INPUTS[id(data)][1]


def log_image(client: MlflowClient, run_id: str, key: str, image: np.ndarray, step: int) -> None:
    client.log_image(run_id, image, key=key, step=step, synchronous=True)


def log_json(client: MlflowClient, run_id: str, name: str, obj) -> None:
    client.log_text(run_id, json.dumps(obj, indent=2, sort_keys=True), name)


def log_model(client: MlflowClient, run_id: str, model: torch.nn.Module, cfg: RunConfig,
              image_shape, num_classes: int) -> None:
    """State dict + config JSON under `model/`; `load_model` rebuilds it through the registry."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
        (Path(tmp) / "config.json").write_text(cfg.to_json())
        (Path(tmp) / "data.json").write_text(json.dumps({"image_shape": list(image_shape),
                                                         "num_classes": num_classes}))
        client.log_artifacts(run_id, tmp, artifact_path="model")


def quietly(call, *args) -> None:
    """Record a trial's end where the tracking store still answers; when it does not (a lost
    server, a store another process holds locked), the original error must be what the caller
    sees, never MLflow's own logged traceback; the coordinator or the next run marks the run."""
    quiet = logging.getLogger("mlflow")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL + 1)
    try:
        call(*args)
    except Exception:  # noqa: BLE001
        pass
    finally:
        quiet.setLevel(level)


def end_run(client: MlflowClient, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
    if reason:
        set_tags(client, run_id, {FAIL_REASON: reason[:4000]})
    client.set_terminated(run_id, status=status)


def load_model(run_id: str, tracking_uri: str | None = None):
    """The model logged by run `run_id`, rebuilt from the registry (weights_only=True)."""
    from bench.models import create_model
    from bench.train import load_weights

    client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else MlflowClient()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(run_id, "model", tmp))
            cfg = RunConfig.from_dict(json.loads((local / "config.json").read_text()))
            meta = json.loads((local / "data.json").read_text())
            state = load_weights(local / "state_dict.pt")
    except (MlflowException, OSError) as e:
        raise TrackingError(f"run {run_id} has no loadable model ({str(e).splitlines()[0]}); "
                            "only finished trial runs log one") from None
    model = create_model(cfg, tuple(meta["image_shape"]), meta["num_classes"])
    model.load_state_dict(state)
    return model.eval()


def trial_runs(client: MlflowClient, exp_id: str, study: str) -> list:
    """Every trial run of `study`, oldest first."""
    return _search_all(client, [exp_id], f"tags.`{ROLE}` = 'trial' and tags.`{STUDY}` = '{study}'")


def _search_all(client: MlflowClient, exp_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def resumable_run(client: MlflowClient, exp_id: str, study: str, cell: str, slot: int) -> str | None:
    """The newest unfinished trial run of (cell, slot): the run a retried trial continues."""
    found = _search_all(client, [exp_id], f"tags.`{ROLE}` = 'trial' and tags.`{STUDY}` = '{study}' and "
                                          f"tags.`{CELL}` = '{cell}' and tags.`{SLOT}` = '{slot}'")
    runs = [r for r in found if r.info.status in ("FAILED", "KILLED", "RUNNING")
            and r.data.tags.get("vaebench.state") is None]
    return runs[-1].info.run_id if runs else None


def reopen_run(client: MlflowClient, run_id: str, tags: dict) -> None:
    """Mark a stopped run RUNNING again (a resumed trial), with the new trial's tags."""
    client.update_run(run_id, status="RUNNING")
    set_tags(client, run_id, tags)
    if FAIL_REASON in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, FAIL_REASON)


def fail_orphaned_runs(client: MlflowClient, exp_id: str, study: str, live_trials: set[int]) -> int:
    """Mark FAILED the RUNNING trial runs whose Optuna trial is no longer running (a crashed or
    killed worker). Returns how many were marked."""
    marked = 0
    for run in trial_runs(client, exp_id, study):
        if run.info.status == "RUNNING" and int(run.data.tags.get(TRIAL, -1)) not in live_trials:
            end_run(client, run.info.run_id, "FAILED", "the worker stopped before the trial ended")
            marked += 1
    return marked

