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
from bench.train import STATE_FILE, TrainResult, fit, load_state, resolve_device, seed_everything

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
    """Epochs at which pictures are logged: first, last and about four between (slider steps);
    step 0 holds the initial model's and the step after the last the best model's."""
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


def check_config(cfg: RunConfig, data) -> torch.nn.Module:
    """Fail on an impossible config before anything is written; returns the model it built on
    CPU, seeded as `fit` seeds it, so it is the very model training starts from."""
    resolve_device(cfg.device)
    seed_everything(cfg.seed)
    return create_model(cfg, data.image_shape, data.num_classes)


class TrackedTrial:
    """One trial's MLflow run around its training: opened (or reopened to resume) before the
    trainer starts, fed by the trainer's callbacks, then finished with the test metrics and
    the model, or ended with the reason it stopped. Epoch metrics and pictures reach MLflow
    only once the training state that produced them is saved, so a resumed run never logs an
    epoch twice."""

    def __init__(self, cfg: RunConfig, data, *, client, exp_id: str, run_name: str, results: str | Path,
                 parent_run_id: str | None = None, tags: dict | None = None,
                 on_epoch: Callable | None = None, log_images: bool = True, resume_run_id: str | None = None):
        initial = check_config(cfg, data)
        self.cfg, self.data, self.client, self.results = cfg, data, client, Path(results)
        self.on_epoch, self.log_images = on_epoch, log_images
        run_tags = {"vaebench.dataset": data.name, "vaebench.binarize": data.binarize,
                    "vaebench.data_source": data.source, "vaebench.training_objective": training_objective(cfg),
                    **(tags or {})}
        if resume_run_id:
            self.run_id = resume_run_id
            tracking.reopen_run(client, self.run_id, {k: str(v) for k, v in run_tags.items()})
        else:
            self.run_id = tracking.start_trial_run(client, exp_id, cfg, run_name=run_name,
                                                   parent_run_id=parent_run_id, tags=run_tags)
        self.checkpoint_dir = self.results / "checkpoints" / self.run_id
        self.steps = image_steps(cfg.epochs)
        self.pending_metrics: dict[int, dict] = {}
        self.pending_images: list[tuple[str, object, int]] = []
        try:
            if resume_run_id:
                _log_missing_epochs(client, self.run_id, cfg, self.checkpoint_dir)
            else:
                tracking.log_dataset(client, self.run_id, data)
                if log_images:  # step 0: the model before training, where MLflow's image cards open
                    for key, image in pictures(initial, data, seed=cfg.seed).items():
                        tracking.log_image(client, self.run_id, key, image, step=0)
        except BaseException as e:
            self.fail(e)
            raise

    def after_epoch(self, epoch: int, metrics: dict, model) -> None:
        self.pending_metrics[epoch] = metrics
        if self.log_images and epoch in self.steps:
            self.pending_images.extend((key, image, epoch) for key, image in
                                       pictures(model, self.data, seed=self.cfg.seed).items())
        if self.on_epoch is not None:
            self.on_epoch(epoch, metrics, model)

    def flush(self, epoch: int | None = None) -> None:
        tracking.log_steps(self.client, self.run_id, dict(self.pending_metrics))
        for key, image, step in self.pending_images:
            tracking.log_image(self.client, self.run_id, key, image, step=step)
        self.pending_metrics.clear()
        self.pending_images.clear()

    def finish(self, result: TrainResult) -> TrialOutcome:
        """Evaluate the best model on the test split, log everything, end the run FINISHED."""
        try:
            return self._finish(result)
        except BaseException as e:
            self.fail(e)
            raise

    def _finish(self, result: TrainResult) -> TrialOutcome:
        cfg, data, client, run_id = self.cfg, self.data, self.client, self.run_id
        tracking.set_tags(client, run_id, {"vaebench.device": tracking.device_name(result.device),
                                           "vaebench.best_epoch": result.best_epoch,
                                           "vaebench.selection": result.selection,
                                           **({"vaebench.resumed_from_epoch": result.resumed_from}
                                              if result.resumed_from else {})})
        model = result.model
        test_x, test_y = data.test.x.to(result.device), data.test.y.to(result.device)
        evaluation = evaluate(model, test_x, test_y, k=cfg.eval_k, nll_n=cfg.eval_n, binary_data=data.binary,
                              data=data, cache_dir=self.results / "cache", quality_n=cfg.quality_n)
        last = result.history[-1]["epoch"]
        tracking.log_metrics(client, run_id, {**evaluation.prefixed("test"), "trial_seconds": result.seconds,
                                              "best_epoch": result.best_epoch}, step=last)
        tracking.set_tags(client, run_id, {"vaebench.proper_density": str(evaluation.proper_density).lower(),
                                           "vaebench.nll_k": cfg.eval_k})
        if evaluation.kl_per_dim:
            tracking.log_json(client, run_id, "metrics/kl_per_dim.json", evaluation.kl_per_dim)
        if self.log_images:  # the best model's pictures at the final step
            for key, image in pictures(model, data, seed=cfg.seed).items():
                tracking.log_image(client, run_id, key, image, step=last + 1)
        tracking.log_model(client, run_id, model.cpu(), cfg, data.image_shape, data.num_classes)
        tracking.end_run(client, run_id, "FINISHED")
        (self.checkpoint_dir / STATE_FILE).unlink(missing_ok=True)  # best.pt and last.pt stay
        return TrialOutcome(run_id, result, evaluation)

    def fail(self, e: BaseException, stop_exceptions: tuple = ()) -> None:
        """End the run for what stopped the trial: KILLED when pruned (a `stop_exceptions`) or
        interrupted, FAILED with the reason on divergence or error. Never raises."""
        client, run_id = self.client, self.run_id
        if isinstance(e, stop_exceptions):
            tracking.quietly(self.flush)
            tracking.quietly(tracking.set_tags, client, run_id, {"vaebench.state": "PRUNED"})
            tracking.quietly(tracking.end_run, client, run_id, "KILLED", f"pruned: {e}")
        elif isinstance(e, KeyboardInterrupt):
            tracking.quietly(tracking.end_run, client, run_id, "KILLED", "interrupted by the user")
        elif isinstance(e, DivergedError):
            tracking.quietly(self.flush)
            tracking.quietly(tracking.set_tags, client, run_id, {"vaebench.state": "DIVERGED"})
            tracking.quietly(tracking.end_run, client, run_id, "FAILED", str(e))
        else:
            tracking.quietly(tracking.end_run, client, run_id, "FAILED", f"{type(e).__name__}: {e}")


def run_tracked(cfg: RunConfig, data, *, client, exp_id: str, run_name: str, results: str | Path,
                parent_run_id: str | None = None, tags: dict | None = None,
                on_epoch: Callable | None = None, stop_exceptions: tuple = (),
                progress: bool | None = None, log_images: bool = True,
                resume_run_id: str | None = None) -> TrialOutcome:
    """Train and evaluate `cfg` inside a new MLflow run (or continue `resume_run_id`, whose
    saved training state is picked up) and return the outcome (see TrackedTrial). `on_epoch`
    may raise one of `stop_exceptions` to prune: the run ends KILLED and the error is raised."""
    trial = TrackedTrial(cfg, data, client=client, exp_id=exp_id, run_name=run_name, results=results,
                         parent_run_id=parent_run_id, tags=tags, on_epoch=on_epoch, log_images=log_images,
                         resume_run_id=resume_run_id)
    try:
        result = fit(cfg, data, on_epoch=trial.after_epoch, progress=progress,
                     checkpoint_dir=trial.checkpoint_dir, on_saved=trial.flush)
    except BaseException as e:
        trial.fail(e, stop_exceptions)
        raise
    return trial.finish(result)


def run_tracked_stack(trials: list[TrackedTrial], stop_exceptions: tuple = ()) -> list[TrialOutcome | Exception]:
    """Train opened trials as one stack (bench.stack) and finish each: per trial its outcome,
    or the exception that ended it alone (its run ended accordingly). Ctrl-C ends them all."""
    from bench.stack import fit_stack

    try:
        results = fit_stack([t.cfg for t in trials], trials[0].data, on_epoch=[t.after_epoch for t in trials],
                            checkpoint_dirs=[t.checkpoint_dir for t in trials], on_saved=[t.flush for t in trials])
    except BaseException as e:
        for t in trials:
            t.fail(e, stop_exceptions)
        raise
    outcomes: list[TrialOutcome | Exception] = []
    for t, result in zip(trials, results):
        if isinstance(result, Exception):
            t.fail(result, stop_exceptions)
            outcomes.append(result)
            continue
        try:
            outcomes.append(t.finish(result))
        except Exception as e:  # noqa: BLE001 - this trial's evaluation or logging failed, not the others'
            outcomes.append(e)
    return outcomes


def _log_missing_epochs(client, run_id: str, cfg: RunConfig, checkpoint_dir: Path) -> None:
    """Epochs of the saved state that a kill kept from reaching MLflow (saved, not yet logged)."""
    saved = load_state(checkpoint_dir / STATE_FILE, cfg)
    if saved is None:
        return
    logged = tracking.last_step(client, run_id, "train/loss")
    tracking.log_steps(client, run_id, {row["epoch"]: {k: v for k, v in row.items() if k != "epoch"}
                                        for row in saved["history"] if row["epoch"] > logged})
