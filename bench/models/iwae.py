"""Importance-weighted autoencoder (Burda et al. 2015): the same networks as the VAE trained on
the k-sample bound log (1/k) sum_i p(x, z_i) / q(z_i|x), which tightens as k grows."""

import math

import torch

from bench.models.vae import VAE, gaussian_kl, importance_terms
from bench.registry import MODELS


@MODELS.register("iwae")
class IWAE(VAE):
    """IWAE: loss = -log mean_k w_k, w_k = p(x|z_k) p(z_k)^beta / q(z_k|x)^beta."""

    @classmethod
    def objective(cls, cfg) -> str:
        warm = f", b rising linearly from 0 over {cfg.warmup_epochs} epochs" if cfg.warmup_epochs else ""
        return f"-log mean_k p(x|z_k) p(z_k)^b / q(z_k|x)^b with k={cfg.k}, b={cfg.beta:g}{warm}"

    def terms(self, x, y=None, kl_weight=1.0, generator=None, eps=None):
        mu, sigma = self.encode(x, y)
        log_px_z, log_ratio = importance_terms(self, x, y, mu, sigma, self.k, generator, eps)
        bound = torch.logsumexp(log_px_z + kl_weight * log_ratio, 0) - math.log(self.k)
        return {"loss": -bound, "recon": -log_px_z.mean(0), "kl": gaussian_kl(mu, sigma).sum(1)}
