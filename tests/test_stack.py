"""Stacked training: N compatible trials as one model must train exactly as N solo runs, trial
by trial (dropout 0: the same noise and batch order, so the same numbers to float tolerance),
with each trial's own early stopping, divergence and resumable state."""

import math

import pytest
import torch

from bench.config import RunConfig
from bench.data import load_dataset
from bench.errors import ConfigError, DivergedError
from bench.stack import StackedAdam, fit_stack, stack_key, stack_models
from bench.train import fit, load_state

pytestmark = pytest.mark.usefixtures("one_thread")
TIMING = ("seconds", "samples_per_s", "stack_size")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def binary_digits():
    return load_dataset("digits", binarize="dynamic")


def config(**changes) -> RunConfig:
    return RunConfig(**{"dataset": "digits", "epochs": 3, "latent": 4, "dropout": 0.0, "device": "cpu", **changes})


def numbers(history):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def assert_same_history(stacked, solo):
    assert len(stacked) == len(solo)
    for a, b in zip(numbers(stacked), numbers(solo)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key


TRIALS = {  # trials that may share a stack: seeds, lr, beta, warm-up and weight decay differ
    "vae": [config(seed=0), config(seed=1, lr=3e-3, beta=0.5), config(seed=2, warmup_epochs=2, weight_decay=1e-3)],
    "iwae": [config(model="iwae", k=3, seed=0), config(model="iwae", k=3, seed=4, lr=2e-3)],
    "cvae": [config(model="cvae", loss="mse", seed=0), config(model="cvae", loss="mse", seed=1, beta=2.0)],
    "ae": [config(model="ae", arch="kw", seed=0), config(model="ae", arch="kw", seed=3, lr=1e-4)],
    "adamnormgrad": [config(arch="gated", optimizer="adamnormgrad", lr=5e-4, seed=s) for s in (0, 1)],
}


@pytest.mark.parametrize("kind", TRIALS)
def test_each_trial_of_a_stack_trains_exactly_as_its_solo_run(kind, digits):
    cfgs = TRIALS[kind]
    stacked = fit_stack(cfgs, digits)
    for cfg, result in zip(cfgs, stacked):
        solo = fit(cfg, digits, progress=False)
        assert_same_history(result.history, solo.history)
        assert result.best_epoch == solo.best_epoch
        for name, tensor in solo.model.state_dict().items():
            torch.testing.assert_close(result.model.state_dict()[name], tensor, rtol=1e-3, atol=1e-4)


def test_dynamic_binarization_draws_each_trials_own_pixels(binary_digits):
    cfgs = [config(seed=0), config(seed=1)]
    for cfg, result in zip(cfgs, fit_stack(cfgs, binary_digits)):
        assert_same_history(result.history, fit(cfg, binary_digits, progress=False).history)


def test_the_stacked_optimizer_equals_torch_adam_on_each_trials_slice():
    torch.manual_seed(0)
    lrs, decays = [1e-3, 3e-2, 5e-4], [0.0, 1e-2, 0.1]
    stacked = torch.nn.Parameter(torch.randn(3, 5, 7))
    solos = [torch.nn.Parameter(stacked.detach()[i].clone()) for i in range(3)]
    ours = StackedAdam([stacked], lrs, decays)
    theirs = [torch.optim.Adam([p], lr=lr, weight_decay=wd) for p, lr, wd in zip(solos, lrs, decays)]
    for _ in range(20):
        grad = torch.randn(3, 5, 7)
        stacked.grad = grad.clone()
        ours.step()
        for i, (p, opt) in enumerate(zip(solos, theirs)):
            p.grad = grad[i].clone()
            opt.step()
    for i in range(3):
        torch.testing.assert_close(stacked.detach()[i], solos[i].detach(), rtol=1e-6, atol=1e-7)


def test_adamnormgrad_normalises_each_trials_gradient_by_its_own_norm():
    stacked = torch.nn.Parameter(torch.zeros(2, 3))
    opt = StackedAdam([stacked], [1.0, 1.0], [0.0, 0.0], normgrad=True)
    stacked.grad = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 100.0]])
    opt.step()
    # Adam's first step moves each coordinate by lr * sign(g): what normalising leaves of g is
    # checked through the second moment, g / ||g|| per trial
    torch.testing.assert_close(opt.exp_avg_sq[0], 0.001 * torch.tensor([[0.36, 0.64, 0.0], [0.0, 0.0, 1.0]]),
                               rtol=1e-5, atol=1e-9)


def test_a_trial_that_stops_early_leaves_the_stack_and_the_others_go_on(digits):
    cfgs = [config(seed=0, epochs=12, patience=1, lr=5e-2), config(seed=1, epochs=12)]
    early, full = fit_stack(cfgs, digits)
    assert early.stopped_early and len(early.history) < 12
    assert len(full.history) == 12 and not full.stopped_early
    assert_same_history(early.history, fit(cfgs[0], digits, progress=False).history)
    assert_same_history(full.history, fit(cfgs[1], digits, progress=False).history)
    assert [row["stack_size"] for row in full.history][-1] == 1  # the stopped trial costs nothing


def test_a_diverging_trial_fails_alone(digits):
    cfgs = [config(seed=0, loss="laplace", lr=1e6, epochs=3), config(seed=1, loss="laplace")]
    diverged, fine = fit_stack(cfgs, digits)
    assert isinstance(diverged, DivergedError)
    assert_same_history(fine.history, fit(cfgs[1], digits, progress=False).history)


def test_a_callback_that_raises_ends_its_trial_only(digits):
    class Pruned(Exception):
        pass

    def prune(epoch, metrics, model):
        if epoch == 2:
            raise Pruned("pruned at epoch 2")

    seen = []
    cfgs = [config(seed=0), config(seed=1)]
    pruned, kept = fit_stack(cfgs, digits, on_epoch=[prune, lambda e, m, model: seen.append(e)])
    assert isinstance(pruned, Pruned) and seen == [1, 2, 3]
    assert_same_history(kept.history, fit(cfgs[1], digits, progress=False).history)


def test_a_stacked_trial_resumes_from_its_state_solo_or_stacked_with_the_same_numbers(digits, tmp_path):
    cfgs = [config(seed=0, epochs=4), config(seed=1, epochs=4)]
    reference = [fit(c, digits, progress=False) for c in cfgs]
    dirs = [tmp_path / "a", tmp_path / "b"]

    class Killed(Exception):
        pass

    def kill_at(epoch):
        def callback(e, metrics, model):
            if e == epoch:
                raise Killed
        return callback

    # stacked, saved every epoch, killed after epoch 2 (the state of epoch 2 is on disk... from
    # the epoch-1 save, since the callback raises before the save of epoch 2)
    fit_stack(cfgs, digits, checkpoint_dirs=dirs, on_epoch=[kill_at(2), kill_at(2)], state_every_s=0)
    assert all(load_state(d / "state.pt", c)["epoch"] == 1 for d, c in zip(dirs, cfgs))
    solo = fit(cfgs[0], digits, checkpoint_dir=dirs[0], progress=False, state_every_s=0)  # resumes solo
    stacked = fit_stack(cfgs[1:], digits, checkpoint_dirs=dirs[1:], state_every_s=0)[0]  # resumes stacked
    assert solo.resumed_from == 1 and stacked.resumed_from == 1
    assert_same_history(solo.history, reference[0].history)
    assert_same_history(stacked.history, reference[1].history)


def test_a_solo_state_resumes_in_a_stack(digits, tmp_path):
    cfg = config(seed=5, epochs=4)
    reference = fit(cfg, digits, progress=False)

    def stop(e, metrics, model):
        if e == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, digits, checkpoint_dir=tmp_path, on_epoch=stop, progress=False, state_every_s=0)
    resumed = fit_stack([cfg, config(seed=6, epochs=4)], digits, checkpoint_dirs=[tmp_path, None])[0]
    assert resumed.resumed_from == 2
    assert_same_history(resumed.history, reference.history)


def test_incompatible_trials_are_refused_with_what_differs(digits):
    with pytest.raises(ConfigError, match="latent"):
        fit_stack([config(latent=2), config(latent=4)], digits)
    assert stack_key(config(arch="conv")) is None and stack_key(config(loss="gaussian")) is None
    assert stack_key(config(seed=1, lr=1.0, beta=3.0)) == stack_key(config(seed=2))


def test_a_stacked_model_computes_each_trials_own_function(digits):
    from bench.models import create_model

    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(create_model(config(), digits.image_shape, digits.num_classes).eval())
    stacked = stack_models(models).eval()
    x = digits.val.x[:10]
    mu = stacked.encode(x.repeat(3, 1, 1, 1))[0].detach().view(3, 10, -1)
    for i, model in enumerate(models):
        torch.testing.assert_close(mu[i], model.encode(x)[0], rtol=1e-5, atol=1e-6)
    assert not math.isnan(float(mu.sum()))
