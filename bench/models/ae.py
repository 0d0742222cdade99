"""Deterministic autoencoder: z = encoder mean, loss = -log p(x|z). It has no ELBO or NLL
(evaluation leaves those absent, never 0). It samples from a Gaussian mixture fitted to the
training latents after training (as in Ghosh et al. 2020's ex-post density estimation); the
mixture lives in buffers, so it is saved and loaded with the state dict."""

import torch

from bench.models.vae import VAE, _recon_text
from bench.registry import MODELS

MIXTURE_COMPONENTS = 10


@MODELS.register("ae")
class AE(VAE):
    """Autoencoder: reconstruction loss only; samples from a GMM over training latents."""

    variational = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        m = MIXTURE_COMPONENTS
        self.register_buffer("gmm_weights", torch.full((m,), 1.0 / m))
        self.register_buffer("gmm_means", torch.zeros(m, self.latent))
        self.register_buffer("gmm_stds", torch.ones(m, self.latent))

    @classmethod
    def objective(cls, cfg) -> str:
        return _recon_text(cfg)

    def encode(self, x, y=None):
        mu, _ = self.encoder(x, self.condition(y))
        return mu, torch.zeros_like(mu)

    def terms(self, x, y=None, kl_weight=1.0, generator=None, eps=None):
        mu, _ = self.encode(x, y)
        recon = self.likelihood(self.decode(mu, y), x)
        return {"loss": recon, "recon": recon}

    @torch.no_grad()
    def fit_prior(self, z: torch.Tensor, *, seed: int) -> None:
        """Fit the diagonal Gaussian mixture sampled from by `sample` (seeded by the run's seed)."""
        from sklearn.mixture import GaussianMixture

        m = min(MIXTURE_COMPONENTS, len(z))
        gmm = GaussianMixture(m, covariance_type="diag", random_state=seed, reg_covar=1e-4)
        gmm.fit(z.double().cpu().numpy())
        pad = MIXTURE_COMPONENTS - m
        w = torch.cat([torch.as_tensor(gmm.weights_), torch.zeros(pad, dtype=torch.float64)])
        means = torch.cat([torch.as_tensor(gmm.means_), torch.zeros(pad, self.latent, dtype=torch.float64)])
        stds = torch.cat([torch.as_tensor(gmm.covariances_).sqrt(), torch.ones(pad, self.latent, dtype=torch.float64)])
        for buf, value in ((self.gmm_weights, w), (self.gmm_means, means), (self.gmm_stds, stds)):
            buf.copy_(value.to(buf))

    def prior_sample(self, n, generator=None, device=None):
        device = self.gmm_means.device
        comp = torch.multinomial(self.gmm_weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.latent, generator=generator, device=device)
        return self.gmm_means[comp] + self.gmm_stds[comp] * eps
