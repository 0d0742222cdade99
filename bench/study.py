"""Where a spec's Optuna study lives and how it is opened: its storage and tracking locations
(the spec, else a flag, else the environment, else sqlite under results/), its sampler and
pruner, and the spec it was queued from. Shared by the coordinator (`bench.sweep`) and the
workers (`bench.worker`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna

from bench import locations
from bench.data import auto_dataset
from bench.errors import StudyError
from bench.queue import CELL
from bench.spec import StudySpec

SPEC_HASH = "spec_sha256"
# a coordinator hands its worker processes the two URLs here, never on a command line
WORKER_STORAGE_ENV, WORKER_TRACKING_ENV = "VAEBENCH_WORKER_STORAGE", "VAEBENCH_WORKER_TRACKING_URI"



def storage_url(spec: StudySpec, results: str | Path, storage: str | None = None) -> str:
    """--storage, else the spec's, else $VAEBENCH_STORAGE, else sqlite under `results`."""
    return storage or spec.storage or locations.default_storage(results)


def tracking_uri(spec: StudySpec, results: str | Path, uri: str | None = None) -> str:
    """--tracking-uri, else the spec's, else $VAEBENCH_TRACKING_URI, else sqlite under `results`."""
    return uri or spec.tracking_uri or locations.default_tracking(results)


def sampler(spec: StudySpec, trial: int | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded by its first seed and, for a trial about to sample, by that
    trial's number: workers that each seeded theirs alike drew the same values in parallel (a
    search on 2 workers trained every configuration twice) and again after a resume."""
    name = spec.search.sampler if spec.search else "random"
    seed = spec.seeds[0] if trial is None else int(np.random.SeedSequence([spec.seeds[0], trial]).generate_state(1)[0])
    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed)}[name]()


def pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    name = spec.search.pruner if spec.search else "none"
    return {"median": lambda: CellPruner(optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs),
            "none": optuna.pruners.NopPruner}[name]()


class CellPruner(optuna.pruners.BasePruner):
    """`inner`, judging a trial against the trials of its own cell only: one Optuna study holds
    every cell of a grid search, and a vae's trials were pruned against an ae's (a cell was lost)."""

    def __init__(self, inner: optuna.pruners.BasePruner):
        self.inner = inner

    def prune(self, study: optuna.Study, trial) -> bool:
        return self.inner.prune(_OneCell(study, trial.user_attrs.get(CELL)), trial)


class _OneCell:
    """The study as a pruner reads it (its trials, direction), narrowed to the trials of `cell`."""

    def __init__(self, study: optuna.Study, cell: str | None):
        self._study, self._cell = study, cell

    def get_trials(self, deepcopy: bool = True, states=None) -> list:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if t.user_attrs.get(CELL) == self._cell]

    def __getattr__(self, name):
        return getattr(self._study, name)


def open_study(spec: StudySpec, storage, create: bool) -> optuna.Study:
    kwargs = dict(study_name=spec.name, storage=storage, sampler=sampler(spec), pruner=pruner(spec))
    if create:
        return optuna.create_study(direction=spec.direction, load_if_exists=True, **kwargs)
    try:
        return optuna.load_study(**kwargs)
    except KeyError:
        raise StudyError(f"no study {spec.name!r} in this storage yet: run `bench sweep SPEC` once "
                         "(it creates the study and queues its cells), then start workers") from None


def resolve(spec: StudySpec) -> StudySpec:
    return spec.with_dataset(auto_dataset()) if spec.dataset == "auto" else spec
