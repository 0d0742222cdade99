"""Reconstruction likelihoods: each is a normalised density on its support, in nats, and the
named ones equal their formulas computed by hand in numpy (float64)."""

import math

import numpy as np
import pytest
import torch

from bench.losses import LOSSES, _log_cb_normaliser, create_loss, proper_on
from bench.models import create_model
from bench.config import RunConfig

LOGITS = [-30.0, -4.0, -0.5, 0.0, 1e-4, 0.7, 3.0, 30.0]

pytestmark = pytest.mark.usefixtures("one_thread")


def one_pixel(values) -> torch.Tensor:
    """Values as a batch of 1-pixel images (N, 1, 1, 1), float64."""
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1, 1, 1, 1)


@torch.no_grad()
def total_probability(loss, logit: float) -> float:
    """Sum (binary) or integral (unit, real) of exp(-nll) over one pixel's support."""
    if loss.support == "binary":
        x = one_pixel([0.0, 1.0])
        return float(torch.exp(-loss(one_pixel([logit] * 2), x)).sum())
    lo, hi, n = (0.0, 1.0, 100_001) if loss.support == "unit" else (-60.0, 61.0, 121_001)
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    density = torch.exp(-loss(one_pixel([logit] * n), one_pixel(x)))
    return float(torch.trapezoid(density, x))


@pytest.mark.parametrize("logit", LOGITS)
@pytest.mark.parametrize("name", LOSSES.names())
def test_density_normalises_over_its_support(name, logit):
    loss = create_loss(name).double()
    assert loss.support in ("binary", "unit", "real")
    # seed-bce's 1e-8 guards add 2e-8 of mass: the seed's loss is a near-density, not exactly one
    assert total_probability(loss, logit) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", LOSSES.names())
def test_proper_on_condenses_the_support(name):
    expected = "binary" if create_loss(name).support == "binary" else "continuous"
    assert proper_on(name) == expected


@pytest.mark.parametrize("name", LOSSES.names())
def test_losses_return_one_value_per_image(name):
    loss = create_loss(name)
    logits, x = torch.randn(3, 2, 4, 5), torch.rand(3, 2, 4, 5)
    out = loss(logits, x)
    assert out.shape == (3,)
    assert torch.isfinite(out).all()
    # per image: summed over pixels, independent of the rest of the batch
    assert torch.allclose(loss(logits[1:2], x[1:2]), out[1:2])


def numpy_bernoulli_nll(logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exact -x log p - (1-x) log(1-p), p = sigmoid(logits), in float64, summed per image."""
    log_p, log_1mp = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)
    return -(x * log_p + (1 - x) * log_1mp).reshape(len(x), -1).sum(1)


def test_seed_bce_is_the_seed_expression():
    rng = np.random.default_rng(0)
    logits, x = rng.normal(0, 3, (4, 1, 3, 3)), rng.random((4, 1, 3, 3))
    p = 1 / (1 + np.exp(-logits))
    expected = -(x * np.log(1e-8 + p) + (1 - x) * np.log(1e-8 + 1 - p)).reshape(4, -1).sum(1)
    loss = create_loss("seed-bce")
    np.testing.assert_allclose(loss(torch.tensor(logits), torch.tensor(x)).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(loss(torch.tensor(logits).float(), torch.tensor(x).float()).numpy(),
                               expected, rtol=1e-5)


def test_seed_bce_saturates_where_bce_stays_exact():
    """At logit 30 a pixel of 0 costs 30 nats; the seed's 1e-8 caps it at -log(1e-8) = 18.4."""
    logits, x = one_pixel([30.0]).float(), one_pixel([0.0]).float()
    assert create_loss("seed-bce")(logits, x).item() == pytest.approx(-math.log(1e-8), rel=1e-5)
    assert create_loss("bce")(logits, x).item() == pytest.approx(30.0, rel=1e-6)


def test_bce_is_the_exact_bernoulli_nll():
    rng = np.random.default_rng(1)
    logits, x = rng.normal(0, 5, (5, 1, 4, 4)), rng.random((5, 1, 4, 4))
    out = create_loss("bce")(torch.tensor(logits), torch.tensor(x))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), numpy_bernoulli_nll(logits, x), rtol=1e-12)


@pytest.mark.parametrize("logit", [-100.0, -30.0, 30.0, 100.0])
@pytest.mark.parametrize("pixel", [0.0, 0.3, 1.0])
def test_bce_is_finite_and_exact_at_extreme_logits_in_float32(logit, pixel):
    logits, x = one_pixel([logit]).float(), one_pixel([pixel]).float()
    expected = numpy_bernoulli_nll(np.array([logit]), np.array([pixel]))[0]
    out = create_loss("bce")(logits, x)
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_the_float32_probability_pitfall_that_bce_avoids():
    """sigmoid(100) rounds to 1 in float32, so log(1 - p) from probabilities is -inf for a
    black pixel; from logits the cost is exactly 100 nats."""
    logits, x = one_pixel([100.0]).float(), one_pixel([0.0]).float()
    p = torch.sigmoid(logits)
    assert p.item() == 1.0 and torch.log(1 - p).item() == -math.inf
    assert create_loss("bce")(logits, x).item() == 100.0


def test_mse_is_sum_of_squared_errors_plus_the_gaussian_constant():
    """sigma^2 = 1/2: -log N(x; mu, 1/2) = (x - mu)^2 + 0.5 log(pi) per pixel."""
    rng = np.random.default_rng(2)
    logits, x = rng.normal(size=(3, 1, 5, 5)), rng.random((3, 1, 5, 5))
    mean = 1 / (1 + np.exp(-logits))
    expected = ((x - mean) ** 2).reshape(3, -1).sum(1) + 25 * 0.5 * math.log(math.pi)
    out = create_loss("mse")(torch.tensor(logits), torch.tensor(x))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


def test_continuous_bernoulli_normaliser_is_continuous_at_the_taylor_switch():
    """log C(eta) = log(eta / tanh(eta / 2)): Taylor below |eta| = 1e-3, exact above."""
    eta = np.concatenate([np.linspace(-3e-3, 3e-3, 601), [1e-3 * (1 - 1e-9), 1e-3 * (1 + 1e-9)],
                          [-1e-3 * (1 - 1e-9), -1e-3 * (1 + 1e-9)], [0.5, -2.0, 40.0]])
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = np.where(eta == 0, math.log(2), np.log(eta / np.tanh(eta / 2)))
    got = _log_cb_normaliser(torch.tensor(eta)).numpy()
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-12)
    got32 = _log_cb_normaliser(torch.tensor(eta, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got32, reference, rtol=0, atol=1e-6)
    below, above = _log_cb_normaliser(torch.tensor([1e-3 - 1e-12, 1e-3 + 1e-12], dtype=torch.float64))
    assert abs(float(above - below)) < 1e-12


def test_continuous_bernoulli_gradient_is_finite_at_logit_zero():
    logits = torch.zeros(2, 1, 2, 2, requires_grad=True)
    create_loss("cbernoulli")(logits, torch.rand(2, 1, 2, 2)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_gaussian_sigma_is_a_learned_parameter():
    loss = create_loss("gaussian")
    (log_sigma,) = list(loss.parameters())
    logits, x = torch.randn(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    loss(logits, x).sum().backward()
    assert log_sigma.grad is not None and log_sigma.grad.abs().item() > 0
    # the gradient vanishes at the maximum-likelihood sigma^2 = mean squared error
    mse = ((x - torch.sigmoid(logits)) ** 2).mean().item()
    loss.log_sigma.data.fill_(0.5 * math.log(mse))
    loss.log_sigma.grad = None
    loss(logits, x).sum().backward()
    assert abs(loss.log_sigma.grad.item()) < 1e-4


def test_gaussian_sigma_is_trained_and_saved_with_the_model():
    model = create_model(RunConfig(loss="gaussian", latent=2), (1, 8, 8), num_classes=10)
    assert "likelihood.log_sigma" in model.state_dict()
    assert any(p is model.likelihood.log_sigma for p in model.parameters())


# Found by mutation testing (make mutate): at the default sigma^2 = 1/2 and scale 1, dividing
# and multiplying by 2 sigma^2 or the scale give the same numbers; other values tell them apart.
@pytest.mark.parametrize("loss", [
    pytest.param(lambda: LOSSES.get("mse")(sigma=0.3), id="gaussian sigma 0.3"),
    pytest.param(lambda: LOSSES.get("mse")(sigma=2.0), id="gaussian sigma 2"),
    pytest.param(lambda: LOSSES.get("laplace")(scale=0.5), id="laplace scale 0.5"),
    pytest.param(lambda: LOSSES.get("laplace")(scale=3.0), id="laplace scale 3"),
])
@pytest.mark.parametrize("logit", [-2.0, 0.0, 1.5])
def test_non_default_widths_still_normalise(loss, logit):
    assert total_probability(loss().double(), logit) == pytest.approx(1.0, abs=1e-6)


def test_laplace_is_the_sum_of_absolute_errors_over_the_scale_plus_its_constant():
    x, logits = one_pixel([0.9, 0.1]), one_pixel([0.0, 0.0])  # mean 0.5 for both
    nll = LOSSES.get("laplace")(scale=2.0)(logits, x)
    assert nll.tolist() == pytest.approx([0.4 / 2 + math.log(4.0)] * 2)
    assert LOSSES.get("laplace")().scale == 1.0  # the default: the plain sum of absolute errors


def test_an_identity_gaussian_uses_the_decoder_output_as_its_mean():
    identity, squashed = LOSSES.get("mse")(identity=True), LOSSES.get("mse")()
    out = torch.tensor([[-3.0, 0.2, 4.0]])
    assert torch.equal(identity.mean(out), out) and torch.equal(squashed.mean(out), torch.sigmoid(out))


def test_the_learned_gaussian_starts_at_sigma_1_and_floors_log_sigma_at_minus_6():
    loss = LOSSES.get("gaussian")().double()
    assert float(loss.log_sigma) == 0.0
    x, logits = one_pixel([0.3]), one_pixel([0.0])
    with torch.no_grad():
        loss.log_sigma.fill_(-6.0)
        at_floor = loss(logits, x)
        loss.log_sigma.fill_(-9.0)
        below = loss(logits, x)
    assert torch.equal(below, at_floor)
