"""One tracked trial: train, evaluate and log to MLflow. Shared by `bench train` (a single run)
and the sweep's workers (a run nested under the study's run). The trainer and evaluation stay
unaware of MLflow: this module wires their return values and callbacks to `tracking`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench import images, tracking
from bench.config import RunConfig
from bench.errors import DivergedError
from bench.evaluate import Evaluation, evaluate
from bench.models import create_model
from bench.registry import MODELS
from bench.train import STATE_FILE, TrainResult, fit, load_state, resolve_device

FIXED_EXAMPLES = 10  # test images shown in the recon/interpolation grids of every run


@dataclass
class TrialOutcome:
    run_id: str
    result: TrainResult
    evaluation: Evaluation

    @property
    def metrics(self) -> dict[str, float]:
        return self.evaluation.prefixed("test")


def training_objective(cfg: RunConfig) -> str:
    """The exact loss a run minimises, logged with it: no hidden weights (the model says)."""
    return MODELS.get(cfg.model).objective(cfg)


def image_steps(epochs: int) -> set[int]:
    """Epochs at which pictures are logged: first, last and about four between (slider steps)."""
    return {1, epochs, *range(max(1, epochs // 4), epochs + 1, max(1, epochs // 4))}


def pictures(model, data, seed: int = 0) -> dict:
    """The images of one step: samples, recon, interpolation, latent and (CVAE) class_grid."""
    x, y = data.test.x[:FIXED_EXAMPLES], data.test.y[:FIXED_EXAMPLES]
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    scale = max(1, 56 // data.image_shape[1])
    out = {"samples": images.samples_grid(model, n=64, seed=seed, scale=scale),
           "recon": images.reconstruction_grid(model, x, y, scale=scale),
           "interpolation": images.interpolation_grid(model, x, y, steps=10, scale=scale),
           "latent": images.latent_scatter(model, data.test.x[:1000].to(device), data.test.y[:1000].to(device))}
    if model.conditional:
        out["class_grid"] = images.class_grid(model, per_class=10, seed=seed, scale=scale)
    return out


def check_config(cfg: RunConfig, data) -> None:
    """Fail on an impossible config before anything is written (builds the model on CPU)."""
    resolve_device(cfg.device)
    create_model(cfg, data.image_shape, data.num_classes)


def run_tracked(cfg: RunConfig, data, *, client, exp_id: str, run_name: str, results: str | Path,
                parent_run_id: str | None = None, tags: dict | None = None,
                on_epoch: Callable | None = None, stop_exceptions: tuple = (),
                progress: bool | None = None, log_images: bool = True,
                resume_run_id: str | None = None) -> TrialOutcome:
    """Train and evaluate `cfg` inside a new MLflow run (or continue `resume_run_id`, whose
    saved training state is picked up) and return the outcome.

    The run ends FINISHED with test metrics and the model, FAILED with a reason tag on
    divergence or error, or KILLED when `on_epoch` raised one of `stop_exceptions` (pruning)
    or the user interrupted. Epoch metrics and pictures reach MLflow only once the training
    state that produced them is saved, so a resumed run never logs an epoch twice."""
    check_config(cfg, data)
    run_tags = {"vaebench.dataset": data.name, "vaebench.binarize": data.binarize,
                "vaebench.data_source": data.source, "vaebench.training_objective": training_objective(cfg),
                **(tags or {})}
    if resume_run_id:
        run_id = resume_run_id
        tracking.reopen_run(client, run_id, {k: str(v) for k, v in run_tags.items()})
    else:
        run_id = tracking.start_trial_run(client, exp_id, cfg, run_name=run_name, parent_run_id=parent_run_id,
                                          tags=run_tags)
    checkpoint_dir = Path(results) / "checkpoints" / run_id
    steps = image_steps(cfg.epochs)
    pending_metrics: dict[int, dict] = {}
    pending_images: list[tuple[str, object, int]] = []

    def after_epoch(epoch: int, metrics: dict, model) -> None:
        pending_metrics[epoch] = metrics
        if log_images and epoch in steps:
            pending_images.extend((key, image, epoch) for key, image in pictures(model, data, seed=cfg.seed).items())
        if on_epoch is not None:
            on_epoch(epoch, metrics, model)

    def flush(epoch: int | None = None) -> None:
        tracking.log_steps(client, run_id, dict(pending_metrics))
        for key, image, step in pending_images:
            tracking.log_image(client, run_id, key, image, step=step)
        pending_metrics.clear()
        pending_images.clear()

    try:
        if resume_run_id:
            _log_missing_epochs(client, run_id, cfg, checkpoint_dir)
        else:
            tracking.log_dataset(client, run_id, data)
        result = fit(cfg, data, on_epoch=after_epoch, progress=progress, checkpoint_dir=checkpoint_dir,
                     on_saved=flush)
        tracking.set_tags(client, run_id, {"vaebench.device": tracking.device_name(result.device),
                                           "vaebench.best_epoch": result.best_epoch,
                                           "vaebench.selection": result.selection,
                                           **({"vaebench.resumed_from_epoch": result.resumed_from}
                                              if result.resumed_from else {})})
        model = result.model
        test_x, test_y = data.test.x.to(result.device), data.test.y.to(result.device)
        evaluation = evaluate(model, test_x, test_y, k=cfg.eval_k, nll_n=cfg.eval_n, binary_data=data.binary,
                              data=data, cache_dir=Path(results) / "cache", quality_n=cfg.quality_n)
        last = result.history[-1]["epoch"]
        tracking.log_metrics(client, run_id, {**evaluation.prefixed("test"), "trial_seconds": result.seconds,
                                              "best_epoch": result.best_epoch}, step=last)
        tracking.set_tags(client, run_id, {"vaebench.proper_density": str(evaluation.proper_density).lower(),
                                           "vaebench.nll_k": cfg.eval_k})
        if evaluation.kl_per_dim:
            tracking.log_json(client, run_id, "metrics/kl_per_dim.json", evaluation.kl_per_dim)
        if log_images:  # the best model's pictures at the final step
            for key, image in pictures(model, data, seed=cfg.seed).items():
                tracking.log_image(client, run_id, key, image, step=last + 1)
        tracking.log_model(client, run_id, model.cpu(), cfg, data.image_shape, data.num_classes)
        tracking.end_run(client, run_id, "FINISHED")
        (checkpoint_dir / STATE_FILE).unlink(missing_ok=True)  # best.pt and last.pt stay
        return TrialOutcome(run_id, result, evaluation)
    except stop_exceptions as e:
        tracking.quietly(flush)
        tracking.quietly(tracking.set_tags, client, run_id, {"vaebench.state": "PRUNED"})
        tracking.quietly(tracking.end_run, client, run_id, "KILLED", f"pruned: {e}")
        raise
    except KeyboardInterrupt:
        tracking.quietly(tracking.end_run, client, run_id, "KILLED", "interrupted by the user")
        raise
    except DivergedError as e:
        tracking.quietly(flush)
        tracking.quietly(tracking.set_tags, client, run_id, {"vaebench.state": "DIVERGED"})
        tracking.quietly(tracking.end_run, client, run_id, "FAILED", str(e))
        raise
    except Exception as e:
        tracking.quietly(tracking.end_run, client, run_id, "FAILED", f"{type(e).__name__}: {e}")
        raise


def _log_missing_epochs(client, run_id: str, cfg: RunConfig, checkpoint_dir: Path) -> None:
    """Epochs of the saved state that a kill kept from reaching MLflow (saved, not yet logged)."""
    saved = load_state(checkpoint_dir / STATE_FILE, cfg)
    if saved is None:
        return
    logged = tracking.last_step(client, run_id, "train/loss")
    tracking.log_steps(client, run_id, {row["epoch"]: {k: v for k, v in row.items() if k != "epoch"}
                                        for row in saved["history"] if row["epoch"] > logged})
