"""The one flat configuration of a trial (nanoGPT-style): every field has a default and a
comment, is logged to MLflow as a param and saved beside the checkpoint, so a run is fully
described by it. Specs and the CLI only ever produce `RunConfig`s."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from bench.errors import ConfigError

BINARIZATIONS = ("none", "static", "dynamic")
WARMUP_SCHEDULES = ("step", "epoch")
OPTIMIZERS = ("adam", "adamnormgrad")


@dataclass(frozen=True)
class RunConfig:
    # what is trained, on what
    model: str = "vae"          # registry name: ae | vae | cvae | iwae
    arch: str = "seed"          # registry name: seed | kw | iwae | conv | gated
    loss: str = "bce"           # reconstruction likelihood, registry name (bench.losses)
    latent: int = 32            # latent dimensions, >= 1
    dataset: str = "mnist5k"    # registry name (bench.data)
    binarize: str = "none"      # none | static (one seeded draw) | dynamic (fresh draw per batch)
    # objective
    beta: float = 1.0           # KL weight (beta-VAE); 1 gives the ELBO
    warmup_epochs: int = 0      # KL weight rises linearly from 0 to beta over this many epochs
    warmup_schedule: str = "step"  # step: the weight rises every step; epoch: beta * epoch / warmup_epochs
                                   # held for the whole epoch (the VampPrior / Exemplar VAE code)
    k: int = 1                  # importance samples per image in the training bound (iwae)
    # optimisation
    lr: float = 1e-3            # Adam learning rate
    optimizer: str = "adam"     # adam | adamnormgrad (each gradient scaled to unit L2 norm first,
                                # as the VampPrior / Exemplar VAE code's AdamNormGrad)
    weight_decay: float = 0.0   # Adam weight decay
    batch_size: int = 64
    epochs: int = 10
    patience: int = 0           # early stopping after this many epochs without a better val/elbo; 0 = off
    dropout: float = 0.1        # dropout rate of architectures that use it (seed: keep_prob 0.9)
    seed: int = 0               # seeds torch, numpy and the batch order; same seed, same numbers on CPU
    device: str = "auto"        # auto | cpu | cuda | cuda:N | mps
    # evaluation
    eval_k: int = 5000          # importance samples for test/nll (5000 as in the papers)
    eval_n: int = 0             # test images used for test/nll; 0 = the whole test set
    quality_n: int = 10000      # samples for the sample-quality metrics (test/fd, ...); 0 = off

    def __post_init__(self) -> None:
        for name in ("latent", "batch_size", "epochs", "k", "eval_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_epochs", "patience", "eval_n", "quality_n", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.quality_n == 1:  # one sample has no covariance: the Frechet distance fails
            raise ConfigError("quality_n must be 0 (off) or at least 2, got 1: the Frechet distance needs "
                              "the covariance of 2 or more samples")
        if self.seed >= 2**32:  # numpy's and Optuna's samplers take seeds below 2**32
            raise ConfigError(f"seed must be below 2**32 = 4294967296, got {self.seed}")
        if not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name in ("beta", "weight_decay"):  # nan passed `< 0` and trained to a misleading divergence
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name, allowed in (("binarize", BINARIZATIONS), ("warmup_schedule", WARMUP_SCHEDULES),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def replace(self, **changes) -> "RunConfig":
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(field_names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        return cls().replace(**values)


def config_changes(saved: dict, cfg: RunConfig) -> dict[str, tuple]:
    """{field: (saved value, cfg's value)} where a saved config differs from `cfg`. A field the
    saved one lacks (added to RunConfig since) counts as its default: defaults of new fields
    keep the old behaviour, so old runs, specs and saved states stay comparable."""
    defaults = RunConfig().to_dict()
    return {k: (saved.get(k, defaults[k]), v) for k, v in cfg.to_dict().items() if saved.get(k, defaults[k]) != v}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def field_types() -> dict[str, type]:
    """Python type of each field (int, float or str), for specs and CLI parsing."""
    return {f.name: type(f.default) for f in dataclasses.fields(RunConfig)}
