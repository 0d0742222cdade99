"""The VAE (Kingma & Welling 2013) with a standard normal prior and a diagonal Gaussian q(z|x).

Its forward pass is a pure function of parameters and inputs; noise comes from an optional
torch.Generator so evaluation never shares the generator that drew the data.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bench.registry import MODELS

LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per latent dimension, in nats: the seed's
    0.5 * (mu^2 + sigma^2 - log sigma^2 - 1)."""
    return 0.5 * (mu**2 + sigma**2 - 2 * torch.log(sigma) - 1)


def log_normal(z: torch.Tensor, mu: torch.Tensor | float = 0.0, sigma: torch.Tensor | float = 1.0) -> torch.Tensor:
    """log N(z; mu, sigma^2) summed over the last dimension, in nats."""
    sigma = torch.as_tensor(sigma, dtype=z.dtype, device=z.device)
    return (-0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * LOG_2PI).sum(-1)


def importance_terms(model, x, y, mu, sigma, n: int, generator=None, eps: torch.Tensor | None = None,
                     likelihood=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x|z_i), log p(z_i) - log q(z_i|x)), each (n, B), for n draws z_i ~ q(z|x) (or
    z_i = mu + sigma * eps[i] for given noise): the log importance weights, split so the IWAE
    bound can weight the second part (beta). The one place they are computed, for the IWAE's
    training bound and the evaluation's log p(x). The decoder sees an image's n draws as
    consecutive rows, so a stacked model's rows stay grouped by trial. `likelihood(logits, x, n)`
    replaces the model's own by the same function run another way (`bench.fuse`)."""
    if eps is None:
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + sigma * eps                                                  # (n, B, latent)
    logits = model.decode(z.transpose(0, 1).flatten(0, 1), None if y is None else y.repeat_interleave(n))
    nll = model.likelihood(logits, x.repeat_interleave(n, 0)) if likelihood is None else likelihood(logits, x, n)
    log_px_z = -nll.view(x.shape[0], n).T
    return log_px_z, log_normal(z) - log_normal(z, mu, sigma)


@MODELS.register("vae")
class VAE(nn.Module):
    """VAE: loss = -log p(x|z) + beta * KL(q(z|x) || p(z)), one reparameterised sample."""

    variational = True    # has q(z|x) and a bound on log p(x): read as MODELS.get(name).variational
    conditional = False   # is given the label y

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: nn.Module,
                 latent: int, num_classes: int = 0, beta: float = 1.0, k: int = 1):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent, self.num_classes, self.beta, self.k = latent, num_classes, beta, k

    def condition(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return None

    def encode(self, x, y=None):
        return self.encoder(x, self.condition(y))

    def decode(self, z, y=None):
        return self.decoder(z, self.condition(y))

    def terms(self, x, y=None, kl_weight: float | torch.Tensor = 1.0, generator=None,
              eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-image `loss` (what training minimises), `recon` (-log p(x|z)) and `kl`, in nats.
        `kl_weight` may be one per image, and `eps` the noise (B, latent) drawn beforehand: a
        stack of trials passes each trial's own."""
        mu, sigma = self.encode(x, y)
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        recon = self.likelihood(self.decode(mu + sigma * eps, y), x)
        kl = gaussian_kl(mu, sigma).sum(1)
        return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl}

    def prior_sample(self, n: int, generator=None, device=None) -> torch.Tensor:
        weights = next(self.parameters())
        return torch.randn(n, self.latent, generator=generator, device=device or weights.device,
                           dtype=weights.dtype)

    def mean_image(self, z, y=None) -> torch.Tensor:
        """The likelihood's mean of p(x|z): what pictures of samples and reconstructions show."""
        return self.likelihood.mean(self.decode(z, y))

    @torch.no_grad()
    def sample(self, n: int, y=None, generator=None) -> torch.Tensor:
        """Mean images of p(x|z) for z from the prior."""
        return self.mean_image(self.prior_sample(n, generator), y)

    @classmethod
    def objective(cls, cfg) -> str:
        """The exact loss a run of this model minimises, in words: no hidden weights."""
        warm = (f", KL weight rising linearly from 0 over {cfg.warmup_epochs} epochs "
                f"(per {cfg.warmup_schedule})" if cfg.warmup_epochs else "")
        return f"{_recon_text(cfg)} + {cfg.beta:g} * KL(q(z|x) || N(0, I)){warm}"


def _recon_text(cfg) -> str:
    return f"-log p(x|z) under likelihood '{cfg.loss}' (nats, summed over pixels)"
