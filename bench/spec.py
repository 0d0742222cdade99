"""Study specs: a TOML file in experiments/ -> a validated, frozen `StudySpec`.

A study is data, not code (disentanglement_lib): [study] says what is measured and how often,
[grid] lists the axes whose cross product are the cells, the optional [search] runs an Optuna
search inside every cell, and [fixed] sets every other `RunConfig` field. Everything that can
be checked before training is checked here, so a bad spec fails in a second with one line that
names the file, the key and the fix, instead of an hour into a sweep.

    spec = load_spec("experiments/default.toml").with_dataset("mnist")  # "auto" resolved
    print(format_plan(spec, train_size=50_000))  # the dry run
    for cell in spec.cells():
        config = spec.config(cell)  # a RunConfig, ready to train
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench.config import BINARIZATIONS, RunConfig, field_names, field_types
from bench.errors import ConfigError, SpecError
from bench.registry import ARCHS, DATASETS, LOSSES, MODELS

# Per-epoch validation metrics a study may optimise -> the direction that is better.
OBJECTIVES: dict[str, str] = {
    "val/elbo": "maximize",   # nats per image; needs a variational model
    "val/loss": "minimize",   # the training objective (negative ELBO, or recon loss for ae)
    "val/recon": "minimize",  # reconstruction term of the model's own loss, nats per image
    "val/bce": "minimize",    # Bernoulli cross-entropy, nats per image: comparable across losses
    "val/mse": "minimize",    # squared error summed over pixels, per image
}
VARIATIONAL_OBJECTIVES = ("val/elbo",)  # an ae has no ELBO to report
SAMPLERS = ("tpe", "random", "cmaes")
PRUNERS = ("median", "hyperband", "none")
DISTRIBUTIONS = ("float", "int", "categorical")
# What the runner tries, in order, for dataset = "auto" (full MNIST if cached, else Debian's
# Fashion-MNIST, else the bundled mnist5k); checked here for labels when a CVAE is in the study.
AUTO_DATASETS = ("mnist", "fashion-mnist", "mnist5k")
TRIAL_OVERHEAD_S = 3.0  # evaluation and tracking per trial, for the dry-run estimate
EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"

TABLES = ("study", "grid", "search", "fixed")
STUDY_KEYS = ("name", "description", "dataset", "binarize", "seeds", "epochs", "objective",
              "direction", "storage", "tracking_uri", "time_budget_minutes")
SEARCH_KEYS = ("n_trials", "sampler", "pruner", "params")
DISTRIBUTION_KEYS = {"float": ("type", "low", "high", "log"),
                     "int": ("type", "low", "high", "log"),
                     "categorical": ("type", "choices")}
# RunConfig fields that are set once per study in [study], never per cell.
STUDY_ONLY = {"seed": "seeds = [0, 1, 2]", "epochs": "epochs = 10",
              "dataset": 'dataset = "mnist5k"', "binarize": 'binarize = "dynamic"'}
NAMED = {"model": MODELS, "loss": LOSSES, "arch": ARCHS, "dataset": DATASETS}
TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Distribution:
    """One searched RunConfig field: float/int in [low, high] (log-uniform if `log`), or one of
    `choices`."""

    name: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        """The value an Optuna `trial` samples for this field."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        suggest = trial.suggest_int if self.kind == "int" else trial.suggest_float
        return suggest(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name}: one of {', '.join(map(_format_value, self.choices))}"
        scale = ", log" if self.log else ""
        bounds = f"[{_format_value(self.low)}, {_format_value(self.high)}]"
        return f"{self.name}: {self.kind} in {bounds}{scale}"

    def to_dict(self) -> dict:
        if self.kind == "categorical":
            return {"type": self.kind, "choices": list(self.choices)}
        return {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class SearchSpec:
    """An Optuna search run inside every cell: `n_trials` trials per cell (a cell has one seed)."""

    params: tuple[Distribution, ...]
    n_trials: int
    sampler: str  # tpe | random | cmaes
    pruner: str   # median | hyperband | none

    def names(self) -> list[str]:
        return [p.name for p in self.params]


@dataclass(frozen=True)
class Cell:
    """One grid point with one seed: the unit a study trains (once, or `n_trials` times)."""

    index: int  # position in StudySpec.cells()
    params: tuple[tuple[str, object], ...]  # grid values in axis order, then ("seed", s)

    @property
    def key(self) -> str:
        """Stable name of the cell, e.g. "model=vae,loss=bce,latent=2,seed=0"; it finds the
        cell's Optuna study and MLflow runs again, so it depends only on the values."""
        return ",".join(f"{name}={_format_value(value)}" for name, value in self.params)

    @property
    def grid_key(self) -> str:
        """The key without the seed: the cells that differ only in seed share it ("seed=..."
        drops out; "" for a study without a grid)."""
        return ",".join(f"{name}={_format_value(value)}" for name, value in self.params
                        if name != "seed")

    @property
    def seed(self) -> int:
        return self.as_dict()["seed"]

    def as_dict(self) -> dict:
        return dict(self.params)


@dataclass(frozen=True)
class StudySpec:
    """A validated study. Build it with `load_spec` or `parse_spec`, never by hand."""

    name: str
    description: str
    dataset: str      # a dataset name or "auto" (resolved by the runner, see AUTO_DATASETS)
    binarize: str
    seeds: tuple[int, ...]
    epochs: int
    objective: str    # a key of OBJECTIVES
    direction: str    # maximize | minimize
    storage: str      # Optuna storage URL; "" = the runner's default
    tracking_uri: str  # MLflow tracking URI; "" = the runner's default
    time_budget_minutes: float | None
    grid: tuple[tuple[str, tuple], ...]  # axis -> values, in file order
    search: SearchSpec | None
    fixed: tuple[tuple[str, object], ...]
    path: str    # the spec file; "" when parsed from a dict
    sha256: str  # of the file's bytes; of a canonical JSON dump when parsed from a dict
    # epochs per dataset when [study] epochs is a table such as {mnist5k = 30, fashion-mnist = 3}
    # (a time budget that holds whichever dataset "auto" picks); `epochs` is then this dataset's
    epochs_by_dataset: tuple[tuple[str, int], ...] = ()

    @property
    def trials_per_cell(self) -> int:
        return self.search.n_trials if self.search else 1

    def cells(self) -> list[Cell]:
        """The grid's cross product times the seeds, seed varying slowest: every grid point runs
        with the first seed before any runs with the second, so a study cut short still covers
        the whole grid. Without a [grid], one cell per seed."""
        axes = [name for name, _ in self.grid]
        points = list(itertools.product(*(values for _, values in self.grid)))
        cells: list[Cell] = []
        for seed in self.seeds:
            for point in points:
                cells.append(Cell(len(cells), (*zip(axes, point), ("seed", seed))))
        return cells

    def cell(self, key: str) -> Cell:
        """The cell whose `key` is `key` (e.g. read back from an Optuna study or MLflow run)."""
        for cell in self.cells():
            if cell.key == key:
                return cell
        raise SpecError(f"no cell {key!r} in study {self.name!r} ({_label(self.path)}): "
                        f"the spec changed since that run; list the cells with a dry run")

    def config(self, cell: Cell, dataset: str | None = None, **sampled) -> RunConfig:
        """The RunConfig of one trial: RunConfig defaults < [fixed] < [study] dataset, binarize
        and epochs < the cell's grid values and seed < `sampled` search values. `dataset`
        replaces "auto" once the runner has resolved it."""
        dataset = dataset or self.dataset
        if dataset == "auto":
            raise SpecError(f"dataset is 'auto' in study {self.name!r}: resolve it first and pass "
                            f"config(cell, dataset=NAME) or use spec.with_dataset(NAME)")
        if dataset not in DATASETS:
            raise SpecError(DATASETS.unknown_message(dataset))
        searched = self.search.names() if self.search else []
        unknown = sorted(set(sampled) - set(searched))
        if unknown:
            raise SpecError(f"sampled value(s) {', '.join(unknown)} are not searched in study "
                            f"{self.name!r}: searched are {', '.join(searched) or 'none'}")
        types = field_types()
        sampled = {k: float(v) if types[k] is float else v for k, v in sampled.items()}
        return _run_config(self, cell, dataset, sampled, _label(self.path))

    def with_dataset(self, name: str) -> StudySpec:
        """The same study on dataset `name` (how the runner resolves "auto"); revalidated, and
        `sha256` kept: it still identifies the spec file."""
        return dataclasses.replace(override(self, dataset=name), sha256=self.sha256)

    def to_dict(self) -> dict:
        """The spec as the dict `parse_spec` reads (defaults filled in)."""
        study = {"name": self.name, "description": self.description, "dataset": self.dataset,
                 "binarize": self.binarize, "seeds": list(self.seeds),
                 "epochs": dict(self.epochs_by_dataset) if self.epochs_by_dataset else self.epochs,
                 "objective": self.objective, "direction": self.direction,
                 "storage": self.storage, "tracking_uri": self.tracking_uri}
        if self.time_budget_minutes is not None:
            study["time_budget_minutes"] = self.time_budget_minutes
        data: dict = {"study": study}
        if self.grid:
            data["grid"] = {name: list(values) for name, values in self.grid}
        if self.search:
            data["search"] = {"n_trials": self.search.n_trials, "sampler": self.search.sampler,
                              "pruner": self.search.pruner,
                              "params": {p.name: p.to_dict() for p in self.search.params}}
        if self.fixed:
            data["fixed"] = dict(self.fixed)
        return data


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file. A bare name such as "smoke" means experiments/smoke.toml."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:
        path = EXPERIMENTS_DIR / f"{path}.toml"
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml")))
        raise SpecError(f"spec file {str(path)!r} not found: check the path "
                        f"(shipped specs in {EXPERIMENTS_DIR}: {shipped or 'none'})") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise SpecError(f"cannot read spec file {str(path)!r}: {reason}; "
                        f"give the path of a readable UTF-8 TOML file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"TOML syntax error in {path.name}: {error}; fix that line") from None
    return _parse(data, path.name, str(path), hashlib.sha256(raw).hexdigest())


def parse_spec(data: dict, source: str = "<dict>") -> StudySpec:
    """Validate a spec given as a dict (as `tomllib` returns it); `source` names it in errors."""
    return _parse(data, source, "", _canonical_sha256(data))


def override(spec: StudySpec, **study_fields) -> StudySpec:
    """`spec` with [study] fields replaced, e.g. override(spec, epochs=1, seeds=[0]) from the
    command line; revalidated. `sha256` becomes that of the changed spec, which no longer is the
    file's study. Changing the objective alone lets the direction default again."""
    data = spec.to_dict()
    if "objective" in study_fields and "direction" not in study_fields:
        del data["study"]["direction"]
    data["study"].update(study_fields)
    label = f"{_label(spec.path)} with overrides"
    return _parse(data, label, spec.path, _canonical_sha256(data))


def format_plan(spec: StudySpec, *, train_size: int | None = None,
                samples_per_s: float = 10_000, workers: int = 1,
                overhead_s: float = TRIAL_OVERHEAD_S) -> str:
    """The dry run: every cell the study would train, how many trials, and an estimate of the
    time, cells x trials x epochs x train_size / (samples_per_s x workers) plus `overhead_s` per
    trial for evaluation and tracking. `train_size` defaults to the dataset's "train_size" meta."""
    cells = spec.cells()
    trials = spec.trials_per_cell
    runs = len(cells) * trials
    lines = [f"study {spec.name!r} ({_label(spec.path)}, sha256 {spec.sha256[:12]})"]
    if spec.description:
        lines.append(f"  {spec.description}")
    lines.append(f"dataset {spec.dataset}, binarize {spec.binarize}, epochs {spec.epochs}, "
                 f"seeds {', '.join(map(str, spec.seeds))}, "
                 f"objective {spec.objective} ({spec.direction})")
    if spec.fixed:
        lines.append("fixed: " + ", ".join(f"{k}={_format_value(v)}" for k, v in spec.fixed))
    if spec.search:
        lines.append(f"search: {trials} trials per cell, {spec.search.sampler} sampler, "
                     f"{spec.search.pruner} pruner")
        lines.extend(f"  {p.describe()}" for p in spec.search.params)
    lines.append("")
    lines.extend(_format_table(["#", *(name for name, _ in spec.grid), "seed"],
                        [[c.index, *(v for _, v in c.params)] for c in cells]))
    lines.append("")
    points = len(cells) // len(spec.seeds)
    lines.append(f"{_plural(len(cells), 'cell')} ({_plural(points, 'grid point')} x "
                 f"{_plural(len(spec.seeds), 'seed')}) x {_plural(trials, 'trial')} = "
                 f"{_plural(runs, 'run')}")
    if train_size is None and spec.dataset in DATASETS:
        train_size = DATASETS.meta(spec.dataset).get("train_size")
    if train_size is None:
        lines.append(f"estimated time: unknown; pass train_size, the number of training "
                     f"images of dataset {spec.dataset!r}")
        return "\n".join(lines)
    seconds = (runs * spec.epochs * train_size / (samples_per_s * workers)
               + runs * overhead_s / workers)
    lines.append(f"estimated time: about {_format_duration(seconds)} = {_plural(runs, 'run')} x "
                 f"{_plural(spec.epochs, 'epoch')} x {train_size:,} images / "
                 f"({samples_per_s:,.0f} images/s x {_plural(workers, 'worker')}) + "
                 f"{overhead_s:g} s per run; an estimate, not a measurement")
    budget = spec.time_budget_minutes
    if budget is not None and seconds > budget * 60:
        lines.append(f"warning: the estimate ({_format_duration(seconds)}) exceeds "
                     f"time_budget_minutes = {budget:g}: use fewer epochs, cells or seeds, "
                     f"or more workers")
    return "\n".join(lines)


# --- parsing ---------------------------------------------------------------------------------

def _parse(data: dict, file: str, path: str, sha256: str) -> StudySpec:
    if not isinstance(data, dict):
        raise SpecError(f"{file} is not a table of tables: write [study], [grid], [search] "
                        f"and [fixed] tables")
    for key in data:
        if key not in TABLES:
            raise SpecError(f"unknown table {key!r} in {file}: {_suggest(key, TABLES)}")
    study = _table(data, "study", file)
    if study is None:
        raise SpecError(f"missing [study] in {file}: add [study] with at least name = \"...\"")
    _check_study_keys(study, file)
    grid = _parse_grid(_table(data, "grid", file) or {}, file)
    search = _parse_search(_table(data, "search", file), file)
    fixed = _parse_fixed(_table(data, "fixed", file) or {}, file)
    _check_disjoint(grid, search, fixed, file)

    name = _study_value(study, "name", str, file, required=True)
    if not name.strip():
        raise SpecError(f"empty name in [study] of {file}: name the study, e.g. name = \"default\"")
    dataset = _study_value(study, "dataset", str, file, default="auto")
    if dataset != "auto" and dataset not in DATASETS:
        raise SpecError(f"[study] dataset of {file}: {DATASETS.unknown_message(dataset)}")
    binarize = _study_value(study, "binarize", str, file, default="none")
    if binarize not in BINARIZATIONS:
        raise SpecError(f"unknown binarize {binarize!r} in [study] of {file}: "
                        f"use one of {', '.join(BINARIZATIONS)}")
    objective = _study_value(study, "objective", str, file, default="val/elbo")
    if objective not in OBJECTIVES:
        known = ", ".join(f"{name} ({direction})" for name, direction in OBJECTIVES.items())
        raise SpecError(f"unknown objective {objective!r} in [study] of {file}: use one of "
                        f"{known}")
    direction = _study_value(study, "direction", str, file, default=OBJECTIVES[objective])
    if direction not in ("maximize", "minimize"):
        raise SpecError(f"unknown direction {direction!r} in [study] of {file}: "
                        f"use maximize or minimize")
    if direction != OBJECTIVES[objective]:
        raise SpecError(f"direction = {direction!r} contradicts objective {objective!r} in "
                        f"[study] of {file}: {objective} is better when it is "
                        f"{'higher' if OBJECTIVES[objective] == 'maximize' else 'lower'}; "
                        f"use direction = {OBJECTIVES[objective]!r} or leave it out")
    storage = _study_value(study, "storage", str, file, default="")
    if storage and "://" not in storage and not storage.startswith("journal:"):
        raise SpecError(f"storage = {storage!r} in [study] of {file} is not an Optuna storage: "
                        f"use sqlite:///PATH.db, postgresql://..., or journal:PATH")
    budget = _study_value(study, "time_budget_minutes", float, file, default=None)
    if budget is not None and budget <= 0:
        raise SpecError(f"time_budget_minutes = {budget:g} in [study] of {file} must be > 0: "
                        f"give minutes, or leave it out")

    spec = StudySpec(
        name=name,
        description=_study_value(study, "description", str, file, default=""),
        dataset=dataset,
        binarize=binarize,
        seeds=_parse_seeds(study, file),
        epochs=_parse_epochs(study, file, dataset),
        epochs_by_dataset=_epochs_table(study, file, dataset),
        objective=objective,
        direction=direction,
        storage=storage,
        tracking_uri=_study_value(study, "tracking_uri", str, file, default=""),
        time_budget_minutes=budget,
        grid=grid,
        search=search,
        fixed=fixed,
        path=path,
        sha256=sha256,
    )
    _check_combinations(spec, file)
    _check_cells(spec, file)
    return spec


def _table(data: dict, name: str, file: str) -> dict | None:
    table = data.get(name)
    if table is not None and not isinstance(table, dict):
        raise SpecError(f"{name} in {file} must be a table: write [{name}] on its own line "
                        f"and its keys below it")
    return table


def _check_keys(table: dict, known, where: str, file: str) -> None:
    for key in table:
        if key not in known:
            raise SpecError(f"unknown key {key!r} in {where} of {file}: {_suggest(key, known)}")


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"use one of {', '.join(known)}"


def _check_study_keys(study: dict, file: str) -> None:
    for key in study:
        if key in STUDY_KEYS:
            continue
        if key in field_names() and not difflib.get_close_matches(key, STUDY_KEYS, cutoff=0.6):
            raise SpecError(f"{key!r} in [study] of {file} is a per-run setting: move it to "
                            f"[fixed] (or to [grid] to vary it)")
        raise SpecError(f"unknown key {key!r} in [study] of {file}: {_suggest(key, STUDY_KEYS)}")


def _check_field(key: str, where: str, file: str) -> None:
    """`key` must be a RunConfig field that may vary per cell."""
    if key in STUDY_ONLY:
        raise SpecError(f"{key!r} in {where} of {file} belongs to [study]: move it there, "
                        f"e.g. {STUDY_ONLY[key]}")
    if key not in field_names():
        known = [f for f in field_names() if f not in STUDY_ONLY]
        raise SpecError(f"unknown key {key!r} in {where} of {file}: {_suggest(key, known)}")


def _coerce(key: str, value, where: str, file: str):
    """`value` as the type of RunConfig field `key` (ints are accepted for float fields)."""
    kind = field_types()[key]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        example = _format_toml(getattr(RunConfig(), key))
        raise SpecError(f"{key} = {_format_toml(value)} in {where} of {file} has the wrong type: "
                        f"{key} takes {TYPE_WORDS.get(kind, kind.__name__)}, "
                        f"e.g. {key} = {example}")
    value = float(value) if kind is float else value
    if key in NAMED and value not in NAMED[key]:
        raise SpecError(f"{where} {key} of {file}: {NAMED[key].unknown_message(value)}")
    return value


def _values(key: str, values, where: str, file: str, what: str) -> tuple:
    """A non-empty list of distinct values of field `key`."""
    if not isinstance(values, (list, tuple)):
        raise SpecError(f"{key} in {where} of {file} must be a list of {what}, e.g. "
                        f"[{_format_toml(values)}]; a single value belongs in [fixed]")
    if not values:
        raise SpecError(f"empty {key} in {where} of {file}: list at least one value, or remove "
                        f"the key to use the default")
    coerced = tuple(_coerce(key, v, where, file) for v in values)
    duplicates = sorted({_format_value(v) for v in coerced if coerced.count(v) > 1})
    if duplicates:
        raise SpecError(f"duplicate value(s) {', '.join(duplicates)} in {key} in {where} of "
                        f"{file}: list each value once")
    return coerced


def _parse_grid(table: dict, file: str) -> tuple[tuple[str, tuple], ...]:
    axes = []
    for key, values in table.items():
        _check_field(key, "[grid]", file)
        axes.append((key, _values(key, values, "[grid]", file, "values")))
    return tuple(axes)


def _parse_fixed(table: dict, file: str) -> tuple[tuple[str, object], ...]:
    fixed = []
    for key, value in table.items():
        _check_field(key, "[fixed]", file)
        if isinstance(value, list):
            raise SpecError(f"{key} in [fixed] of {file} is a list: to vary it move it to [grid], "
                            f"else give one value")
        fixed.append((key, _coerce(key, value, "[fixed]", file)))
    return tuple(fixed)


def _parse_search(table: dict | None, file: str) -> SearchSpec | None:
    if table is None:
        return None
    _check_keys(table, SEARCH_KEYS, "[search]", file)
    n_trials = table.get("n_trials")
    if n_trials is None:
        raise SpecError(f"missing n_trials in [search] of {file}: add n_trials = 20 "
                        f"(trials per cell)")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials <= 0:
        raise SpecError(f"n_trials = {_format_toml(n_trials)} in [search] of {file} must be a "
                        f"positive integer, e.g. n_trials = 20")
    sampler = table.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise SpecError(f"unknown sampler {sampler!r} in [search] of {file}: "
                        f"{_suggest(sampler, SAMPLERS)}")
    pruner = table.get("pruner", "median")
    if pruner not in PRUNERS:
        raise SpecError(f"unknown pruner {pruner!r} in [search] of {file}: "
                        f"{_suggest(pruner, PRUNERS)}")
    params = table.get("params")
    if not isinstance(params, dict) or not params:
        raise SpecError(f"[search] of {file} has no [search.params]: add the searched fields, "
                        f"e.g. lr = {{ type = \"float\", low = 1e-4, high = 1e-2, log = true }}")
    return SearchSpec(tuple(_parse_distribution(k, v, file) for k, v in params.items()),
                      n_trials, sampler, pruner)


def _parse_distribution(key: str, spec, file: str) -> Distribution:
    where = "[search.params]"
    _check_field(key, where, file)
    if not isinstance(spec, dict):
        raise SpecError(f"{key} in {where} of {file} must be an inline table, e.g. "
                        f"{key} = {{ type = \"float\", low = 0.5, high = 2.0 }}")
    kind = spec.get("type")
    if kind not in DISTRIBUTIONS:
        problem = "missing type" if kind is None else f"unknown type {kind!r}"
        fix = _suggest(str(kind), DISTRIBUTIONS) if kind is not None else (
            f"add type = one of {', '.join(map(repr, DISTRIBUTIONS))}")
        raise SpecError(f"{problem} for {key} in {where} of {file}: {fix}")
    for name in spec:
        if name not in DISTRIBUTION_KEYS[kind]:
            raise SpecError(f"unknown key {name!r} for the {kind} distribution of {key} in {where} "
                            f"of {file}: a {kind} distribution takes "
                            f"{', '.join(DISTRIBUTION_KEYS[kind])}")
    field_type = field_types()[key]
    if kind == "categorical":
        if not spec.get("choices"):
            raise SpecError(f"no choices for {key} in {where} of {file}: list at least one, e.g. "
                            f"choices = [{_format_toml(getattr(RunConfig(), key))}]")
        return Distribution(key, kind, choices=_values(key, spec["choices"], where, file,
                                                       "choices"))
    if field_type.__name__ != kind:
        right = {int: '"int"', float: '"float"'}.get(field_type, '"categorical" with choices')
        raise SpecError(f"type = {kind!r} for {key} in {where} of {file} does not fit: {key} "
                        f"takes {TYPE_WORDS.get(field_type, field_type.__name__)}; "
                        f"use type = {right}")
    bounds = []
    for name in ("low", "high"):
        if name not in spec:
            raise SpecError(f"missing {name} for {key} in {where} of {file}: a {kind} "
                            f"distribution needs low and high")
        bound = spec[name]
        if not isinstance(bound, int if kind == "int" else (int, float)) or isinstance(bound, bool):
            raise SpecError(f"{name} = {_format_toml(bound)} for {key} in {where} of {file} has "
                            f"the wrong type: {key} takes {TYPE_WORDS[field_type]}")
        bounds.append(field_type(bound))
    low, high = bounds
    if low >= high:
        raise SpecError(f"low = {_format_value(low)} is not below high = {_format_value(high)} for "
                        f"{key} in {where} of {file}: make low < high (a single value "
                        f"belongs in [fixed])")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpecError(f"log = {_format_toml(log)} for {key} in {where} of {file} must be "
                        f"true or false")
    if log and low <= 0:
        raise SpecError(f"log = true needs low > 0, but low = {_format_value(low)} for {key} in "
                        f"{where} of {file}: raise low or drop log")
    return Distribution(key, kind, low=low, high=high, log=log)


def _study_value(study: dict, key: str, kind: type, file: str, default=None, required=False):
    if key not in study:
        if required:
            raise SpecError(f"missing {key} in [study] of {file}: add {key} = \"...\"")
        return default
    value = study[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SpecError(f"{key} = {_format_toml(value)} in [study] of {file} has the wrong type: "
                        f"{key} takes {TYPE_WORDS[kind]}")
    return value


def _parse_seeds(study: dict, file: str) -> tuple[int, ...]:
    seeds = study.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        raise SpecError(f"seeds = {seeds} in [study] of {file} must be a list: seeds = [{seeds}]")
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise SpecError(f"seeds in [study] of {file} must be a non-empty list of integers, "
                        f"e.g. seeds = [0, 1, 2]")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise SpecError(f"seed {_format_toml(seed)} in [study] seeds of {file} must be an "
                            f"integer >= 0")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"duplicate seeds in [study] of {file}: list each seed once")
    return tuple(seeds)


def _epochs_table(study: dict, file: str, dataset: str) -> tuple[tuple[str, int], ...]:
    """[study] epochs given per dataset: every dataset the study may run on needs an entry."""
    table = study.get("epochs")
    if not isinstance(table, dict):
        return ()
    for name, value in table.items():
        if name not in DATASETS:
            raise SpecError(f"epochs.{name} in [study] of {file}: {DATASETS.unknown_message(name)}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SpecError(f"epochs.{name} = {_format_toml(value)} in [study] of {file} must be a "
                            f"positive integer")
    needed = AUTO_DATASETS if dataset == "auto" else (dataset,)
    missing = [name for name in needed if name not in table]
    if missing:
        raise SpecError(f"epochs in [study] of {file} has no entry for {', '.join(missing)}: "
                        f"add one per dataset the study can run on, or give one number")
    return tuple(table.items())


def _parse_epochs(study: dict, file: str, dataset: str = "auto") -> int:
    epochs = study.get("epochs", RunConfig().epochs)
    if isinstance(epochs, dict):
        table = dict(_epochs_table(study, file, dataset))
        return table[dataset] if dataset != "auto" else max(table[name] for name in AUTO_DATASETS)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs <= 0:
        raise SpecError(f"epochs = {_format_toml(epochs)} in [study] of {file} must be a "
                        f"positive integer, e.g. epochs = 10")
    return epochs


def _check_disjoint(grid, search: SearchSpec | None, fixed, file: str) -> None:
    tables = {"[grid]": [k for k, _ in grid], "[search.params]": search.names() if search else [],
              "[fixed]": [k for k, _ in fixed]}
    for key in field_names():
        where = [table for table, keys in tables.items() if key in keys]
        if len(where) > 1:
            raise SpecError(f"{key!r} is set in both {' and '.join(where)} of {file}: "
                            f"keep it in one of them")


def _possible(spec: StudySpec, key: str) -> list[tuple[object, str]]:
    """Every value field `key` can take in some trial, with where it comes from."""
    for name, values in spec.grid:
        if name == key:
            return [(v, "[grid]") for v in values]
    for param in spec.search.params if spec.search else ():
        if param.name == key and param.kind == "categorical":
            return [(v, "[search.params]") for v in param.choices]
    fixed = dict(spec.fixed)
    if key in fixed:
        return [(fixed[key], "[fixed]")]
    return [(getattr(RunConfig(), key), "the RunConfig default")]


def _check_combinations(spec: StudySpec, file: str) -> None:
    models = _possible(spec, "model")
    if spec.objective in VARIATIONAL_OBJECTIVES:
        for model, where in models:
            if not MODELS.meta(model).get("variational", True):
                raise SpecError(
                    f"objective {spec.objective!r} in [study] of {file} needs an ELBO, but model "
                    f"{model!r} from {where} is not variational: use objective = \"val/bce\" or "
                    f"\"val/mse\", or drop {model!r}")
    datasets = ([d for d in AUTO_DATASETS if d in DATASETS] if spec.dataset == "auto"
                else [spec.dataset])
    for model, where in models:
        if not MODELS.meta(model).get("conditional", False):
            continue
        for dataset in datasets:
            if not DATASETS.meta(dataset).get("labelled", True):
                shown = "'auto', which may resolve to" if spec.dataset == "auto" else "dataset"
                labelled = [d for d in DATASETS.names() if DATASETS.meta(d).get("labelled", True)]
                raise SpecError(
                    f"model {model!r} from {where} of {file} needs labels, but {shown} "
                    f"{dataset!r} is unlabelled: use a labelled dataset "
                    f"({', '.join(labelled)}) or drop {model!r}")


def _check_cells(spec: StudySpec, file: str) -> None:
    """Every cell, and every searched field at its bounds and choices, is a valid RunConfig."""
    for cell in spec.cells():
        config = _run_config(spec, cell, spec.dataset, {}, file)
        for param in spec.search.params if spec.search else ():
            values = param.choices if param.kind == "categorical" else (param.low, param.high)
            for value in values:
                try:
                    config.replace(**{param.name: value})
                except ConfigError as error:
                    raise SpecError(f"{param.name} = {_format_value(value)} from [search.params] "
                                    f"of {file} gives an invalid run in cell {cell.key}: {error}; "
                                    f"narrow the distribution") from None


def _run_config(spec: StudySpec, cell: Cell, dataset: str, sampled: dict, file: str) -> RunConfig:
    values = {**dict(spec.fixed), "dataset": dataset, "binarize": spec.binarize,
              "epochs": spec.epochs, **cell.as_dict(), **sampled}
    try:
        return RunConfig.from_dict(values)
    except ConfigError as error:
        raise SpecError(f"cell {cell.key} of {file} is not a valid run: {error}; "
                        f"fix its values in [grid] or [fixed]") from None


# --- formatting ------------------------------------------------------------------------------

def _label(path: str) -> str:
    return Path(path).name if path else "<dict>"


def _canonical_sha256(data: dict) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _format_value(value) -> str:
    """A value as it appears in cell keys and tables: 0.001, 1e-05, vae, 32."""
    return repr(value) if isinstance(value, float) else str(value)


def _format_toml(value) -> str:
    """A value as it would be written in TOML, for error messages."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _format_table(header: list[str], rows: list[list]) -> list[str]:
    """Columns two spaces apart, numbers right-aligned."""
    texts = [[_format_value(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in texts)) for i, h in enumerate(header)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric)).rstrip()

    return [line(header), *(line(r) for r in texts)]
