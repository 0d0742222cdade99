"""A likelihood compiled into one fused pass (torch.compile), for evaluations big enough to pay
for the compile: an IWAE estimate at k = 5000 spends most of its time in the likelihood's
elementwise passes over k x D values per image, which eager torch runs one op at a time.

Measured 2026-12-03 on this 2-core CPU, one thread, k = 5000, seed net, 60-100 images, the
same NLL to 5 decimals: the seed's clamped Bernoulli 35-41 images/s compiled against 21-23 eager,
cbernoulli 25.8 vs 13.0, laplace 48.5 vs 31.6, mse 45.9 vs 36.5, gaussian 35.9 vs 29.4, `bce` (one
ATen kernel already) 32.7 vs 33.5, so it does not fuse (`Likelihood.fuses`). The compile costs 5-9 s
(less once inductor's disk cache holds it), so only evaluations of FUSE_ABOVE values or more
compile; smaller ones, CUDA (not measured) and machines where compiling fails (no C++ compiler)
run eager.
"""

from __future__ import annotations

import warnings

import torch

FUSE_ABOVE = 2**32  # values (images x k x D) of one evaluation: 1,100 images at k = 5000, ~50 s eager


def repeated(likelihood):
    """-log p(x|z) of each image's n decodings, given as n consecutive rows of `logits`."""
    def nll(logits: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        return likelihood(logits, x.repeat_interleave(n, 0))
    return nll


class Fused:
    """`repeated(likelihood)` through torch.compile, which fuses the repeat into the likelihood's
    one pass (dynamic shapes: one compile serves every chunk and batch size), falling back to
    eager, with one warning, if compiling fails."""

    def __init__(self, likelihood: torch.nn.Module):
        self.eager = repeated(likelihood)
        self.compiled = torch.compile(self.eager, dynamic=True)

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(logits, x, n)
            except Exception as error:  # noqa: BLE001 - any compile failure: the eager module is exact
                warnings.warn(f"torch.compile of the likelihood failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); evaluating eagerly", stacklevel=2)
                self.compiled = None
        return self.eager(logits, x, n)


def likelihood_for(model, values: int, device):
    """`repeated(model.likelihood)` as an evaluation of `values` values on `device` should run it."""
    if values >= FUSE_ABOVE and model.likelihood.fuses and torch.device(device).type == "cpu":
        return Fused(model.likelihood)
    return repeated(model.likelihood)
