"""A reproduction's record, written from runs in a real MLflow store with known numbers: the
table, results.json (mean ± sd over seeds with its standard error, each seed's provenance) and
the validation curves; written again from the same store, it is the same."""

import json
import math

import pytest

from bench import tracking
from bench.config import RunConfig
from bench.publish import publish

FULL = dict(model="vae", arch="gated", loss="bce", latent=40, dataset="fashion-mnist", binarize="dynamic",
            epochs=2000, lr=5e-4, batch_size=100, warmup_epochs=100, warmup_schedule="epoch",
            optimizer="adamnormgrad", patience=51, eval_k=5000, eval_n=0)
NLL = {0: 228.5, 1: 229.0, 2: 229.1}


@pytest.fixture
def store(mlflow_uri):
    client = tracking.connect(mlflow_uri)
    exp_id = tracking.experiment_id(client, "exemplar2020-full")
    for seed, nll in NLL.items():
        run_id = tracking.start_trial_run(client, exp_id, RunConfig(**FULL, seed=seed), run_name=str(seed),
                                          tags={tracking.STUDY: "exemplar2020-full", tracking.TRIAL: seed,
                                                tracking.CELL: f"seed={seed}", "vaebench.device": "cpu (test)"})
        for epoch in range(1, 4):
            tracking.log_metrics(client, run_id, {"val/elbo": -240.0 + epoch + seed, "train/loss": 240.0}, step=epoch)
        tracking.log_metrics(client, run_id, {"test/nll": nll, "test/elbo": -nll - 4, "test/active_units": 17,
                                              "best_epoch": 3, "trial_seconds": 3600.0 + seed}, step=3)
        tracking.set_tags(client, run_id, {"vaebench.proper_density": "true"})
        tracking.end_run(client, run_id)
    return mlflow_uri


def test_the_record_holds_each_seed_and_the_mean_sd_and_standard_error(store, tmp_path):
    out = tmp_path / "docs" / "reproductions" / "exemplar2020"
    record = publish("exemplar2020", out, results=tmp_path, tracking_uri=store)
    assert {p.name for p in out.iterdir()} == {"table.md", "table.tex", "results.json", "validation_curves.png"}
    values = list(NLL.values())
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert record["ours"] == pytest.approx({"metric": "test/nll", "n": 3, "mean": mean, "sd": sd,
                                            "se": sd / math.sqrt(3)})
    assert record["gap_nats"] == pytest.approx(mean - 228.70) and record["within_goal"] is True  # 0.17 nats off
    assert [s["seed"] for s in record["seeds"]] == [0, 1, 2]
    first = record["seeds"][0]
    assert (first["test/nll"], first["epochs_trained"], first["best_epoch"], first["wall_seconds"]) == \
        (228.5, 3, 3, 3600.0)
    assert first["mlflow_run_id"] and first["machine"] == "cpu (test)"
    assert "228.70 ± 0.15" in (out / "table.md").read_text()
    assert json.loads((out / "results.json").read_text()) == record


def test_publishing_again_from_the_same_store_gives_the_same_record(store, tmp_path):
    first = publish("exemplar2020", tmp_path / "a", results=tmp_path, tracking_uri=store)
    again = publish("exemplar2020", tmp_path / "b", results=tmp_path, tracking_uri=store)
    assert first == again
    assert (tmp_path / "a" / "table.md").read_text() == (tmp_path / "b" / "table.md").read_text()
