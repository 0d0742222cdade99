"""Encoder/decoder bodies, registered as architectures.

An architecture is a factory `(image_shape, latent, cond_dim, dropout) -> (encoder, decoder)`:
`encoder(x, c) -> (mu, sigma)` and `decoder(z, c) -> logits` shaped like the images, where
`c` is a (B, cond_dim) condition (the CVAE's one-hot label) or None. Decoders return logits;
the likelihood turns them into -log p(x|z). Conditioning is concatenation: to the flattened
input of the encoder and to z, as in the seed's CVAE.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ArchError
from bench.registry import ARCHS


def _cat(h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    return h if c is None else torch.cat([h, c], dim=1)


def mlp(sizes: list[int], act: Callable[[], nn.Module], dropout: float = 0.0) -> nn.Sequential:
    """Linear + activation (+ dropout) for each consecutive pair of sizes."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), act()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class GatedDense(nn.Module):
    """h = (W1 x + b1) * sigmoid(W2 x + b2) (Dauphin et al.; used by VampPrior / Exemplar VAE)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.h, self.g = nn.Linear(n_in, n_out), nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.h(x) * torch.sigmoid(self.g(x))


def gated(sizes: list[int]) -> nn.Sequential:
    return nn.Sequential(*[GatedDense(a, b) for a, b in zip(sizes[:-1], sizes[1:])])


# How each architecture turns its second head into sigma (> 0).
SIGMAS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softplus": lambda s: 1e-6 + F.softplus(s),               # the seed
    "logvar": lambda s: torch.exp(0.5 * s),                   # Kingma & Welling
    "exp": torch.exp,                                          # Burda et al.
    "hardtanh-logvar": lambda s: torch.exp(0.5 * F.hardtanh(s, -6.0, 2.0)),  # VampPrior code
}


class MLPEncoder(nn.Module):
    def __init__(self, body: nn.Module, width: int, latent: int, sigma: str):
        super().__init__()
        self.body, self.mu, self.s = body, nn.Linear(width, latent), nn.Linear(width, latent)
        self.sigma = sigma

    def forward(self, x, c=None):
        h = self.body(_cat(x.flatten(1), c))
        return self.mu(h), SIGMAS[self.sigma](self.s(h))


class MLPDecoder(nn.Module):
    def __init__(self, body: nn.Module, width: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.body, self.out = body, nn.Linear(width, math.prod(image_shape))
        self.image_shape = tuple(image_shape)

    def forward(self, z, c=None):
        return self.out(self.body(_cat(z, c))).view(-1, *self.image_shape)


def _mlp_pair(image_shape, latent, cond_dim, hidden, act, dropout, sigma):
    d = math.prod(image_shape)
    enc = MLPEncoder(mlp([d + cond_dim, *hidden], act, dropout), hidden[-1], latent, sigma)
    dec = MLPDecoder(mlp([latent + cond_dim, *hidden[::-1]], act, dropout), hidden[0], image_shape)
    return enc, dec


@ARCHS.register("seed")
def seed(image_shape, latent, cond_dim=0, dropout=0.1):
    """The seed: encoder D-128-64 ReLU+dropout, sigma = 1e-6 + softplus; decoder z-64-128-D."""
    return _mlp_pair(image_shape, latent, cond_dim, [128, 64], nn.ReLU, dropout, "softplus")


@ARCHS.register("kw")
def kw(image_shape, latent, cond_dim=0, dropout=0.0):
    """Kingma & Welling 2013: one hidden layer of 500 tanh units each side."""
    return _mlp_pair(image_shape, latent, cond_dim, [500], nn.Tanh, 0.0, "logvar")


@ARCHS.register("iwae")
def iwae(image_shape, latent, cond_dim=0, dropout=0.0):
    """Burda et al. 2015, one stochastic layer: two hidden layers of 200 tanh units each side."""
    return _mlp_pair(image_shape, latent, cond_dim, [200, 200], nn.Tanh, 0.0, "exp")


@ARCHS.register("gated")
def gated_mlp(image_shape, latent, cond_dim=0, dropout=0.0):
    """Exemplar VAE / VampPrior: two hidden layers of 300 GatedDense units each side."""
    d = math.prod(image_shape)
    enc = MLPEncoder(gated([d + cond_dim, 300, 300]), 300, latent, "hardtanh-logvar")
    dec = MLPDecoder(gated([latent + cond_dim, 300, 300]), 300, image_shape)
    return enc, dec


class ConvEncoder(nn.Module):
    def __init__(self, channels: int, flat: int, latent: int, cond_dim: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, 32, 4, 2, 1), nn.ReLU(),
                                  nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(flat + cond_dim, 256), nn.ReLU())
        self.mu, self.s = nn.Linear(256, latent), nn.Linear(256, latent)

    def forward(self, x, c=None):
        h = self.fc(_cat(self.conv(x), c))
        return self.mu(h), SIGMAS["softplus"](self.s(h))


class ConvDecoder(nn.Module):
    def __init__(self, channels: int, h4: int, w4: int, latent: int, cond_dim: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(latent + cond_dim, 256), nn.ReLU(),
                                nn.Linear(256, 64 * h4 * w4), nn.ReLU())
        self.deconv = nn.Sequential(nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                                    nn.ConvTranspose2d(32, channels, 4, 2, 1))
        self.shape = (64, h4, w4)

    def forward(self, z, c=None):
        return self.deconv(self.fc(_cat(z, c)).view(-1, *self.shape))


@ARCHS.register("conv")
def conv(image_shape, latent, cond_dim=0, dropout=0.0):
    """Small convnet: two stride-2 4x4 convolutions (32, 64 channels) and a 256-unit layer."""
    c, h, w = image_shape
    if h % 4 or w % 4:
        raise ArchError(f"arch 'conv' needs image height and width divisible by 4, got {h}x{w}; "
                        "use an MLP architecture (seed, kw, iwae, gated) for this dataset")
    return (ConvEncoder(c, 64 * (h // 4) * (w // 4), latent, cond_dim),
            ConvDecoder(c, h // 4, w // 4, latent, cond_dim))
