"""N compatible trials trained as one stacked model: each Linear layer of the N models becomes
one batched matmul (`baddbmm`) over stacked weights, and every other op runs once over the N
batches laid end to end as rows (the models are row-wise apart from their Linear layers). So a
step costs one pass of each op for N trials instead of N.

Trial i of a stack keeps everything a solo run has: its own batch order and binarization
(its seed's generator), its own reparameterisation noise (a generator holding what the global
random state of its solo run would hold), its own lr, beta, warm-up and weight decay in
`StackedAdam`, its own early stopping, divergence, checkpoints, resumable state (in the solo
format: a stacked trial resumes solo and back) and `on_epoch` callback. With dropout 0 it
reproduces its solo run's history to float tolerance. A trial that stops is taken out of the
stack, so it costs nothing more.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from bench import train
from bench.config import RunConfig
from bench.errors import ConfigError
from bench.evaluate import EVAL_SEED
from bench.models import create_model

# what trials of one stack must share: the models' structure, the data and the batching
STACK_FIELDS = ("model", "arch", "latent", "loss", "dropout", "k", "batch_size", "device", "optimizer")
UNSTACKABLE_ARCHS = {"conv"}   # convolutions are not row-wise: those trials train solo
UNSTACKABLE_LOSSES = {"gaussian"}  # its learned sigma is a parameter outside the Linear layers


def stack_key(cfg: RunConfig) -> tuple | None:
    """Trials with equal keys can share a stack; None: this trial always trains solo."""
    if cfg.arch in UNSTACKABLE_ARCHS or cfg.loss in UNSTACKABLE_LOSSES:
        return None
    return tuple(getattr(cfg, f) for f in STACK_FIELDS)


class StackedLinear(nn.Module):
    """N Linear layers as one: rows of trial i are the i-th block of len(x) / N rows."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([l.weight.detach().T for l in layers]).contiguous())
        self.bias = nn.Parameter(torch.stack([l.bias.detach() for l in layers]).unsqueeze(1).contiguous())

    def forward(self, x):
        n, _, out = self.weight.shape
        return torch.baddbmm(self.bias, x.reshape(n, -1, x.shape[-1]), self.weight).reshape(-1, out)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def stack_models(models: list[nn.Module]) -> nn.Module:
    """One model whose Linear layers hold the N models' weights; the rest is models[0]'s."""
    stacked = copy.deepcopy(models[0])
    for name in _linear_names(stacked):
        parent, _, leaf = name.rpartition(".")
        setattr(stacked.get_submodule(parent), leaf, StackedLinear([m.get_submodule(name) for m in models]))
    loose = [n for n, p in stacked.named_parameters() if not n.endswith((".weight", ".bias"))
             or not isinstance(stacked.get_submodule(n.rpartition(".")[0]), StackedLinear)]
    if loose:
        raise ConfigError(f"cannot stack a model with parameters outside its Linear layers ({loose[0]}); "
                          "train it with --stack 1")
    return stacked


@torch.no_grad()
def copy_out(stacked: nn.Module, i: int, model: nn.Module) -> nn.Module:
    """Trial i's weights from the stack into its own (solo) model."""
    for name in _linear_names(model):
        layer, source = model.get_submodule(name), stacked.get_submodule(name)
        layer.weight.copy_(source.weight[i].T)
        layer.bias.copy_(source.bias[i, 0])
    return model


def _solo_pairs(stacked: nn.Module, model: nn.Module):
    """(solo parameter, stacked parameter, transposed?) for each parameter, in solo order."""
    for name, p in model.named_parameters():
        layer, _, kind = name.rpartition(".")
        yield p, getattr(stacked.get_submodule(layer), kind), kind == "weight"


class StackedAdam:
    """Adam on stacked parameters (trial on dim 0) with per-trial lr and weight decay (L2, as
    torch's Adam), optionally AdamNormGrad's per-tensor gradient normalisation first. Its
    update on slice i equals torch.optim.Adam's on trial i's own parameters."""

    def __init__(self, params: list[nn.Parameter], lr: list[float], weight_decay: list[float],
                 normgrad: bool = False, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.normgrad, self.betas, self.eps = params, normgrad, betas, eps
        device = params[0].device
        self.lr = torch.tensor(lr, dtype=torch.float64, device=device)
        self.weight_decay = torch.tensor(weight_decay, dtype=params[0].dtype, device=device)
        self.steps = torch.zeros(len(lr), dtype=torch.float64, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def _per_trial(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.steps += 1
        step_size = self.lr / (1 - b1 ** self.steps)
        bc2_sqrt = (1 - b2 ** self.steps).sqrt()
        decay = bool((self.weight_decay != 0).any())
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            g = p.grad
            if g is None:  # a head the loss does not use (the AE's sigma): torch's Adam skips it too
                continue
            if self.normgrad:
                g = g / self._per_trial(torch.linalg.vector_norm(g.flatten(1), dim=1) + 1e-7, g)
            if decay:
                g = g + self._per_trial(self.weight_decay, p) * p
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / self._per_trial(bc2_sqrt, v)).add_(self.eps)
            p.addcdiv_(m, denom * self._per_trial(1 / step_size, p), value=-1)

    def torch_state(self, i: int, stacked: nn.Module, model: nn.Module, cfg: RunConfig) -> dict:
        """Trial i's optimizer state as its solo run's torch Adam saves it."""
        opt = train._adam(list(model.parameters()), cfg, next(model.parameters()).device)
        index = {id(p): j for j, p in enumerate(self.params)}
        for p, source, transposed in _solo_pairs(stacked, model):
            j = index[id(source)]
            m, v = self.exp_avg[j][i], self.exp_avg_sq[j][i]
            opt.state[p] = {"step": torch.tensor(float(self.steps[i]), device=_step_device(opt, p)),
                            # contiguous: torch's fused Adam misreads a transposed view's strides
                            "exp_avg": (m.T if transposed else m).contiguous().clone(),
                            "exp_avg_sq": (v.T if transposed else v).contiguous().clone()}
        return opt.state_dict()

    @torch.no_grad()
    def load_torch_state(self, i: int, state: dict, stacked: nn.Module, model: nn.Module, cfg: RunConfig) -> None:
        opt = train._adam(list(model.parameters()), cfg, next(model.parameters()).device)
        opt.load_state_dict(state)
        index = {id(p): j for j, p in enumerate(self.params)}
        for p, source, transposed in _solo_pairs(stacked, model):
            if p not in opt.state:
                continue
            s, j = opt.state[p], index[id(source)]
            self.steps[i] = float(s["step"])
            self.exp_avg[j][i] = s["exp_avg"].T if transposed else s["exp_avg"]
            self.exp_avg_sq[j][i] = s["exp_avg_sq"].T if transposed else s["exp_avg_sq"]


def _step_device(opt, p) -> torch.device:
    fused = opt.param_groups[0].get("fused")
    return p.device if fused else torch.device("cpu")


@dataclass
class _Trial:
    """One trial's own state inside a stack: what its solo `fit` keeps in local variables."""

    cfg: RunConfig
    model: nn.Module
    order_gen: torch.Generator
    noise_gen: torch.Generator
    state_path: Path | None
    on_epoch: Callable | None
    on_saved: Callable | None
    epoch: int = 0
    best_value: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    history: list = field(default_factory=list)
    bad_epochs: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    resumed_from: int = 0
    last_save: float = field(default_factory=time.monotonic)
    outcome: train.TrainResult | Exception | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None or self.stopped_early or self.epoch >= self.cfg.epochs

    def rng(self, device) -> dict:
        states = {"torch": self.noise_gen.get_state() if device.type == "cpu" else torch.get_rng_state(),
                  "order": self.order_gen.get_state()}
        if device.type == "cuda":
            states["cuda"] = self.noise_gen.get_state()
        return states

    def set_rng(self, states: dict, device) -> None:
        self.order_gen.set_state(states["order"])
        self.noise_gen.set_state(states["cuda"] if device.type == "cuda" else states["torch"])


def fit_stack(cfgs: list[RunConfig], data, *, on_epoch: list[Callable | None] | None = None,
              checkpoint_dirs: list[str | Path | None] | None = None,
              on_saved: list[Callable | None] | None = None,
              state_every_s: float | None = None) -> list[train.TrainResult | Exception]:
    """Train the compatible `cfgs` (equal `stack_key`s) as one stack on `data`; return, per
    trial, its TrainResult or the exception that ended it alone (DivergedError, or what its
    `on_epoch` raised, such as optuna.TrialPruned). The arguments are those of `train.fit`,
    one per trial."""
    from bench.data import binarize_batch

    n_trials = len(cfgs)
    keys = {stack_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ConfigError("these trials cannot share a stack (they differ in " +
                          ", ".join(f for f in STACK_FIELDS if len({getattr(c, f) for c in cfgs}) > 1) +
                          " or use a conv arch or the gaussian loss); train them separately")
    every = train.STATE_EVERY_S if state_every_s is None else state_every_s
    on_epoch = on_epoch or [None] * n_trials
    on_saved = on_saved or [None] * n_trials
    checkpoint_dirs = checkpoint_dirs or [None] * n_trials
    device = train.resolve_device(cfgs[0].device)
    trials = []
    for cfg, callback, directory, saved_callback in zip(cfgs, on_epoch, checkpoint_dirs, on_saved):
        train.seed_everything(cfg.seed)  # as solo: the model's init, then its noise, from the seed
        model = create_model(cfg, data.image_shape, data.num_classes).to(device)
        noise = torch.Generator(device)
        noise.set_state(torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device))
        trials.append(_Trial(cfg, model, torch.Generator(device).manual_seed(cfg.seed), noise,
                             Path(directory) / train.STATE_FILE if directory is not None else None,
                             callback, saved_callback))
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    x_val, y_val = data.val.x.to(device), data.val.y.to(device)
    n, bs = len(x_train), cfgs[0].batch_size
    if n == 0:
        raise ConfigError(f"dataset {data.name!r} has no training images")
    steps = math.ceil(n / bs)
    saved_states = [train.load_state(t.state_path, t.cfg) if t.state_path is not None else None for t in trials]
    for t, saved in zip(trials, saved_states):
        if saved is not None:
            t.model.load_state_dict(saved["model"])
            t.set_rng(saved["rng"], device)
            t.best_value, t.best_epoch, t.best_state = saved["best_value"], saved["best_epoch"], saved["best_model"]
            t.history, t.bad_epochs, t.stopped_early = saved["history"], saved["bad_epochs"], saved["stopped_early"]
            t.epoch = t.resumed_from = saved["epoch"]
            t.seconds = saved["seconds"]
    selection, direction = train.selection_metric(trials[0].model)
    sign = 1.0 if direction == "maximize" else -1.0
    dynamic = data.binarize == "dynamic"
    conditional = trials[0].model.conditional
    variational = trials[0].model.variational
    latent = cfgs[0].latent
    k = cfgs[0].k if cfgs[0].model == "iwae" else 0

    def build(active: list[int], optimizer_states: dict[int, dict]):
        """The stack of the `active` trials, each with its weights and optimizer state."""
        stacked = stack_models([trials[i].model for i in active]).to(device)
        opt = StackedAdam(list(stacked.parameters()), [trials[i].cfg.lr for i in active],
                          [trials[i].cfg.weight_decay for i in active],
                          normgrad=cfgs[0].optimizer == "adamnormgrad")
        for j, i in enumerate(active):
            if i in optimizer_states:
                opt.load_torch_state(j, optimizer_states[i], stacked, trials[i].model, trials[i].cfg)
        return stacked, opt

    def save(i: int, stacked, opt, j: int) -> None:
        t = trials[i]
        if t.state_path is None:
            return
        copy_out(stacked, j, t.model)
        train.save_state(t.state_path, {"config": t.cfg.to_dict(), "epoch": t.epoch, "model": t.model.state_dict(),
                                        "optimizer": opt.torch_state(j, stacked, t.model, t.cfg),
                                        "rng": t.rng(device), "best_value": t.best_value,
                                        "best_epoch": t.best_epoch, "best_model": t.best_state,
                                        "history": t.history, "bad_epochs": t.bad_epochs,
                                        "stopped_early": t.stopped_early, "seconds": t.seconds})
        t.last_save = time.monotonic()
        if t.on_saved is not None:
            t.on_saved(t.epoch)

    active = [i for i, t in enumerate(trials) if not t.done]
    stacked, opt = build(active, {i: s["optimizer"] for i, s in enumerate(saved_states) if s is not None})
    while active:
        t0 = time.perf_counter()
        stacked.train()
        perms = torch.stack([torch.randperm(n, generator=trials[i].order_gen, device=device) for i in active])
        step_losses = torch.empty(steps, len(active), device=device)
        weights = [trials[i].cfg for i in active]
        for step in range(steps):
            idx = perms[:, step * bs:(step + 1) * bs]                      # (N, b)
            xb = x_train[idx]                                               # (N, b, ...)
            if dynamic:
                xb = torch.stack([binarize_batch(xb[j], trials[i].order_gen) for j, i in enumerate(active)])
            b = idx.shape[1]
            beta = torch.tensor([train.kl_weight(c, trials[i].epoch + 1, step / steps) for c, i in zip(weights, active)],
                                device=device, dtype=x_train.dtype).repeat_interleave(b)
            eps = None
            if variational:
                shape = (k, b, latent) if k else (b, latent)
                eps = torch.cat([torch.randn(shape, generator=trials[i].noise_gen, device=device, dtype=x_train.dtype)
                                 for i in active], dim=1 if k else 0)
            yb = y_train[idx].flatten() if conditional else None
            loss = stacked.terms(xb.flatten(0, 1), yb, beta, eps=eps)["loss"].view(len(active), b).mean(1)
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            step_losses[step] = loss.detach()
        train_losses = train.epoch_loss(step_losses, n, bs)
        train_seconds = time.perf_counter() - t0
        for j, i in enumerate(active):
            t = trials[i]
            t.epoch += 1
            try:
                _end_epoch(t, j, stacked, step_losses[:, j], float(train_losses[j]), train_seconds,
                           len(active), n, steps, selection, sign, x_val, y_val, device)
            except Exception as e:  # noqa: BLE001 - ends this trial alone (divergence, pruning)
                t.outcome = e
                continue
            if t.done or time.monotonic() - t.last_save >= every:
                save(i, stacked, opt, j)
        still = [i for i in active if not trials[i].done]
        if still != active and still:  # a smaller stack of the others, each with its state
            states = {i: opt.torch_state(j, stacked, copy_out(stacked, j, trials[i].model), trials[i].cfg)
                      for j, i in enumerate(active) if i in still}
            stacked, opt = build(still, states)
        active = still
    return [t.outcome if isinstance(t.outcome, Exception) else _result(t, x_train, y_train, device)
            for t in trials]


def _end_epoch(t: _Trial, j: int, stacked, step_losses, train_loss: float, seconds: float,
               width: int, n: int, steps: int, selection: str, sign: float, x_val, y_val, device) -> None:
    """What solo `fit` does after an epoch, for trial t (slice j of the stack)."""
    cfg, epoch = t.cfg, t.epoch
    train.check_step_losses(step_losses, cfg, epoch)
    model = copy_out(stacked, j, t.model)
    started = time.perf_counter()
    metrics = {"train/loss": train_loss, "kl_weight": train.kl_weight(cfg, epoch, 1.0),
               **train.validate(model, x_val, y_val, torch.Generator(device).manual_seed(EVAL_SEED + 1))}
    # the stack's training time is every trial's; each adds its own validation
    metrics.update(seconds=seconds + time.perf_counter() - started, samples_per_s=n / seconds, stack_size=width)
    t.seconds += metrics["seconds"]
    t.history.append({"epoch": epoch, **metrics})
    train.check_validation(metrics, selection, cfg, epoch, steps)
    value = sign * metrics[selection]
    if value > t.best_value:
        t.best_value, t.best_epoch, t.bad_epochs = value, epoch, 0
        t.best_state = copy.deepcopy(model.state_dict())
    else:
        t.bad_epochs += 1
    if epoch < cfg.warmup_epochs:
        t.bad_epochs = 0
    if t.on_epoch is not None:
        rng = t.rng(device), torch.get_rng_state()
        t.on_epoch(epoch, metrics, model)
        t.set_rng(rng[0], device)
        torch.set_rng_state(rng[1])
    if cfg.patience and t.bad_epochs >= cfg.patience:
        t.stopped_early = True


def _result(t: _Trial, x_train, y_train, device) -> train.TrainResult:
    model = t.model
    last_state = copy.deepcopy(model.state_dict()) if t.state_path is not None else None
    model.load_state_dict(t.best_state)
    if not model.variational:
        model.fit_prior(train.latents(model, x_train, y_train), seed=t.cfg.seed)
    model.eval()
    checkpoints = (train.save_checkpoints(t.state_path.parent, t.cfg, last_state, model.state_dict())
                   if t.state_path is not None else {})
    return train.TrainResult(model, t.history, t.best_epoch, train.selection_metric(model)[0], t.seconds,
                             str(device), t.stopped_early, checkpoints, resumed_from=t.resumed_from)
