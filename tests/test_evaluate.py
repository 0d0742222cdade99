"""Evaluation against exact values.

The reference model is probabilistic PCA: z ~ N(0, I), x | z ~ N(W z + b, s^2 I). Its
marginal log p(x) = log N(x; b, W W^T + s^2 I) and its posterior
q*(z|x) = N(M^-1 W^T (x - b), s^2 M^-1), M = W^T W + s^2 I, are known in closed form, so an
ELBO and an IWAE estimate can be checked against the true log-likelihood to the last digit.
W has orthogonal columns, so M (and the exact posterior) is diagonal, as a VAE's q is.
"""

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import torch.nn.functional as F

from bench.config import RunConfig
from bench.data import Dataset, Split
from bench.evaluate import (elbo_terms, evaluate, iwae_log_likelihood,
                            reconstruction_errors)
from bench.losses import FixedGaussian
from bench.models import create_model
from bench.models.vae import VAE, gaussian_kl

F64 = torch.float64
IMAGE = (1, 2, 3)  # D = 6 pixels
D, LATENT, NOISE = 6, 2, 0.5

pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class LinearGaussian:
    """Probabilistic PCA with its exact marginal and posterior."""

    W: torch.Tensor      # (D, latent), orthogonal columns
    b: torch.Tensor      # (D,)
    s: float             # observation noise standard deviation

    @property
    def M(self) -> torch.Tensor:
        return self.W.T @ self.W + self.s**2 * torch.eye(self.W.shape[1], dtype=F64)

    def sample(self, n: int, generator) -> torch.Tensor:
        z = torch.randn(n, self.W.shape[1], generator=generator, dtype=F64)
        noise = torch.randn(n, len(self.b), generator=generator, dtype=F64)
        return (z @ self.W.T + self.b + self.s * noise).view(n, *IMAGE)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per image, nats (float64)."""
        cov = self.W @ self.W.T + self.s**2 * torch.eye(len(self.b), dtype=F64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.flatten(1))

    def vae(self, shift: float = 0.0, scale: float = 1.0) -> VAE:
        """A bench VAE of this model whose q is the exact posterior, its mean shifted by
        `shift` and its sigma multiplied by `scale` (1 and 0 give the exact posterior)."""
        return VAE(PosteriorEncoder(self, shift, scale), MeanDecoder(self),
                   FixedGaussian(sigma=self.s, identity=True), latent=self.W.shape[1])


class PosteriorEncoder(nn.Module):
    def __init__(self, model: LinearGaussian, shift: float, scale: float):
        super().__init__()
        self.model, self.shift, self.scale = model, shift, scale

    def forward(self, x, c=None):
        m = self.model
        mu = (x.flatten(1) - m.b) @ m.W @ torch.linalg.inv(m.M) + self.shift
        sigma = m.s / torch.sqrt(torch.diagonal(m.M))
        return mu, self.scale * sigma.expand_as(mu)


class MeanDecoder(nn.Module):
    def __init__(self, model: LinearGaussian):
        super().__init__()
        self.model = model

    def forward(self, z, c=None):
        return (z @ self.model.W.T + self.model.b).view(-1, *IMAGE)


@pytest.fixture(scope="module")
def ppca() -> LinearGaussian:
    g = seeded(0)
    q, _ = torch.linalg.qr(torch.randn(D, LATENT, generator=g, dtype=F64))
    model = LinearGaussian(W=q * torch.tensor([2.0, 1.2], dtype=F64),
                           b=0.3 * torch.randn(D, generator=g, dtype=F64), s=NOISE)
    assert torch.allclose(model.M, torch.diag(torch.diagonal(model.M)))  # diagonal posterior
    return model


@pytest.fixture(scope="module")
def images(ppca) -> torch.Tensor:
    return ppca.sample(500, seeded(1))


# -- the analytic KL -------------------------------------------------------------------------

def test_gaussian_kl_is_zero_for_the_prior_itself():
    assert torch.equal(gaussian_kl(torch.zeros(4), torch.ones(4)), torch.zeros(4))


def test_gaussian_kl_equals_a_monte_carlo_estimate():
    mu = torch.tensor([0.0, 1.5, -0.7, 0.2], dtype=F64)
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.05], dtype=F64)
    z = mu + sigma * torch.randn(200_000, 4, generator=seeded(0), dtype=F64)
    log_q = -0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    log_p = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    samples = log_q - log_p
    standard_error = samples.std(0) / math.sqrt(len(z))
    assert ((samples.mean(0) - gaussian_kl(mu, sigma)).abs() < 4 * standard_error).all()


# -- ELBO and IWAE on a model whose likelihood is known --------------------------------------

@pytest.mark.parametrize("k", [1, 7, 100])
def test_iwae_with_the_exact_posterior_is_log_px_for_any_k(ppca, images, k):
    """With q = p(z|x) every importance weight equals p(x): no Monte Carlo error at all."""
    estimate = iwae_log_likelihood(ppca.vae(), images, k=k, generator=seeded(2))
    assert estimate.dtype == F64
    torch.testing.assert_close(estimate, ppca.log_px(images), rtol=0, atol=1e-9)


def test_iwae_over_many_chunks_is_still_exact(ppca, images):
    """The same exact answer when the k samples are drawn in several chunks (here 7 of 16 and a
    last one of 8 for k = 120): every chunk's weights count, once."""
    pixels = images[0].numel()
    chunked = iwae_log_likelihood(ppca.vae(), images, k=120, generator=seeded(2),
                                  max_elements=16 * len(images) * pixels)
    torch.testing.assert_close(chunked, ppca.log_px(images), rtol=0, atol=1e-9)


def test_elbo_with_the_exact_posterior_is_log_px(ppca, images):
    """ELBO = log p(x) - KL(q || p(z|x)) = log p(x) here, for every image and every sample:
    log p(x, z) - log q(z|x) does not depend on z when q is the posterior."""
    elbo = elbo_terms(ppca.vae(), images, generator=seeded(3))["elbo"]
    torch.testing.assert_close(elbo, ppca.log_px(images), rtol=0, atol=1e-4)


def test_elbo_decomposes_into_recon_and_analytic_kl_on_average(ppca, images):
    """-(recon + analytic KL) is the same bound: equal to the ELBO in expectation."""
    repeats = 4000
    for image in images[:3]:
        t = elbo_terms(ppca.vae(shift=0.2), image.expand(repeats, *IMAGE), generator=seeded(3))
        split = -(t["recon"] + t["kl"])
        assert abs(float(t["elbo"].mean() - split.mean())) < 4 * float((t["elbo"] - split).std()) / math.sqrt(repeats)


def test_elbo_is_below_log_px_by_the_kl_to_the_posterior(ppca, images):
    """With a shifted q the gap is KL(q || p(z|x)) = shift^2 / 2 * sum M_jj / s^2 exactly."""
    shift, repeats = 0.3, 20_000
    image = images[:1].expand(repeats, *IMAGE)
    elbo = elbo_terms(ppca.vae(shift=shift), image, generator=seeded(4))["elbo"]
    gap = shift**2 / 2 * float(torch.diagonal(ppca.M).sum()) / ppca.s**2
    expected = float(ppca.log_px(images[:1])) - gap
    assert abs(float(elbo.mean()) - expected) < 4 * float(elbo.std()) / math.sqrt(repeats)


def test_iwae_tightens_towards_log_px_as_k_grows(ppca, images):
    """A poorer q (mean shifted, sigma widened): the k-sample bound is below log p(x) on average
    and rises monotonically with k (Burda et al. 2015, Theorem 1)."""
    poor, log_px = ppca.vae(shift=0.5, scale=1.5), ppca.log_px(images)
    gaps, errors = {}, {}
    for k in (1, 10, 100, 1000):
        per_image = torch.stack([iwae_log_likelihood(poor, images, k=k, generator=seeded(10 + r))
                                 for r in range(2)]).mean(0) - log_px
        gaps[k] = float(per_image.mean())
        errors[k] = float(per_image.std()) / math.sqrt(len(images))
        assert gaps[k] < 3 * errors[k], f"k={k}: IWAE above log p(x) by {gaps[k]:.4f} nats"
    ks = sorted(gaps)
    for small, large in zip(ks, ks[1:]):
        assert gaps[large] > gaps[small] - 3 * math.hypot(errors[small], errors[large])
    assert abs(gaps[1000]) < 0.02 * abs(gaps[1])


def test_an_nll_n_beyond_the_test_split_means_every_image_not_more(ppca, images):
    """nll_n = 500 on 269 digits divided the sum over 269 images by 500 and logged nll_n = 500."""
    model = ppca.vae()
    every = evaluate(model, images, None, k=10, batch_size=128, metrics=["nll"]).metrics
    beyond = evaluate(model, images, None, k=10, batch_size=128, metrics=["nll"], nll_n=10 * len(images)).metrics
    assert beyond == every and beyond["nll_n"] == len(images)


def test_evaluate_reports_the_exact_numbers(ppca, images):
    model = ppca.vae()
    result = evaluate(model, images, None, k=10, batch_size=128)
    m, log_px = result.metrics, ppca.log_px(images)
    assert m["nll"] == pytest.approx(-float(log_px.mean()), abs=1e-9)
    assert m["nll_k"] == 10 and m["nll_n"] == len(images)
    assert m["bits_per_dim"] == pytest.approx(m["nll"] / (D * math.log(2)), rel=1e-12)
    # the exact posterior: the ELBO is log p(x) for every image, recon + KL only on average
    assert m["elbo"] == pytest.approx(-m["nll"], abs=1e-9)
    recon = elbo_terms(model, images, generator=seeded(5))["recon"]
    assert abs(m["recon"] + m["kl"] - m["nll"]) < 4 * float(recon.std()) / math.sqrt(len(images))
    mu, sigma = model.encode(images)
    assert m["kl"] == pytest.approx(float(gaussian_kl(mu, sigma).sum(1).mean()), rel=1e-12)
    assert m["mse"] == pytest.approx(float(((images - model.decode(mu)) ** 2).flatten(1).sum(1).mean()))
    assert math.isnan(m["bce"])  # an identity link has no Bernoulli reading
    assert m["active_units"] == LATENT and len(result.kl_per_dim) == LATENT
    assert result.proper_density  # a Gaussian on real-valued data


def test_bits_per_dim_falls_back_to_the_elbo_without_an_nll(ppca, images):
    m = evaluate(ppca.vae(), images, None, metrics=["elbo"]).metrics
    assert "nll" not in m
    assert m["bits_per_dim"] == pytest.approx(-m["elbo"] / (D * math.log(2)), rel=1e-12)


# -- a conditional model's marginal likelihood ----------------------------------------------
# x | z, y ~ N(W z + b_y, s^2 I): p(x|y) = N(x; b_y, W W^T + s^2 I), so
# log p(x) = log sum_y p(y) N(x; b_y, W W^T + s^2 I) exactly, with the posterior of each label
# q*(z|x, y) = N(M^-1 W^T (x - b_y), s^2 M^-1).

LABEL_FREQUENCIES = (0.5, 0.3, 0.2)  # of the training labels: p(y) is not uniform


class LabelPosteriorEncoder(nn.Module):
    def __init__(self, model: LinearGaussian, offsets: torch.Tensor, shift: float):
        super().__init__()
        self.model, self.offsets, self.shift = model, offsets, shift

    def forward(self, x, c):
        m = self.model
        mu = (x.flatten(1) - c @ self.offsets) @ m.W @ torch.linalg.inv(m.M) + self.shift
        return mu, (m.s / torch.sqrt(torch.diagonal(m.M))).expand_as(mu)


class LabelMeanDecoder(nn.Module):
    def __init__(self, model: LinearGaussian, offsets: torch.Tensor):
        super().__init__()
        self.model, self.offsets = model, offsets

    def forward(self, z, c):
        return (z @ self.model.W.T + c @ self.offsets).view(-1, *IMAGE)


class LinearCVAE(VAE):
    conditional = True

    def condition(self, y):
        return F.one_hot(y, self.num_classes).to(F64)


@pytest.fixture(scope="module")
def labelled(ppca):
    """A conditional linear-Gaussian model, its exact log p(x) and log p(x|y), test images with
    labels drawn from p(y), and a Dataset whose training labels have the frequencies p(y)."""
    offsets = 1.5 * torch.randn(len(LABEL_FREQUENCIES), D, generator=seeded(20), dtype=F64)
    prior = torch.tensor(LABEL_FREQUENCIES, dtype=F64)
    y = torch.multinomial(prior, 300, replacement=True, generator=seeded(21))
    x = (ppca.sample(300, seeded(22)).flatten(1) - ppca.b + offsets[y]).view(-1, *IMAGE)
    cov = ppca.W @ ppca.W.T + ppca.s**2 * torch.eye(D, dtype=F64)
    log_px_y = torch.stack([torch.distributions.MultivariateNormal(b, cov).log_prob(x.flatten(1))
                            for b in offsets])                                   # (labels, N)
    train_y = torch.repeat_interleave(torch.arange(3), torch.tensor([50, 30, 20]))
    split = Split(torch.zeros(len(train_y), *IMAGE), train_y)
    data = Dataset("linear-gaussian", split, split, split, 3, "none", "tests")

    def model(shift: float = 0.0):
        return LinearCVAE(LabelPosteriorEncoder(ppca, offsets, shift), LabelMeanDecoder(ppca, offsets),
                          FixedGaussian(sigma=ppca.s, identity=True), latent=LATENT, num_classes=3)

    log_px = torch.logsumexp(log_px_y + prior.log()[:, None], 0)
    return {"model": model, "x": x, "y": y, "data": data, "log_px": log_px,
            "log_px_given_y": log_px_y.gather(0, y[None])[0]}


def test_cvae_marginal_nll_equals_the_closed_form(labelled):
    """With each label's exact posterior every importance weight is p(x|y): the marginal
    -log sum_y p(y) p(x|y), with p(y) from the training labels, is exact for any k."""
    m = evaluate(labelled["model"](), labelled["x"], labelled["y"], k=3, data=labelled["data"]).metrics
    assert m["nll_marginal"] == pytest.approx(-float(labelled["log_px"].mean()), abs=1e-9)
    assert m["nll"] == pytest.approx(-float(labelled["log_px_given_y"].mean()), abs=1e-9)  # conditional
    # on average log p(x|y) exceeds log p(x) by I(x; y) >= 0; per image p(x) >= p(y) p(x|y)
    assert m["nll"] < m["nll_marginal"]
    log_py = torch.tensor(LABEL_FREQUENCIES, dtype=F64).log()[labelled["y"]]
    assert m["nll_marginal"] <= m["nll"] - float(log_py.mean())
    on_ten = evaluate(labelled["model"](), labelled["x"], labelled["y"], k=3, nll_n=10,
                      data=labelled["data"]).metrics
    assert on_ten["nll_marginal"] == pytest.approx(-float(labelled["log_px"][:10].mean()), abs=1e-9)


def test_cvae_marginal_nll_needs_the_training_labels(labelled):
    m = evaluate(labelled["model"](), labelled["x"], labelled["y"], k=3).metrics
    assert "nll_marginal" not in m and "nll" in m


def test_cvae_marginal_nll_tightens_from_above_as_k_grows(labelled):
    """With a poorer q each label's estimate is biased low, so the marginal NLL is above the
    truth on average and falls towards it as k grows."""
    poor, exact = labelled["model"](shift=0.6), -float(labelled["log_px"].mean())
    gaps = [evaluate(poor, labelled["x"], labelled["y"], k=k, data=labelled["data"],
                     metrics=["nll-marginal"]).metrics["nll_marginal"] - exact for k in (1, 10, 200)]
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gaps[2] < 0.1 * gaps[0]


# -- Monte Carlo draws -----------------------------------------------------------------------

def test_evaluation_draws_its_own_noise(ppca, images):
    """Same seed, same numbers; another seed, another ELBO; the global RNG (which drew or
    binarised the data) is neither used nor advanced."""
    model = ppca.vae(shift=0.2, scale=1.3)
    first = evaluate(model, images, None, k=20).metrics
    torch.manual_seed(123)
    again = evaluate(model, images, None, k=20).metrics
    after_evaluate = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_evaluate)  # evaluate took nothing from it
    other = evaluate(model, images, None, k=20, seed=7).metrics
    assert {k: v for k, v in first.items() if k != "bce"} == {k: v for k, v in again.items() if k != "bce"}
    assert other["elbo"] != first["elbo"] and other["nll"] != first["nll"]


# -- deterministic autoencoders, reconstructions, latents ------------------------------------

def test_a_deterministic_autoencoder_has_no_elbo_nll_or_kl():
    model = create_model(RunConfig(model="ae", latent=3), (1, 8, 8), num_classes=10)
    x = torch.rand(20, 1, 8, 8, generator=seeded(0))
    result = evaluate(model, x, None, k=5)
    for absent in ("elbo", "nll", "kl", "bits_per_dim", "active_units"):
        assert absent not in result.metrics  # absent, never 0
    assert result.metrics["mse"] > 0 and result.metrics["bce"] > 0
    assert result.kl_per_dim == []


class TinyEncoder(nn.Module):
    """mu = 2x - 1 per pixel, sigma = 1."""

    def forward(self, x, c=None):
        mu = 2 * x.flatten(1) - 1
        return mu, torch.ones_like(mu)


class TinyDecoder(nn.Module):
    def forward(self, z, c=None):
        return z.view(-1, 1, 1, 2)


def test_reconstruction_errors_by_hand():
    """x = (0, 1) gives logits (-1, 1) and mean (sigmoid(-1), sigmoid(1)):
    squared error 2 sigmoid(-1)^2 and cross-entropy 2 log(1 + e^-1)."""
    model = VAE(TinyEncoder(), TinyDecoder(), FixedGaussian(), latent=2)
    sq, bce = reconstruction_errors(model, torch.tensor([[[[0.0, 1.0]]]]))
    sigmoid_minus_1 = 1 / (1 + math.e)
    assert sq.item() == pytest.approx(2 * sigmoid_minus_1**2, rel=1e-6)
    assert bce.item() == pytest.approx(2 * math.log(1 + math.exp(-1)), rel=1e-6)

    identity = VAE(TinyEncoder(), TinyDecoder(), FixedGaussian(identity=True), latent=2)
    sq, bce = reconstruction_errors(identity, torch.tensor([[[[0.0, 1.0]]]]))
    assert sq.item() == pytest.approx(1.0)  # the mean is (-1, 1) itself: (0 + 1)^2 + 0
    assert math.isnan(bce.item())


class TwoActiveUnits(nn.Module):
    """Five latent dimensions; only the first two depend (strongly) on x."""

    def forward(self, x, c=None):
        p = x.flatten(1)
        ones = torch.ones_like(p[:, 0])
        mu = torch.stack([3 * p[:, 0], -3 * p[:, 1], 0.05 * p[:, 2], 0 * ones, 0.5 * ones], 1)
        return mu, torch.ones_like(mu)


def test_active_units_counts_dimensions_that_depend_on_x():
    model = VAE(TwoActiveUnits(), TinyDecoder(), FixedGaussian(), latent=5)
    x = torch.rand(400, 1, 1, 4, generator=seeded(0))
    result = evaluate(model, x, None, metrics=["latent"])
    assert result.metrics["active_units"] == 2
    assert len(result.kl_per_dim) == 5
    # KL per dimension with sigma = 1 is mu^2 / 2: 0 for a constant 0, 0.125 for a constant 0.5
    assert result.kl_per_dim[3:] == [0.0, 0.125]
    assert result.kl_per_dim[0] == pytest.approx(float((9 * x[:, 0, 0, 0].double() ** 2).mean() / 2))


# -- the numbers each metric reports, by hand ------------------------------------------------

def test_elbo_terms_use_exactly_the_noise_drawn_from_the_generator(ppca, images):
    """z = mu + sigma * eps with eps drawn in the model's dtype from the generator passed:
    the ELBO, recon and KL of one draw, computed by hand."""
    model = ppca.vae(shift=0.3, scale=1.4)  # not the posterior: the ELBO depends on each z
    mu, sigma = model.encode(images)
    eps = torch.randn(mu.shape, generator=seeded(7), dtype=F64)
    z = mu + sigma * eps
    recon = ((images - model.decode(z)) ** 2).flatten(1).sum(1) / (2 * NOISE**2) + D * math.log(
        NOISE * math.sqrt(2 * math.pi))
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    log_q = torch.distributions.Normal(mu, sigma).log_prob(z).sum(1)
    terms = elbo_terms(model, images, generator=seeded(7))
    assert terms["elbo"].dtype == F64
    assert torch.allclose(terms["recon"], recon, rtol=1e-12)
    assert torch.allclose(terms["elbo"], -recon + log_prior - log_q, rtol=1e-12)
    # evaluate reports the means of these terms, drawn from its own seeded generator
    from bench.evaluate import EVAL_SEED
    m = evaluate(model, images, None, metrics=["elbo"], batch_size=len(images)).metrics
    drawn = elbo_terms(model, images, generator=seeded(EVAL_SEED))
    for name in ("elbo", "recon", "kl"):
        assert m[name] == pytest.approx(float(drawn[name].mean()), rel=1e-12)


class HalfEncoder(nn.Module):
    """mu = x - 0.5 per pixel, sigma = 1: decoded by TinyDecoder, logits x - 0.5."""

    def forward(self, x, c=None):
        mu = x.flatten(1) - 0.5
        return mu, torch.ones_like(mu)


def test_reconstruction_metrics_are_means_of_the_per_image_errors():
    """One squared error and one cross-entropy per image, averaged over images and batches."""
    from bench.losses import Bernoulli

    model = VAE(HalfEncoder(), TinyDecoder(), Bernoulli(), latent=2)
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.2, 0.9]]).view(3, 1, 1, 2)
    logits = x.flatten(1) - 0.5
    p = torch.sigmoid(logits)
    sq_by_hand = ((x.flatten(1) - p) ** 2).sum(1)
    bce_by_hand = -(x.flatten(1) * p.log() + (1 - x.flatten(1)) * (1 - p).log()).sum(1)
    sq, bce = reconstruction_errors(model, x)
    assert sq.shape == bce.shape == (3,)
    assert torch.allclose(sq, sq_by_hand, rtol=1e-6) and torch.allclose(bce, bce_by_hand, rtol=1e-6)
    m = evaluate(model, x, None, metrics=["reconstruction"], batch_size=2).metrics  # two batches
    assert m["mse"] == pytest.approx(float(sq_by_hand.mean()), rel=1e-6)
    assert m["bce"] == pytest.approx(float(bce_by_hand.mean()), rel=1e-6)


@pytest.mark.parametrize("likelihood, pixels, proper", [
    ("bce", [0.0, 1.0], True),        # Bernoulli on binary data: a density
    ("bce", [0.0, 0.4], False),       # Bernoulli on grey pixels: not one
    ("bce", [1.0, 1.0], True),
    ("mse", [0.0, 0.4], True),        # a Gaussian on continuous data: a density
    ("mse", [0.0, 1.0], False),       # ... but not a probability on binary data
])
def test_the_proper_density_flag_follows_the_pixels_unless_told(likelihood, pixels, proper):
    from bench.losses import Bernoulli

    model = VAE(HalfEncoder(), TinyDecoder(), Bernoulli() if likelihood == "bce" else FixedGaussian(), latent=2)
    x = torch.tensor(pixels * 2).view(2, 1, 1, 2)
    assert evaluate(model, x, None, metrics=["reconstruction"]).proper_density is proper
    told = evaluate(model, x, None, metrics=["reconstruction"], binary_data=likelihood == "bce")
    assert told.proper_density  # the caller knows the data (a binarized dataset's flag)


def test_one_image_is_enough(ppca, images):
    """A single image: no variance across images (no active units), bits per dim from its NLL."""
    result = evaluate(ppca.vae(), images[:1], None, k=4)
    m = result.metrics
    assert m["nll"] == pytest.approx(-float(ppca.log_px(images[:1])[0]), abs=1e-9)
    assert m["bits_per_dim"] == pytest.approx(m["nll"] / (D * math.log(2)), rel=1e-12)
    assert m["active_units"] == 0 and len(result.kl_per_dim) == LATENT
    poor = evaluate(ppca.vae(shift=0.5), images[:1], None, k=4).metrics  # the ELBO is now below -NLL
    assert poor["elbo"] < -poor["nll"] - 0.01
    assert poor["bits_per_dim"] == pytest.approx(poor["nll"] / (D * math.log(2)), rel=1e-12)  # from the NLL
    log_px = iwae_log_likelihood(ppca.vae(), images[:1], k=3, generator=seeded(0))
    assert log_px.shape == (1,) and float(log_px[0]) == pytest.approx(float(ppca.log_px(images[:1])[0]), abs=1e-9)


class FirstPixels(nn.Module):
    """mu = the first two pixels themselves, sigma = 1."""

    def forward(self, x, c=None):
        mu = x.flatten(1)[:, :2]
        return mu, torch.ones_like(mu)


def test_active_units_use_the_population_variance_and_a_strict_threshold():
    """Two images: a dimension moving by 1 is active; one moving by 0.15 has population
    variance 0.005625 (its unbiased variance, 0.01125, would count); a variance of exactly
    0.01 is not above the threshold."""
    model = VAE(FirstPixels(), TinyDecoder(), FixedGaussian(), latent=2)
    two = torch.tensor([[0.0, 0.0], [1.0, 0.15]], dtype=F64).view(2, 1, 1, 2)
    assert evaluate(model, two, None, metrics=["latent"]).metrics["active_units"] == 1
    exactly = torch.tensor([[0.012624076704937185] * 2, [0.2126240767049372] * 2], dtype=F64)
    assert exactly[:, :1].var(0, unbiased=False).item() == 0.01
    assert evaluate(model, exactly.view(2, 1, 1, 2), None, metrics=["latent"]).metrics["active_units"] == 0


def test_an_unconditional_model_gets_no_marginal_nll_even_with_the_training_labels(ppca, images, labelled):
    m = evaluate(ppca.vae(), images[:20], None, k=2, data=labelled["data"]).metrics
    assert "nll_marginal" not in m and "nll" in m


def test_the_marginal_nll_sums_over_the_labels_seen_in_training(labelled):
    """Training labels 50 x class 0 and 1 x class 1, none of class 2: p(y) = (50/51, 1/51, 0),
    so the sum runs over labels 0 and 1 only, the single image of class 1 included."""
    train_y = torch.tensor([0] * 50 + [1])
    split = Split(torch.zeros(len(train_y), *IMAGE), train_y)
    data = Dataset("linear-gaussian", split, split, split, 3, "none", "tests")
    cov = labelled["model"]().encoder.model
    x = labelled["x"][:30]
    offsets = labelled["model"]().encoder.offsets
    full = cov.W @ cov.W.T + cov.s**2 * torch.eye(D, dtype=F64)
    log_px_y = torch.stack([torch.distributions.MultivariateNormal(b, full).log_prob(x.flatten(1))
                            for b in offsets[:2]])
    prior = torch.tensor([50 / 51, 1 / 51], dtype=F64)
    exact = -float(torch.logsumexp(log_px_y + prior.log()[:, None], 0).mean())
    m = evaluate(labelled["model"](), x, labelled["y"][:30], k=2, data=data, metrics=["nll-marginal"]).metrics
    assert m["nll_marginal"] == pytest.approx(exact, abs=1e-9)


def test_the_protocol_defaults(ppca, images):
    """5,000 importance samples per image (Burda et al.'s protocol), 10,000 samples for the
    sample-quality metrics, evaluation batches of 500 images."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(evaluate).parameters.items()}
    assert (defaults["k"], defaults["quality_n"], defaults["batch_size"]) == (5000, 10_000, 500)
    assert inspect.signature(iwae_log_likelihood).parameters["k"].default == 5000
    # and as used: an evaluation without k reports 5,000 samples; without batch_size it draws
    # its noise batch by batch exactly as with batch_size=500
    model = ppca.vae(shift=0.2, scale=1.2)
    assert evaluate(model, images[:2], None, metrics=["nll"]).metrics["nll_k"] == 5000
    x = torch.cat([images, images[:120]])  # 620 images: two batches of 500 and 120
    default, explicit = evaluate(model, x, None, k=2).metrics, evaluate(model, x, None, k=2, batch_size=500).metrics
    assert {k: v for k, v in default.items() if k != "bce"} == {k: v for k, v in explicit.items() if k != "bce"}


def test_many_importance_samples_shrink_the_image_batches(ppca, images, labelled):
    """k = 10,000: images go 419 at a time (2**22 elements of weights), the estimate unchanged."""
    m = evaluate(ppca.vae(), images[:3], None, k=10_000, metrics=["nll"]).metrics
    assert m["nll"] == pytest.approx(-float(ppca.log_px(images[:3]).mean()), abs=1e-9)
    c = evaluate(labelled["model"](), labelled["x"][:2], labelled["y"][:2], k=10_000, data=labelled["data"],
                 metrics=["nll-marginal"]).metrics
    assert c["nll_marginal"] == pytest.approx(-float(labelled["log_px"][:2].mean()), abs=1e-9)


@pytest.fixture(scope="module")
def small_digits():
    import dataclasses

    from bench.data import load_dataset

    d = load_dataset("digits")
    return dataclasses.replace(d, train=Split(d.train.x[:200], d.train.y[:200]),
                               val=Split(d.val.x[:50], d.val.y[:50]), test=Split(d.test.x[:60], d.test.y[:60]))


def test_sample_quality_runs_only_with_data_a_cache_and_a_sample_count(small_digits, tmp_path):
    """The judge is trained once into the cache; samples are drawn from the evaluation's seed
    (another seed, other samples, another Frechet distance); quality_n = 0 turns it off."""
    model = create_model(RunConfig(model="vae", latent=2), small_digits.image_shape, small_digits.num_classes)
    x, y = small_digits.test.x, small_digits.test.y
    on = evaluate(model, x, y, k=2, data=small_digits, cache_dir=tmp_path, quality_n=30).metrics
    assert {"fd", "precision", "recall", "classifier_acc", "class_entropy"} <= set(on) and on["quality_n"] == 30
    assert list(tmp_path.iterdir())  # the judge, cached
    other = evaluate(model, x, y, k=2, data=small_digits, cache_dir=tmp_path, quality_n=30, seed=5).metrics
    assert other["fd"] != on["fd"]
    for off in ({"quality_n": 0}, {"cache_dir": None}, {"data": None}):
        kw = {"data": small_digits, "cache_dir": tmp_path, "quality_n": 30, **off}
        assert "fd" not in evaluate(model, x, y, k=2, **kw).metrics
