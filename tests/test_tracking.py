"""Tracking a trial in MLflow: what a run holds once `bench.trial.run_tracked` is done with it.

Every test reads a real MLflow store (sqlite in a temporary directory). The trials themselves
are trained once per module, one per registered model, for 2 epochs on the 8x8 digits.
"""

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pytest
import torch
from PIL import Image

import bench
from bench import tracking
from bench.config import RunConfig
from bench.data import load_dataset
from bench.errors import DivergedError
from bench.evaluate import evaluate
from bench.models import create_model
from bench.registry import MODELS
from bench.train import seed_everything
from bench.trial import image_steps, pictures, run_tracked

# bench.tracking silences this MLflow warning, but pytest resets warning filters for each test
pytestmark = pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")
EPOCHS = 2
STUDY = "tracking-test"
IMAGE_KEYS = {"samples", "recon", "interpolation", "latent"}
NOT_FOR_AN_AE = {"test/elbo", "test/nll", "test/kl"}  # an AE has no ELBO: absent, never 0
# images/<key>+step+<step>+timestamp+<ms>+<uuid>.png, as MLflow 3 names `log_image(key=, step=)`
IMAGE_FILE = re.compile(r"images/(?P<key>[\w.-]+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+"
                        r"(?P<compressed>\+compressed)?\.(?P<ext>png|webp)")


def config(**changes) -> RunConfig:
    return RunConfig(**{"dataset": "digits", "epochs": EPOCHS, "latent": 2, "eval_k": 5,
                        "eval_n": 50, "device": "cpu", **changes})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def study(tmp_path_factory, new_store, digits):
    """A study's parent run and one finished trial run per registered model, tracked in a
    store under <root>/store while the working directory is the empty <root>/cwd."""
    root = tmp_path_factory.mktemp("tracking")
    uri = new_store(root / "store")
    (root / "cwd").mkdir()
    client = tracking.connect(uri)
    exp_id = tracking.experiment_id(client, STUDY)
    parent = tracking.study_run(client, exp_id, STUDY)
    trials = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "cwd")
        for model in MODELS.names():
            cfg = config(model=model)
            outcome = run_tracked(cfg, digits, client=client, exp_id=exp_id, run_name=f"{model} trial",
                                  results=root / "results", parent_run_id=parent)
            trials[model] = SimpleNamespace(cfg=cfg, outcome=outcome, run=client.get_run(outcome.run_id))
    return SimpleNamespace(root=root, uri=uri, client=client, exp_id=exp_id, parent=parent, trials=trials)


@pytest.mark.parametrize("uri", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
def test_a_store_in_memory_is_refused_before_anything_trains(uri):
    """VAEBENCH_TRACKING_URI=sqlite:/// ran a study into memory: every run lost, exit 0, and the
    Optuna trials COMPLETE, so the next run would not train them again."""
    from bench import queue
    from bench.errors import BenchError

    for open_store, what in ((tracking.connect, "MLflow tracking store"), (queue.open_storage, "Optuna storage")):
        with pytest.raises(BenchError, match=re.escape(f"{what} {uri!r} names no file")):
            open_store(uri)


def test_the_two_stores_swapped_are_refused_and_left_as_they_were(tmp_path, new_store):
    """--tracking-uri pointing at optuna.db migrated it into an MLflow store too (a traceback), and
    --storage pointing at mlflow.db added Optuna's tables to it."""
    import hashlib

    from bench import queue
    from bench.errors import BenchError

    new_store(tmp_path)
    digest = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("mlflow.db", "optuna.db")}
    with pytest.raises(BenchError, match="optuna.db is an Optuna storage, not an MLflow tracking store: swap"):
        tracking.connect(f"sqlite:///{tmp_path / 'optuna.db'}")
    with pytest.raises(BenchError, match="mlflow.db is an MLflow tracking store, not an Optuna storage: swap"):
        queue.open_storage(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert digest == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in digest}


@pytest.mark.parametrize("uri", ["garbage", "sqlite:///{tmp}/noise.db"])  # a plain path; a file of noise
def test_a_store_that_cannot_be_opened_is_one_line_not_a_traceback(tmp_path, uri):
    from bench.errors import TrackingError

    (tmp_path / "noise.db").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(TrackingError, match="cannot open MLflow store .*; check the tracking URI"):
        tracking.connect(uri.format(tmp=tmp_path))


def test_each_trial_is_one_finished_run_nested_under_the_study_run(study):
    runs = study.client.search_runs([study.exp_id])
    assert len(runs) == 1 + len(MODELS)
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE) == "study"]
    assert [r.info.run_id for r in parents] == [study.parent]
    trial_runs = [r for r in runs if r.info.run_id != study.parent]
    assert sorted(r.info.run_name for r in trial_runs) == [f"{m} trial" for m in MODELS.names()]
    for run in trial_runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == study.parent
        assert run.data.tags[tracking.ROLE] == "trial"


def test_the_experiment_is_tagged_as_model_development(study):
    experiment = study.client.get_experiment(study.exp_id)
    assert experiment.name == STUDY
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize("model", MODELS.names())
def test_params_are_the_full_config(study, model):
    trial = study.trials[model]
    assert trial.run.data.params == {name: str(value) for name, value in trial.cfg.to_dict().items()}


@pytest.mark.parametrize("model", MODELS.names())
def test_every_epoch_is_logged_at_its_step(study, model):
    trial = study.trials[model]
    history = trial.outcome.result.history
    keys = ["train/loss", "val/bce", "val/recon", "samples_per_s"]
    keys += ["val/elbo", "val/kl"] if MODELS.get(model).variational else []
    for key in keys:
        logged = sorted((m.step, m.value) for m in study.client.get_metric_history(trial.run.info.run_id, key))
        assert logged == [(epoch["epoch"], epoch[key]) for epoch in history], key
    assert [step for step, _ in logged] == list(range(1, EPOCHS + 1))
    if not MODELS.get(model).variational:
        assert "val/elbo" not in trial.run.data.metrics


@pytest.mark.parametrize("model", MODELS.names())
def test_the_test_metrics_are_logged_once_after_training(study, model):
    trial = study.trials[model]
    metrics = trial.run.data.metrics
    expected = {k: v for k, v in trial.outcome.metrics.items() if np.isfinite(v)}
    assert {k: v for k, v in metrics.items() if k.startswith("test/")} == expected
    assert {"test/mse", "test/bce"} <= set(expected)
    if MODELS.get(model).variational:
        assert NOT_FOR_AN_AE <= set(expected)
        assert metrics["test/nll_k"] == 5 and metrics["test/nll_n"] == 50
    else:
        assert not NOT_FOR_AN_AE & set(metrics)
    assert metrics["best_epoch"] == trial.outcome.result.best_epoch
    assert trial.run.data.tags["vaebench.best_epoch"] == str(trial.outcome.result.best_epoch)
    for key in expected:  # once, at the last epoch's step
        assert [m.step for m in study.client.get_metric_history(trial.run.info.run_id, key)] == [EPOCHS]


def test_a_run_says_what_it_minimised_on_which_data_with_which_code(study):
    tags = study.trials["vae"].run.data.tags
    assert tags["vaebench.training_objective"] == (
        "-log p(x|z) under likelihood 'bce' (nats, summed over pixels) + 1 * KL(q(z|x) || N(0, I))")
    assert study.trials["ae"].run.data.tags["vaebench.training_objective"] == (
        "-log p(x|z) under likelihood 'bce' (nats, summed over pixels)")
    assert tags["vaebench.dataset"] == "digits" and tags["vaebench.binarize"] == "none"
    assert tags["vaebench.data_source"].endswith("digits.csv.gz")
    root = Path(bench.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if commit:  # a source tree outside git has no commit to record
        assert tags["mlflow.source.git.commit"] == tags["vaebench.git_commit"] == commit
        assert tags["vaebench.git_dirty"] in ("true", "false")
    assert tags["vaebench.torch"] == torch.__version__
    assert tags["vaebench.mlflow"] == mlflow.__version__
    assert tags["vaebench.optuna"] == optuna.__version__
    assert tags["vaebench.device"].startswith("cpu")
    assert tags["vaebench.selection"] == "val/elbo"
    assert study.trials["ae"].run.data.tags["vaebench.selection"] == "val/recon"


def test_artifacts_live_beside_the_store_not_in_the_working_directory(study):
    beside_the_store = (study.root / "store" / "artifacts" / STUDY).as_uri()
    for trial in study.trials.values():
        assert trial.run.info.artifact_uri.startswith(beside_the_store + "/")
    assert not (study.root / "cwd" / "mlruns").exists()
    assert list((study.root / "cwd").iterdir()) == []
    run_id = study.trials["vae"].run.info.run_id
    model_dir = study.root / "store" / "artifacts" / STUDY / run_id / "artifacts" / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "data.json", "state_dict.pt"]


@pytest.mark.parametrize("model", MODELS.names())
def test_images_are_logged_at_the_slider_steps_and_open_as_png(study, model, digits, tmp_path):
    trial = study.trials[model]
    run_id = trial.run.info.run_id
    keys = IMAGE_KEYS | ({"class_grid"} if MODELS.get(model).conditional else set())
    final = EPOCHS + 1  # the best model's pictures, after the last epoch
    steps = sorted(image_steps(EPOCHS) | {0, final})  # 0: before training, where the UI opens
    assert steps == [0, 1, 2, 3]
    files = [IMAGE_FILE.fullmatch(a.path) for a in study.client.list_artifacts(run_id, "images")]
    assert all(files), "every file under images/ is named by MLflow's log_image(key=, step=)"
    pngs = {(f["key"], int(f["step"])): f.string for f in files if f["ext"] == "png"}
    webps = {(f["key"], int(f["step"])) for f in files if f["compressed"]}
    assert sorted(pngs) == sorted((key, step) for key in keys for step in steps)
    assert webps == set(pngs)  # MLflow's compressed copy for the UI
    local = Path(study.client.download_artifacts(run_id, "images", str(tmp_path)))
    best = pictures(trial.outcome.result.model, digits, seed=trial.cfg.seed)
    seed_everything(trial.cfg.seed)
    initial = pictures(create_model(trial.cfg, digits.image_shape, digits.num_classes), digits, seed=trial.cfg.seed)
    for (key, step), path in pngs.items():
        with Image.open(local / Path(path).name) as image:
            assert image.format == "PNG"
            pixels = np.asarray(image)
        if step == final:  # PNG is lossless: exactly the pictures of the returned (best) model
            np.testing.assert_array_equal(pixels, best[key], err_msg=key)
        if step == 0:  # the very model training starts from
            np.testing.assert_array_equal(pixels, initial[key], err_msg=key)


def test_the_dataset_is_logged_as_an_input_per_split(study, digits):
    inputs = study.trials["vae"].run.inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs if i.tags[0].key == "mlflow.data.context"}
    assert sorted(by_context) == ["test", "train", "validation"] and len(inputs) == 3
    assert by_context["train"].name == "digits-none-train"
    assert '"features_shape": [1259, 64]' in by_context["train"].profile
    assert '"features_shape": [269, 64]' in by_context["test"].profile
    digests = {context: d.digest for context, d in by_context.items()}
    assert all(digests.values()) and len(set(digests.values())) == 3
    other_run = study.trials["ae"].run.inputs.dataset_inputs  # same data, same digests
    assert {i.dataset.digest for i in other_run} == set(digests.values())


def test_different_data_gets_a_different_digest(mlflow_uri):
    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "digests")
    digests = {}
    for binarize in ("none", "static"):
        run_id = client.create_run(exp_id).info.run_id
        tracking.log_dataset(client, run_id, load_dataset("digits", binarize))
        inputs = client.get_run(run_id).inputs.dataset_inputs
        digests[binarize] = {i.tags[0].value: i.dataset.digest for i in inputs}
    for context in ("train", "validation", "test"):
        assert digests["none"][context] != digests["static"][context]


@pytest.mark.parametrize("model", MODELS.names())
def test_a_model_loaded_from_its_run_gives_the_logged_test_metrics(study, model, digits):
    trial = study.trials[model]
    loaded = bench.load_run(trial.run.info.run_id, study.uri)
    assert type(loaded) is type(trial.outcome.result.model) and not loaded.training
    again = evaluate(loaded, digits.test.x, digits.test.y, k=trial.cfg.eval_k, nll_n=trial.cfg.eval_n,
                     binary_data=digits.binary, data=digits, cache_dir=study.root / "results" / "cache",
                     quality_n=trial.cfg.quality_n)
    clock = {"test/quality_seconds"}  # wall-clock time, the one number that cannot repeat
    logged = {k: v for k, v in trial.run.data.metrics.items() if k.startswith("test/") and k not in clock}
    assert {k: v for k, v in again.prefixed("test").items() if np.isfinite(v) and k not in clock} == logged
    if MODELS.get(model).variational:
        assert {"test/fd", "test/precision", "test/recall", "test/class_entropy"} <= set(logged)
    if model == "vae":
        assert again.metrics["elbo"] == trial.run.data.metrics["test/elbo"]


def test_a_divergent_run_ends_failed_with_the_epoch_and_step(mlflow_uri, tmp_path, digits):
    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "divergent")
    results = tmp_path / "results"
    with pytest.raises(DivergedError) as caught:  # a Gaussian likelihood at lr 1e6 blows up at once
        run_tracked(config(loss="gaussian", lr=1e6), digits, client=client, exp_id=exp_id,
                    run_name="divergent", results=results)
    [run] = client.search_runs([exp_id])
    assert run.info.status == "FAILED"
    reason = run.data.tags[tracking.FAIL_REASON]
    assert reason == str(caught.value)
    assert f"at epoch {caught.value.epoch}, step {caught.value.step} of " in reason
    assert run.data.tags["vaebench.state"] == "DIVERGED"
    assert client.list_artifacts(run.info.run_id, "model") == []
    assert not any(k.startswith("test/") for k in run.data.metrics)
    assert not (results / "checkpoints" / run.info.run_id).exists()


def test_fail_orphaned_runs_fails_the_running_runs_of_trials_no_longer_running(mlflow_uri):
    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "orphans")
    cfg = config()

    def trial_run(number):
        return tracking.start_trial_run(client, exp_id, cfg, run_name=f"trial {number}",
                                        tags={tracking.STUDY: "orphans", tracking.TRIAL: number})

    crashed, live, finished = trial_run(0), trial_run(1), trial_run(2)
    tracking.end_run(client, finished, "FINISHED")
    assert tracking.fail_orphaned_runs(client, exp_id, "orphans", live_trials={1}) == 1
    assert client.get_run(crashed).info.status == "FAILED"
    assert client.get_run(crashed).data.tags[tracking.FAIL_REASON] == "the worker stopped before the trial ended"
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(finished).info.status == "FINISHED"
    assert tracking.fail_orphaned_runs(client, exp_id, "orphans", live_trials={1}) == 0


class Payload:
    """A pickled object that runs code when loaded: what weights_only=True must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, digits):
    from bench.errors import CheckpointError
    from bench.train import load_checkpoint

    marker = tmp_path / "pwned"
    torch.save({"weights": Payload(marker)}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        load_checkpoint(tmp_path / "best.pt", config(), digits.image_shape, digits.num_classes)
    assert not marker.exists()


def test_a_logged_model_that_would_run_code_is_refused(study, tmp_path):
    from bench.errors import CheckpointError

    marker = tmp_path / "pwned"
    run_id = study.trials["vae"].outcome.run_id
    bad = tmp_path / "model"
    bad.mkdir()
    for name in ("config.json", "data.json"):
        (bad / name).write_text(Path(study.client.download_artifacts(run_id, f"model/{name}", str(tmp_path)))
                                .read_text())
    torch.save(Payload(marker), bad / "state_dict.pt")
    evil = study.client.create_run(study.exp_id).info.run_id
    study.client.log_artifacts(evil, str(bad), artifact_path="model")
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        bench.load_run(evil, tracking_uri=study.uri)
    assert not marker.exists()


@pytest.mark.parametrize("binarize, proper", [("none", "false"), ("static", "true")])
def test_bce_is_a_proper_density_only_on_binary_data(mlflow_uri, tmp_path, binarize, proper):
    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "proper")
    data = load_dataset("digits", binarize)
    out = run_tracked(config(loss="bce", binarize=binarize, epochs=1, quality_n=0), data, client=client, exp_id=exp_id,
                      run_name="bce", results=tmp_path, log_images=False)
    assert client.get_run(out.run_id).data.tags["vaebench.proper_density"] == proper


def test_the_per_dimension_kl_is_an_artifact_that_sums_to_the_test_kl(study):
    run_id = study.trials["vae"].outcome.run_id
    path = study.client.download_artifacts(run_id, "metrics/kl_per_dim.json", str(study.root))
    per_dim = json.loads(Path(path).read_text())
    assert len(per_dim) == study.trials["vae"].cfg.latent
    assert sum(per_dim) == pytest.approx(study.trials["vae"].run.data.metrics["test/kl"], rel=1e-6)
