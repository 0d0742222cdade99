"""Models and architectures. `create_model` builds any registered model from a RunConfig."""

from bench.models import ae, cvae, iwae, nets, vae  # noqa: F401  (registers the entries)
from bench.errors import ConfigError
from bench.losses import create_loss
from bench.registry import ARCHS, MODELS


def create_model(cfg, image_shape: tuple[int, int, int], num_classes: int):
    """The model `cfg.model` with architecture `cfg.arch` and likelihood `cfg.loss`."""
    kind = MODELS.get(cfg.model)
    build_arch, likelihood = ARCHS.get(cfg.arch), create_loss(cfg.loss)
    if kind.conditional and num_classes < 2:
        raise ConfigError(f"model {cfg.model!r} needs a labelled dataset; {cfg.dataset!r} has no labels")
    cond_dim = num_classes if kind.conditional else 0
    encoder, decoder = build_arch(tuple(image_shape), cfg.latent, cond_dim=cond_dim, dropout=cfg.dropout)
    return kind(encoder, decoder, likelihood, latent=cfg.latent,
                                 num_classes=num_classes, beta=cfg.beta, k=cfg.k)
