"""Every registered model with every registered architecture: built from a RunConfig, it
gives finite per-image terms that backpropagate, logits shaped like the images and samples
in [0, 1]."""

import math

import pytest
import torch
from torch import nn

from bench.config import RunConfig
from bench.errors import ArchError, ConfigError
from bench.models import create_model
from bench.models.iwae import IWAE
from bench.models.vae import gaussian_kl, log_normal
from bench.registry import ARCHS, MODELS, PRESETS

SHAPES = [(1, 8, 8), (1, 28, 28)]
CLASSES = 10

pytestmark = pytest.mark.usefixtures("one_thread")


def conditional(name: str) -> bool:
    return MODELS.get(name).conditional


def build(model="vae", arch="seed", shape=(1, 8, 8), **changes):
    return create_model(RunConfig(model=model, arch=arch, latent=3, **changes), shape, CLASSES)


def batch(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("arch", ARCHS.names())
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_and_arch_trains_and_samples(name, arch, shape):
    if arch == "conv" and (shape[1] % 4 or shape[2] % 4):
        pytest.skip("conv needs sides divisible by 4")
    model = build(name, arch, shape, k=2)
    x, labels = batch(shape)
    y = labels if conditional(name) else None

    terms = model.terms(x, y)
    expected = {"loss", "recon", "kl"} if model.variational else {"loss", "recon"}
    assert set(terms) == expected
    for value in terms.values():
        assert value.shape == (4,) and torch.isfinite(value).all()
    terms["loss"].mean().backward()
    untrained = {n for n, p in model.named_parameters() if p.grad is None}
    # an AE uses only the encoder mean: its sigma head is the one part left without gradient
    assert untrained == (set() if model.variational else {"encoder.s.weight", "encoder.s.bias"})
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    mu, sigma = model.encode(x, y)
    assert mu.shape == sigma.shape == (4, 3)
    assert model.decode(mu, y).shape == x.shape  # logits, shaped like the images
    samples = model.sample(5, y=labels[:1].repeat(5) if conditional(name) else None)
    assert samples.shape == (5, *shape)
    assert ((samples >= 0) & (samples <= 1)).all()


@pytest.mark.parametrize("name", MODELS.names())
def test_a_float64_model_samples_in_float64(name):
    model = build(name).double().eval()
    y = torch.tensor([1, 2]) if conditional(name) else None
    assert model.sample(2, y=y).dtype == torch.float64


def test_a_conditional_model_needs_labels():
    model = build("cvae")
    x, y = batch((1, 8, 8))
    assert torch.isfinite(model.terms(x, y)["loss"]).all()
    with pytest.raises(ConfigError, match="needs labels"):
        model.terms(x)
    with pytest.raises(ConfigError, match="needs a labelled dataset"):
        create_model(RunConfig(model="cvae"), (1, 8, 8), num_classes=0)


def test_the_label_changes_what_a_cvae_decodes():
    model = build("cvae").eval()
    z = torch.zeros(2, 3)
    logits = model.decode(z, torch.tensor([0, 1]))
    assert not torch.equal(logits[0], logits[1])


def test_conv_refuses_sides_not_divisible_by_4_and_names_the_fix():
    with pytest.raises(ArchError) as caught:
        build(arch="conv", shape=(1, 6, 6))
    message = str(caught.value)
    assert "divisible by 4" in message and "6x6" in message
    assert "seed" in message  # the fix: an MLP architecture
    assert isinstance(caught.value, ConfigError)


def linear_sizes(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_seed_arch_has_the_seed_layer_sizes(shape):
    """Encoder D-128-64 then (mu, sigma) heads; decoder z-64-128-D; dropout after each hidden layer."""
    d = math.prod(shape)
    model = create_model(RunConfig(arch="seed", latent=32, dropout=0.1), shape, CLASSES)
    assert linear_sizes(model.encoder) == [(d, 128), (128, 64), (64, 32), (64, 32)]
    assert linear_sizes(model.decoder) == [(32, 64), (64, 128), (128, d)]
    for part in (model.encoder, model.decoder):
        dropouts = [m for m in part.modules() if isinstance(m, nn.Dropout)]
        assert len(dropouts) == 2 and all(m.p == 0.1 for m in dropouts)
    cvae = create_model(RunConfig(model="cvae", arch="seed", latent=32), shape, CLASSES)
    assert linear_sizes(cvae.encoder)[0] == (d + CLASSES, 128)  # the one-hot label is concatenated
    assert linear_sizes(cvae.decoder)[0] == (32 + CLASSES, 64)


def test_seed_sigma_is_softplus_plus_1e6():
    """A zero-weight sigma head gives sigma = 1e-6 + softplus(0) = 1e-6 + log 2."""
    model = build(arch="seed").double().eval()
    nn.init.zeros_(model.encoder.s.weight)
    nn.init.zeros_(model.encoder.s.bias)
    _, sigma = model.encode(torch.rand(3, 1, 8, 8, dtype=torch.float64))
    assert torch.allclose(sigma, torch.full_like(sigma, 1e-6 + math.log(2)), rtol=0, atol=1e-15)


@torch.no_grad()
def test_iwae_with_one_sample_is_the_vae_bound_with_a_sampled_kl():
    """With k = 1 and the same noise, the IWAE's reconstruction is the VAE's and its loss is
    recon + log q(z|x) - log p(z): the VAE's loss with the KL estimated from the same z."""
    vae = build("vae").double().eval()
    iwae = IWAE(vae.encoder, vae.decoder, vae.likelihood, latent=3, k=1)
    x, _ = batch((1, 8, 8))
    x = x.double()
    v = vae.terms(x, generator=torch.Generator().manual_seed(5))
    w = iwae.terms(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(w["recon"], v["recon"], rtol=1e-12, atol=0)
    torch.testing.assert_close(w["kl"], v["kl"], rtol=1e-12, atol=0)
    mu, sigma = vae.encode(x)
    z = mu + sigma * torch.randn(mu.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sampled_kl = log_normal(z, mu, sigma) - log_normal(z)
    torch.testing.assert_close(w["loss"], v["recon"] + sampled_kl, rtol=1e-12, atol=1e-12)
    # on average the sampled KL is the analytic one, so the two losses agree in expectation
    many = x[:1].expand(8_000, 1, 8, 8)
    mu, sigma = vae.encode(many[:1])
    iw = iwae.terms(many, generator=torch.Generator().manual_seed(6))["loss"]
    va = vae.terms(many, generator=torch.Generator().manual_seed(6))["loss"]
    assert torch.isfinite(iw).all() and torch.isfinite(va).all()
    spread = float((iw - va).std()) / math.sqrt(len(many))
    assert abs(float(iw.mean() - va.mean())) < 4 * spread + 1e-12
    assert float(gaussian_kl(mu, sigma).sum()) == pytest.approx(float(v["kl"][0]), rel=1e-12)


@torch.no_grad()
def test_iwae_bound_tightens_with_k():
    """Averaged over noise, the k-sample training loss is non-increasing in k."""
    vae = build("vae").double().eval()
    x, _ = batch((1, 8, 8), n=1)
    many = x.double().expand(4000, 1, 8, 8)
    losses = {}
    for k in (1, 4, 16):
        model = IWAE(vae.encoder, vae.decoder, vae.likelihood, latent=3, k=k)
        losses[k] = model.terms(many, generator=torch.Generator().manual_seed(k))["loss"]
    assert float(losses[1].mean()) > float(losses[4].mean()) > float(losses[16].mean())


def test_ae_samples_from_the_mixture_fitted_to_its_latents():
    model = build("ae").eval()
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 5.0, 5.0], [-5.0, -5.0, -5.0]])
    latents = centres[torch.arange(400) % 2] + 0.1 * torch.randn(400, 3, generator=g)
    model.fit_prior(latents, seed=0)
    assert model.gmm_weights.sum().item() == pytest.approx(1.0)
    z = model.prior_sample(1000, generator=g)
    nearest = torch.cdist(z, centres).min(1).values
    assert (nearest < 1.0).all()  # every draw lands on one of the two clusters
    assert (z[:, 0] > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    samples = model.sample(6, generator=g)
    assert samples.shape == (6, 1, 8, 8) and ((samples >= 0) & (samples <= 1)).all()
    # the mixture lives in buffers: it is saved and loaded with the weights
    state = model.state_dict()
    assert {"gmm_weights", "gmm_means", "gmm_stds"} <= set(state)
    fresh = build("ae")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.gmm_means, model.gmm_means)


def test_beta_weights_the_kl():
    x, _ = batch((1, 8, 8))
    model = build("vae", beta=4.0).eval()
    t = model.terms(x, kl_weight=0.25, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t["loss"], t["recon"] + 0.25 * t["kl"])


@pytest.mark.parametrize("name", PRESETS.names())
def test_every_preset_is_a_valid_config(name):
    cfg = RunConfig(**PRESETS.get(name)())
    model = create_model(cfg, (1, 8, 8), CLASSES)
    assert model.latent == cfg.latent


@pytest.mark.parametrize("name,model", [("seed-vae", "vae"), ("seed-cvae", "cvae")])
def test_seed_presets_are_the_seed_tutorial(name, model):
    cfg = RunConfig(**PRESETS.get(name)())
    assert (cfg.model, cfg.arch, cfg.loss) == (model, "seed", "seed-bce")
    assert (cfg.latent, cfg.lr, cfg.batch_size, cfg.dropout, cfg.beta) == (32, 1e-4, 64, 0.1, 1.0)


# -- the pieces every model shares, by hand ---------------------------------------------------

def test_log_normal_is_the_gaussian_log_density_in_the_dtype_of_z():
    g = torch.Generator().manual_seed(0)
    z, mu = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    for sigma in (0.3, torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.1):
        expected = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)
        torch.testing.assert_close(log_normal(z, mu, sigma), expected, rtol=1e-14, atol=0)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal(z), standard, rtol=1e-14, atol=0)


def test_a_plain_vae_is_unconditional_with_beta_1_and_one_sample():
    from bench.models.vae import VAE

    vae = build("vae")
    plain = VAE(vae.encoder, vae.decoder, vae.likelihood, latent=3)
    assert (plain.num_classes, plain.beta, plain.k) == (0, 1.0, 1)


@pytest.mark.parametrize("name", ["vae", "ae"])
def test_samples_come_from_the_generator_passed(name):
    """Same generator seed, same samples; the global RNG is neither used nor needed."""
    model = build(name).eval()
    if name == "ae":
        model.fit_prior(torch.randn(50, 3, generator=torch.Generator().manual_seed(1)), seed=0)
    torch.manual_seed(0)
    first = model.sample(4, generator=torch.Generator().manual_seed(3))
    second = model.sample(4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, model.sample(4, generator=torch.Generator().manual_seed(4)))


def test_vae_prior_draws_by_hand():
    model = build("vae").double()
    z = model.prior_sample(6, generator=torch.Generator().manual_seed(2))
    expected = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(z, expected, rtol=0, atol=0)


def test_iwae_bound_by_hand_from_the_noise_given():
    """loss = -(logsumexp_i [log p(x|z_i) + b (log p(z_i) - log q(z_i|x))] - log k), z_i =
    mu + sigma eps_i with the noise passed in (as a stack passes each trial's own)."""
    vae = build("vae").double().eval()
    k, beta = 4, 0.5
    iwae = IWAE(vae.encoder, vae.decoder, vae.likelihood, latent=3, k=k)
    x, _ = batch((1, 8, 8), n=2)
    x = x.double()
    eps = torch.randn(k, 2, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    mu, sigma = vae.encode(x)
    z = mu + sigma * eps                                                   # (k, B, latent)
    log_px_z = torch.stack([-vae.likelihood(vae.decode(z[i]), x) for i in range(k)])
    log_ratio = log_normal(z) - log_normal(z, mu, sigma)
    bound = torch.logsumexp(log_px_z + beta * log_ratio, 0) - math.log(k)
    t = iwae.terms(x, kl_weight=beta, eps=eps)
    torch.testing.assert_close(t["loss"], -bound, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t["recon"], -log_px_z.mean(0), rtol=1e-12, atol=1e-12)
    again = iwae.terms(x, kl_weight=beta, eps=eps, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again["loss"], t["loss"], rtol=0, atol=0)  # the noise given wins


def test_a_cvae_without_labels_says_what_to_pass():
    model = build("cvae")
    with pytest.raises(ConfigError) as caught:
        model.terms(batch((1, 8, 8))[0])
    assert str(caught.value) == "a cvae needs labels: pass y (a dataset with labels)"


def test_the_objectives_in_words():
    cfg = RunConfig(model="vae", loss="bce", beta=0.5, warmup_epochs=10, k=5)
    recon = "-log p(x|z) under likelihood 'bce' (nats, summed over pixels)"
    assert MODELS.get("vae").objective(cfg) == (
        f"{recon} + 0.5 * KL(q(z|x) || N(0, I)), KL weight rising linearly from 0 over 10 epochs (per step)")
    assert MODELS.get("vae").objective(cfg.replace(warmup_epochs=0)) == f"{recon} + 0.5 * KL(q(z|x) || N(0, I))"
    assert MODELS.get("ae").objective(cfg) == recon
    assert MODELS.get("iwae").objective(cfg) == (
        "-log mean_k p(x|z_k) p(z_k)^b / q(z_k|x)^b with k=5, b=0.5, b rising linearly from 0 over 10 epochs")
    assert MODELS.get("iwae").objective(cfg.replace(warmup_epochs=0)) == (
        "-log mean_k p(x|z_k) p(z_k)^b / q(z_k|x)^b with k=5, b=0.5")


# -- the autoencoder's mixture prior ---------------------------------------------------------

def test_an_unfitted_ae_prior_is_a_uniform_mixture_of_standard_normals():
    model = build("ae")
    torch.testing.assert_close(model.gmm_weights, torch.full((10,), 0.1), rtol=0, atol=0)
    assert torch.equal(model.gmm_means, torch.zeros(10, 3)) and torch.equal(model.gmm_stds, torch.ones(10, 3))


def test_ae_prior_draws_by_hand():
    """A component from the weights, then mean + sd * eps, both from the generator passed."""
    model = build("ae")
    model.fit_prior(torch.randn(200, 3, generator=torch.Generator().manual_seed(0)), seed=0)
    z = model.prior_sample(7, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    comp = torch.multinomial(model.gmm_weights, 7, replacement=True, generator=g)
    eps = torch.randn(7, 3, generator=g)
    torch.testing.assert_close(z, model.gmm_means[comp] + model.gmm_stds[comp] * eps, rtol=0, atol=0)


def test_ae_mixture_fit_is_seeded_padded_and_floored():
    """Fewer latents than components: the unused ones get weight 0 (never drawn); a dimension
    the encoder never moves gets sd sqrt(1e-4) = 0.01, not 0; the same seed, the same fit."""
    model = build("ae")
    g = torch.Generator().manual_seed(0)
    latents = torch.cat([torch.randn(4, 2, generator=g), torch.full((4, 1), 0.5)], 1)  # 4 < 10 components
    model.fit_prior(latents, seed=0)
    assert torch.equal(model.gmm_weights[4:], torch.zeros(6)) and model.gmm_weights.sum().item() == pytest.approx(1)
    assert torch.equal(model.gmm_means[4:], torch.zeros(6, 3)) and torch.equal(model.gmm_stds[4:], torch.ones(6, 3))
    torch.testing.assert_close(model.gmm_stds[:4, 2], torch.full((4,), 0.01), rtol=1e-3, atol=0)
    many = torch.randn(300, 3, generator=g)
    fits = []
    for seed in (0, 0, 1):
        model.fit_prior(many, seed=seed)
        fits.append(model.gmm_means.clone())
    assert torch.equal(fits[0], fits[1]) and not torch.equal(fits[0], fits[2])
