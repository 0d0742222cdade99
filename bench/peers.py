"""pythae 0.1.2 as the peer `bench perf` measures against (optional extra `peers`).

The same seed net, with the same weights, runs inside pythae's own VAE: our encoder's body
and heads give pythae's (embedding, log_covariance), our decoder's logits its sigmoid
`reconstruction`, so pythae's training loop and its `get_nll` estimator do the work their own
way (DataLoader batches, log-variance parameterisation, probabilities, per-image loops) on the
very network ours trains and scores. None when pythae is not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import tempfile
import time

import torch
from torch import nn


def available() -> bool:
    return importlib.util.find_spec("pythae") is not None


def pythae_vae(model: nn.Module, image_shape):
    """A pythae VAE (bce reconstruction) whose encoder and decoder are `model`'s own modules."""
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self, ours):
            super().__init__()
            self.ours = ours

        def forward(self, x):
            mu, sigma = self.ours(x)
            return ModelOutput(embedding=mu, log_covariance=2 * torch.log(sigma))

    class Decoder(BaseDecoder):
        def __init__(self, ours):
            super().__init__()
            self.ours = ours

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.ours(z)))

    config = VAEConfig(input_dim=tuple(image_shape), latent_dim=model.latent, reconstruction_loss="bce")
    return VAE(config, encoder=Encoder(model.encoder), decoder=Decoder(model.decoder))


def train_rate(model: nn.Module, x: torch.Tensor, lr: float, batch_size: int) -> float:
    """Training samples/s of one epoch of pythae's BaseTrainer.train_step on images x (its
    DataLoader, forward, loss, Adam step and per-step loss.item(); no progress bar)."""
    from pythae.data.datasets import BaseDataset
    from pythae.trainers import BaseTrainer, BaseTrainerConfig
    from pythae.trainers.training_callbacks import CallbackHandler, TrainingCallback

    for name in list(logging.root.manager.loggerDict):  # each pythae module logs at INFO itself
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.WARNING)
    peer = pythae_vae(model, x.shape[1:])
    with tempfile.TemporaryDirectory() as tmp:
        config = BaseTrainerConfig(output_dir=tmp, num_epochs=1, learning_rate=lr,
                                   per_device_train_batch_size=batch_size, no_cuda=True)
        trainer = BaseTrainer(peer, BaseDataset(x, torch.zeros(len(x))), training_config=config)
        trainer.prepare_training()
        trainer.callback_handler = CallbackHandler(callbacks=[TrainingCallback()], model=trainer.model)
        started = time.perf_counter()
        trainer.train_step(1)
        return len(x) / (time.perf_counter() - started)


@torch.no_grad()
def log_likelihood(model: nn.Module, x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(pythae's get_nll estimate of log p(x) per image with k importance samples, seconds):
    one call per image, as get_nll itself loops, so the two estimators can be paired."""
    peer = pythae_vae(model, x.shape[1:]).eval()
    started = time.perf_counter()
    values = torch.tensor([float(peer.get_nll(x[i:i + 1], n_samples=k, batch_size=min(k, 100)))
                           for i in range(len(x))], dtype=torch.float64)
    return values, time.perf_counter() - started


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Mean log p(x) of both estimators on the same images and their paired gap in nats, with
    the gap's standard error over images (Monte Carlo noise of both estimators)."""
    gap = ours.double() - theirs.double()
    se = float(gap.std()) / math.sqrt(len(gap)) if len(gap) > 1 else float("nan")
    return {"ours": float(ours.double().mean()), "pythae": float(theirs.double().mean()),
            "gap_nats": float(gap.mean()), "gap_se": se}
