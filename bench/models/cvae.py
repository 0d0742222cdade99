"""Conditional VAE (Sohn et al. 2015): the one-hot label is concatenated to the encoder input
and to z, as in the seed. Its ELBO and NLL are conditional on the true label."""

import torch.nn.functional as F

from bench.errors import ConfigError
from bench.models.vae import VAE
from bench.registry import MODELS


@MODELS.register("cvae")
class CVAE(VAE):
    """CVAE: a VAE of p(x|y) with the one-hot label fed to encoder and decoder."""

    conditional = True

    def condition(self, y):
        if y is None:
            raise ConfigError("a cvae needs labels: pass y (a dataset with labels)")
        return F.one_hot(y, self.num_classes).to(next(self.parameters()).dtype)
