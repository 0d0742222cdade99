"""Training one trial on real data (scikit-learn's 8x8 digits, 1,259 training images, so an
epoch takes well under a second on a CPU)."""

import json
import math
import re

import pytest
import torch

import bench.data
import bench.train
from bench.config import RunConfig
from bench.data import load_dataset
from bench.errors import ConfigError, DivergedError
from bench.models.vae import VAE
from bench.registry import MODELS
from bench.train import fit, kl_weight, load_checkpoint

TIMING = ("seconds", "samples_per_s")
STEPS = math.ceil(1259 / 64)  # training steps per epoch on digits at batch size 64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def config(**changes) -> RunConfig:
    return RunConfig(**{"dataset": "digits", "epochs": 2, "latent": 4, "device": "cpu", **changes})


def train(cfg, data, **kwargs):
    return fit(cfg, data, progress=False, **kwargs)


def without_timing(history):
    return [{k: v for k, v in epoch.items() if k not in TIMING} for epoch in history]


@pytest.mark.parametrize("name", MODELS.names())
def test_history_has_the_metrics_of_every_epoch(digits, name):
    result = train(config(model=name, k=2), digits)
    assert [epoch["epoch"] for epoch in result.history] == [1, 2]
    variational = MODELS.get(name).variational
    for epoch in result.history:
        expected = {"train/loss", "val/recon", "val/mse", "val/bce", *TIMING}
        expected |= {"val/elbo", "val/kl"} if variational else set()
        assert expected <= set(epoch)
        assert all(math.isfinite(epoch[k]) for k in expected)
        assert epoch["seconds"] > 0 and epoch["samples_per_s"] > 0
        if variational:  # minus recon minus KL in expectation; the sampled ELBO adds the
            # Monte Carlo error of its KL part, about 0.06 nats here (269 images, latent 2)
            assert epoch["val/elbo"] == pytest.approx(-(epoch["val/recon"] + epoch["val/kl"]), abs=0.5)
        else:
            assert "val/elbo" not in epoch and "val/kl" not in epoch  # absent, never 0
    assert result.selection == ("val/elbo" if variational else "val/recon")
    assert result.best_epoch in (1, 2) and not result.stopped_early
    assert result.device == "cpu" and not result.model.training


def test_same_seed_same_numbers_other_seed_other_numbers(digits):
    first, again = train(config(seed=3), digits), train(config(seed=3), digits)
    assert without_timing(first.history) == without_timing(again.history)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    other = train(config(seed=4), digits)
    assert other.history[0]["train/loss"] != first.history[0]["train/loss"]
    assert other.history[-1]["val/elbo"] != first.history[-1]["val/elbo"]


@pytest.mark.parametrize("field,value,words", [
    ("seed", 2**32, "seed must be below 2**32"),  # numpy's and Optuna's samplers crashed on it
    ("lr", math.inf, "lr must be a finite number > 0"),
    ("beta", math.nan, "beta must be a finite number >= 0"),  # nan trained, then "lower lr"
    ("weight_decay", math.inf, "weight_decay must be a finite number >= 0"),
])
def test_a_config_refuses_values_training_cannot_use(field, value, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        RunConfig(**{field: value})


def test_a_huge_learning_rate_diverges_with_a_clear_error(digits):
    with pytest.raises(DivergedError) as caught:
        train(config(loss="gaussian", lr=1e6), digits)
    assert caught.value.epoch == 1 and caught.value.step >= 1
    message = str(caught.value)
    assert f"epoch 1, step {caught.value.step} of {STEPS}" in message and "lower lr" in message


def test_a_nan_loss_names_the_epoch_and_step(digits, monkeypatch):
    calls = []

    def nan_on_the_23rd_step(self, x, y=None, kl_weight=1.0, generator=None):
        calls.append(1)
        terms = VAE_TERMS(self, x, y, kl_weight, generator)
        if len(calls) == STEPS + 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    VAE_TERMS = VAE.terms
    monkeypatch.setattr(VAE, "terms", nan_on_the_23rd_step)
    with pytest.raises(DivergedError, match=f"loss is nan at epoch 2, step 3 of {STEPS}") as caught:
        train(config(epochs=3), digits)
    assert (caught.value.epoch, caught.value.step) == (2, 3)


def scripted_validation(monkeypatch, values):
    """Make validation report `values` as val/elbo, one per epoch (other metrics real)."""
    real, scores = bench.train.validate, iter(values)

    def validate(*args, **kwargs):
        return {**real(*args, **kwargs), "val/elbo": next(scores)}

    monkeypatch.setattr(bench.train, "validate", validate)


def test_early_stopping_after_patience_epochs_without_improvement(digits, monkeypatch):
    scripted_validation(monkeypatch, [-50.0, -40.0, -41.0, -40.0, -30.0, -20.0])
    states = {}
    result = train(config(epochs=6, patience=2), digits,
                   on_epoch=lambda epoch, metrics, model: states.update(
                       {epoch: {k: v.clone() for k, v in model.state_dict().items()}}))
    assert [e["epoch"] for e in result.history] == [1, 2, 3, 4]  # epochs 3, 4 did not beat -40
    assert result.stopped_early and result.best_epoch == 2
    for name, tensor in result.model.state_dict().items():  # the model holds the best weights
        assert torch.equal(tensor, states[2][name]), name


def test_without_patience_every_epoch_runs(digits, monkeypatch):
    scripted_validation(monkeypatch, [-50.0, -60.0, -70.0])
    result = train(config(epochs=3, patience=0), digits)
    assert len(result.history) == 3 and not result.stopped_early and result.best_epoch == 1


@pytest.mark.parametrize("name", MODELS.names())
def test_checkpoints_load_safely_and_rebuild_the_model(digits, name, tmp_path):
    cfg = config(model=name, k=2)
    states = {}
    result = train(cfg, digits, checkpoint_dir=tmp_path,
                   on_epoch=lambda epoch, metrics, model: states.update(
                       {epoch: {k: v.clone() for k, v in model.state_dict().items()}}))
    assert result.checkpoints == {"best": str(tmp_path / "best.pt"), "last": str(tmp_path / "last.pt")}
    assert RunConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    for key, tensor in result.model.state_dict().items():
        assert torch.equal(best[key], tensor), key
    for key, tensor in states[2].items():
        assert torch.equal(last[key], tensor), key

    rebuilt = load_checkpoint(tmp_path / "best.pt", cfg, digits.image_shape, digits.num_classes)
    assert not rebuilt.training
    x, y = digits.val.x[:8], digits.val.y[:8] if rebuilt.conditional else None
    with torch.no_grad():
        assert torch.equal(rebuilt.encode(x, y)[0], result.model.encode(x, y)[0])
        g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        assert torch.equal(rebuilt.sample(4, y=y[:4] if y is not None else None, generator=g1),
                           result.model.sample(4, y=y[:4] if y is not None else None, generator=g2))


def test_dynamic_binarization_draws_new_pixels_every_epoch(monkeypatch):
    data = load_dataset("digits", binarize="dynamic")
    assert ((data.val.x == 0) | (data.val.x == 1)).all()  # evaluation data is binarized once
    draws = []
    real = bench.data.binarize_batch

    def recording(x, generator=None):
        out = real(x, generator)
        draws.append((x.clone(), out.clone()))
        return out

    monkeypatch.setattr(bench.data, "binarize_batch", recording)
    train(config(), data)
    assert len(draws) == 2 * STEPS
    by_image = [{}, {}]  # per epoch: grey image -> its binary draw
    for i, (grey, binary) in enumerate(draws):
        assert ((binary == 0) | (binary == 1)).all()
        for g, b in zip(grey, binary):
            by_image[i // STEPS][g.numpy().tobytes()] = b
    assert not ((draws[0][0] == 0) | (draws[0][0] == 1)).all()  # the trainer binarizes grey data
    shared = by_image[0].keys() & by_image[1].keys()
    assert len(shared) > 1000
    changed = sum(not torch.equal(by_image[0][k], by_image[1][k]) for k in shared)
    assert changed > 0.9 * len(shared)


def test_kl_weight_warms_up_linearly():
    cfg = config(warmup_epochs=4, beta=2.0)
    assert kl_weight(cfg, 1, 0.0) == 0.0
    assert kl_weight(cfg, 1, 0.5) == pytest.approx(0.25)
    assert kl_weight(cfg, 3, 0.0) == pytest.approx(1.0)
    assert kl_weight(cfg, 4, 1.0) == pytest.approx(2.0)
    assert kl_weight(cfg, 9, 0.3) == 2.0
    assert kl_weight(config(beta=0.5), 1, 0.0) == 0.5  # no warm-up: beta from the first step


def kl_weights_seen(monkeypatch) -> list[float]:
    """The KL weight of every training step, as the VAE's bound receives it (filled as it trains)."""
    weights, terms = [], VAE.terms

    def recording(self, x, y=None, kl_weight=1.0, generator=None):
        weights.append(kl_weight)
        return terms(self, x, y, kl_weight, generator)

    monkeypatch.setattr(VAE, "terms", recording)
    return weights


def test_training_uses_the_warm_up_at_every_step(digits, monkeypatch):
    weights = kl_weights_seen(monkeypatch)
    result = train(config(epochs=3, warmup_epochs=2), digits)
    expected = [min(1.0, (epoch + step / STEPS) / 2) for epoch in range(3) for step in range(STEPS)]
    assert weights == pytest.approx(expected)
    assert [e["kl_weight"] for e in result.history] == [0.5, 1.0, 1.0]


class Interrupted(Exception):
    """Stands in for a kill: raised from the epoch callback, before that epoch's state is saved."""


def test_a_trial_resumed_from_its_saved_state_ends_with_the_numbers_of_an_uninterrupted_one(tmp_path):
    data = load_dataset("digits", "dynamic")  # fresh binarisation and dropout noise every batch
    cfg = config(epochs=6, dropout=0.2, warmup_epochs=3, patience=4)
    whole = train(cfg, data, checkpoint_dir=tmp_path / "whole", state_every_s=0)

    def stop_at_epoch_4(epoch, metrics, model):
        if epoch == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(cfg, data, checkpoint_dir=tmp_path / "cut", state_every_s=0, on_epoch=stop_at_epoch_4)
    saved = []
    resumed = train(cfg, data, checkpoint_dir=tmp_path / "cut", state_every_s=0, on_saved=saved.append)

    assert resumed.resumed_from == 3 and saved == [4, 5, 6]  # epochs 1-3 were not trained again
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert resumed.best_epoch == whole.best_epoch
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_a_saved_state_of_another_config_is_never_resumed(tmp_path):
    data = load_dataset("digits")
    train(config(epochs=2), data, checkpoint_dir=tmp_path, state_every_s=0)
    other = train(config(epochs=2, lr=2e-3), data, checkpoint_dir=tmp_path, state_every_s=0)
    assert other.resumed_from == 0 and [e["epoch"] for e in other.history] == [1, 2]


def test_epoch_callbacks_cannot_change_the_training_numbers(digits):
    plain = train(config(epochs=2, dropout=0.3), digits)
    noisy = train(config(epochs=2, dropout=0.3), digits, on_epoch=lambda *_: torch.rand(1000))
    assert without_timing(noisy.history) == without_timing(plain.history)


def test_the_epoch_warm_up_schedule_is_beta_times_epoch_over_warmup_for_the_whole_epoch():
    cfg = config(warmup_epochs=100, warmup_schedule="epoch")
    assert kl_weight(cfg, 1, 0.0) == kl_weight(cfg, 1, 0.99) == pytest.approx(0.01)
    assert kl_weight(cfg, 50, 0.5) == pytest.approx(0.5)
    assert kl_weight(cfg, 100, 0.0) == kl_weight(cfg, 150, 0.0) == 1.0


def test_early_stopping_does_not_count_epochs_of_the_warm_up(digits, monkeypatch):
    # validation never improves after epoch 1; with patience 2 training would stop at epoch 3,
    # but the counter is held at 0 until the warm-up's last epoch (4), so it stops at epoch 5
    values = iter([-100.0, -200.0, -200.0, -200.0, -200.0, -200.0, -200.0, -200.0])
    real = bench.train.validate
    monkeypatch.setattr(bench.train, "validate", lambda *a: {**real(*a), "val/elbo": next(values)})
    result = train(config(epochs=8, patience=2, warmup_epochs=4), digits)
    assert result.stopped_early and [e["epoch"] for e in result.history][-1] == 5 and result.best_epoch == 1


def test_adamnormgrad_scales_each_gradient_to_unit_norm_before_adam():
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.tensor([3.0, 0.0, 4.0])
    bench.train.normalise_gradients([w])
    assert w.grad.tolist() == pytest.approx([0.6, 0.0, 0.8], abs=1e-6)


def test_training_passes_beta_to_the_bound(digits, monkeypatch):
    weights = kl_weights_seen(monkeypatch)
    result = train(config(epochs=1, beta=0.5), digits)
    assert weights and set(weights) == {0.5}
    assert result.history[0]["kl_weight"] == 0.5


def test_auto_device_picks_cuda_when_there_is_one(monkeypatch):
    assert bench.train.resolve_device("auto").type in ("cpu", "cuda", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.train.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert bench.train.resolve_device("auto") == torch.device("cpu")
