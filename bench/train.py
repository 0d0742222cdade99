"""One trial: fit a model to a dataset and return its history. Never logs anywhere: the caller
passes `on_epoch` (tracking, pruning) and decides what to do with the result.

Data stays on the device as one tensor and is batched by a seeded index permutation: no
DataLoader per-batch overhead. Same config and seed give the same numbers on CPU.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.config import RunConfig, config_changes
from bench.errors import CheckpointError, ConfigError, DivergedError
from bench.evaluate import EVAL_SEED, elbo_terms, reconstruction_errors
from bench.locations import env_seconds
from bench.models import create_model

VAL_BATCH = 1000


@dataclass
class TrainResult:
    model: torch.nn.Module           # holds the best weights (by the selection metric)
    history: list[dict]              # one dict of metrics per epoch
    best_epoch: int
    selection: str                   # the metric that chose the best epoch
    seconds: float
    device: str
    stopped_early: bool = False
    checkpoints: dict[str, str] = field(default_factory=dict)
    resumed_from: int = 0            # the epoch a saved state resumed from (0: trained from scratch)


def resolve_device(name: str = "auto") -> torch.device:
    """cuda if available, else mps, else cpu; or exactly the device named."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def kl_weight(cfg: RunConfig, epoch: int, fraction: float = 0.0) -> float:
    """KL warm-up; epochs count from 1. `step`: beta * min(1, (epoch - 1 + fraction) / warmup),
    rising every step; `epoch`: beta * min(1, epoch / warmup) for the whole epoch, as the
    VampPrior / Exemplar VAE code sets it (1/100 in epoch 1, beta from epoch 100 on)."""
    if cfg.warmup_epochs <= 0:
        return cfg.beta
    progress = epoch if cfg.warmup_schedule == "epoch" else epoch - 1 + fraction
    return cfg.beta * min(1.0, progress / cfg.warmup_epochs)


def selection_metric(model) -> tuple[str, str]:
    """The validation metric that picks the best epoch and drives early stopping."""
    return ("val/elbo", "maximize") if model.variational else ("val/recon", "minimize")


@torch.no_grad()
def validate(model, x, y, generator: torch.Generator) -> dict[str, float]:
    """Validation metrics per image (nats): elbo/recon/kl for variational models, recon for
    all, and the loss-agnostic bce/mse."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for i in range(0, len(x), VAL_BATCH):
        xb, yb = x[i:i + VAL_BATCH], None if y is None else y[i:i + VAL_BATCH]
        terms = elbo_terms(model, xb, yb, generator) if model.variational else model.terms(xb, yb)
        sq, bce = reconstruction_errors(model, xb, yb)
        for name, t in {**terms, "mse": sq, "bce": bce}.items():
            sums[name] = sums.get(name, 0.0) + float(t.double().sum())
    model.train(was_training)
    out = {f"val/{k}": v / len(x) for k, v in sums.items() if k != "loss"}
    out["val/loss"] = out["val/recon"] + out.get("val/kl", 0.0)
    return out


def check_step_losses(step_losses: torch.Tensor, cfg: RunConfig, epoch: int) -> None:
    """DivergedError naming the first step of the epoch whose loss was not finite."""
    finite = torch.isfinite(step_losses)
    if not bool(finite.all()):
        step = int((~finite).nonzero()[0])
        raise DivergedError(f"training diverged: loss is {step_losses[step].item()} at epoch {epoch}, "
                            f"step {step + 1} of {len(step_losses)}; lower lr (now {cfg.lr:g}) or "
                            "use a bounded likelihood", epoch=epoch, step=step + 1)


def check_validation(metrics: dict, selection: str, cfg: RunConfig, epoch: int, steps: int) -> None:
    if not math.isfinite(metrics[selection]):
        raise DivergedError(f"training diverged: validation {selection} is {metrics[selection]} "
                            f"after epoch {epoch}; lower lr (now {cfg.lr:g}) or use a bounded "
                            "likelihood", epoch=epoch, step=steps)


def epoch_loss(step_losses: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    """The epoch's mean loss per image from per-step batch means (steps, ...): the last batch
    holds n - bs * (steps - 1) images."""
    sizes = torch.full((len(step_losses),), float(bs), device=step_losses.device, dtype=torch.float64)
    sizes[-1] = n - bs * (len(step_losses) - 1)
    return (step_losses.double() * sizes.view(-1, *[1] * (step_losses.dim() - 1))).sum(0) / n


def _adam(params, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the fused kernel where this torch has it for the device (measured faster)."""
    try:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def normalise_gradients(params: list[torch.Tensor]) -> None:
    """g <- g / (||g||_2 + 1e-7) per parameter tensor: AdamNormGrad's step before Adam's."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        norms = torch._foreach_norm(grads)
        torch._foreach_add_(norms, 1e-7)
        torch._foreach_div_(grads, norms)


def _progress_bar(enabled: bool | None, total: int, first: int):
    """A tqdm bar over the epochs on a terminal; a disabled one (prints nothing) otherwise."""
    from tqdm.auto import tqdm

    enabled = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, initial=first - 1, unit="epoch", disable=not enabled, leave=False,
                dynamic_ncols=True)


STATE_FILE = "state.pt"   # the whole training state, for resuming a killed trial
# written at most this often (and at the last epoch); the recovery tests set 0 (every epoch)
STATE_EVERY_S = env_seconds("VAEBENCH_STATE_EVERY_S", 30, float, minimum=0)


def _rng_states(device: torch.device, order_gen: torch.Generator) -> dict:
    states = {"torch": torch.get_rng_state(), "order": order_gen.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict, device: torch.device, order_gen: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    order_gen.set_state(states["order"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def save_state(path: Path, state: dict) -> None:
    """Write atomically (temp file, then rename), so a kill mid-write leaves the last state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, cfg: RunConfig) -> dict | None:
    """The saved state of `cfg`'s trial, or None when there is none or it belongs to another
    config (never resume across a changed config)."""
    if not path.exists():
        return None
    state = load_weights(path)
    return state if not config_changes(state.get("config", {}), cfg) else None


def fit(cfg: RunConfig, data, *, on_epoch: Callable[[int, dict, torch.nn.Module], None] | None = None,
        checkpoint_dir: str | Path | None = None, progress: bool | None = None,
        on_saved: Callable[[int], None] | None = None, state_every_s: float = STATE_EVERY_S) -> TrainResult:
    """Train `cfg` on `data` (a bench.data.Dataset) and return the history and best model.

    `on_epoch(epoch, metrics, model)` is called after each epoch; it may raise to stop the
    trial (for example optuna.TrialPruned); it cannot disturb training (the random state is
    restored after it). A NaN or infinite loss raises DivergedError.

    With `checkpoint_dir`, the whole training state (model, optimizer, random states, early
    stopping, history) is written to `state.pt` there every `state_every_s` seconds and at the
    end, then `on_saved(epoch)` is called; a later call with the same config and directory
    resumes from it and ends with exactly the numbers of an uninterrupted run."""
    from bench.data import binarize_batch

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = create_model(cfg, data.image_shape, data.num_classes).to(device)
    params = list(model.parameters())
    optimizer = _adam(params, cfg, device)
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    x_val, y_val = data.val.x.to(device), data.val.y.to(device)
    dynamic = data.binarize == "dynamic"
    order_gen = torch.Generator(device).manual_seed(cfg.seed)
    val_gen_seed = EVAL_SEED + 1
    n, bs = len(x_train), cfg.batch_size
    if n == 0:
        raise ConfigError(f"dataset {data.name!r} has no training images")
    steps = math.ceil(n / bs)
    selection, direction = selection_metric(model)
    sign = 1.0 if direction == "maximize" else -1.0
    best_value, best_epoch, best_state = -math.inf, 0, None
    history: list[dict] = []
    stopped_early, bad_epochs, first_epoch, elapsed = False, 0, 1, 0.0
    state_path = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
    saved = load_state(state_path, cfg) if state_path is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        _set_rng_states(saved["rng"], device, order_gen)
        best_value, best_epoch, best_state = saved["best_value"], saved["best_epoch"], saved["best_model"]
        history, bad_epochs, stopped_early = saved["history"], saved["bad_epochs"], saved["stopped_early"]
        first_epoch, elapsed = saved["epoch"] + 1, saved["seconds"]
    normgrad = cfg.optimizer == "adamnormgrad"
    bar = _progress_bar(progress, cfg.epochs, first_epoch)
    started = time.perf_counter() - elapsed
    last_save = time.monotonic()

    def save(epoch: int) -> None:
        nonlocal last_save
        if state_path is None:
            return
        save_state(state_path, {"config": cfg.to_dict(), "epoch": epoch, "model": model.state_dict(),
                                "optimizer": optimizer.state_dict(), "rng": _rng_states(device, order_gen),
                                "best_value": best_value, "best_epoch": best_epoch, "best_model": best_state,
                                "history": history, "bad_epochs": bad_epochs, "stopped_early": stopped_early,
                                "seconds": time.perf_counter() - started})
        last_save = time.monotonic()
        if on_saved is not None:
            on_saved(epoch)

    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            if stopped_early:
                break
            model.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=order_gen, device=device)
            # per-step losses stay on the device: no host sync per step, one check per epoch
            step_losses = torch.empty(steps, device=device)
            for step in range(steps):
                idx = perm[step * bs:(step + 1) * bs]
                xb = x_train[idx]
                if dynamic:
                    xb = binarize_batch(xb, order_gen)
                yb = y_train[idx] if model.conditional else None
                loss = model.terms(xb, yb, kl_weight(cfg, epoch, step / steps))["loss"].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if normgrad:
                    normalise_gradients(params)
                optimizer.step()
                step_losses[step] = loss.detach()
                if not bar.disable and step % 50 == 0:
                    bar.set_postfix_str(f"step {step + 1}/{steps} loss {loss.item():.2f}", refresh=True)
            check_step_losses(step_losses, cfg, epoch)
            train_seconds = time.perf_counter() - t0
            metrics = {"train/loss": float(epoch_loss(step_losses, n, bs)), "kl_weight": kl_weight(cfg, epoch, 1.0),
                       **validate(model, x_val, y_val, torch.Generator(device).manual_seed(val_gen_seed)),
                       "seconds": time.perf_counter() - t0, "samples_per_s": n / train_seconds}
            history.append({"epoch": epoch, **metrics})
            bar.update(1)
            bar.set_postfix_str(f"train/loss {metrics['train/loss']:.2f} {selection} {metrics[selection]:.2f} "
                                f"{metrics['samples_per_s']:,.0f} samples/s")
            check_validation(metrics, selection, cfg, epoch, steps)
            value = sign * metrics[selection]
            if value > best_value:
                best_value, best_epoch, bad_epochs = value, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
            if epoch < cfg.warmup_epochs:  # the bound is not comparable while beta still moves
                bad_epochs = 0
            if on_epoch is not None:
                rng = _rng_states(device, order_gen)
                on_epoch(epoch, metrics, model)
                _set_rng_states(rng, device, order_gen)
            if cfg.patience and bad_epochs >= cfg.patience:
                stopped_early = True
            if stopped_early or epoch == cfg.epochs or time.monotonic() - last_save >= state_every_s:
                save(epoch)
    finally:
        bar.close()
    last_state = copy.deepcopy(model.state_dict()) if checkpoint_dir is not None else None
    model.load_state_dict(best_state)
    if not model.variational:
        model.fit_prior(latents(model, x_train, y_train), seed=cfg.seed)
    model.eval()
    checkpoints = {}
    if checkpoint_dir is not None:
        checkpoints = save_checkpoints(Path(checkpoint_dir), cfg, last_state, model.state_dict())
    return TrainResult(model, history, best_epoch, selection, time.perf_counter() - started,
                       str(device), stopped_early, checkpoints, resumed_from=first_epoch - 1)


@torch.no_grad()
def latents(model, x, y=None, batch: int = VAL_BATCH) -> torch.Tensor:
    """Encoder means of x (the AE's code; E_q[z] for the others)."""
    model.eval()
    y = y if model.conditional else None
    return torch.cat([model.encode(x[i:i + batch], None if y is None else y[i:i + batch])[0]
                      for i in range(0, len(x), batch)])


def save_checkpoints(directory: Path, cfg: RunConfig, last: dict, best: dict) -> dict[str, str]:
    """best.pt and last.pt (state dicts) and config.json; loadable with weights_only=True."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(cfg.to_json())
    paths = {}
    for name, state in (("best", best), ("last", last)):
        path = directory / f"{name}.pt"
        torch.save(state, path)
        paths[name] = str(path)
    return paths


def load_checkpoint(path: str | Path, cfg: RunConfig, image_shape, num_classes: int):
    """A model rebuilt from the registry with weights from `path` (weights_only=True)."""
    model = create_model(cfg, image_shape, num_classes)
    model.load_state_dict(load_weights(path))
    return model.eval()


def load_weights(path: str | Path) -> dict:
    """A state dict from `path`, read with weights_only=True: a file holding anything but
    tensors and plain containers (a pickled payload that would run code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it is not a plain state dict "
                              f"({str(e).splitlines()[0][:200]}); only load checkpoints you trust") from None
