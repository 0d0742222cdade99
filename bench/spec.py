"""Study specs: a TOML file in experiments/ -> a validated, frozen `StudySpec`. [study] says what is
measured and how often, [grid] lists the axes whose cross product are the cells, the optional [search]
runs Optuna inside every cell, [fixed] sets every other `RunConfig` field. A bad spec fails before
training with one line naming the file, the key and the fix: this module checks that the study makes
sense, `bench.spec_schema` checks its tables key by key.

    spec = load_spec("experiments/default.toml").with_dataset("mnist")  # "auto" resolved
    print(format_plan(spec, train_size=50_000))  # the dry run
    configs = [spec.config(cell) for cell in spec.cells()]  # RunConfigs, ready to train
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from bench.config import RunConfig, field_types
from bench.errors import ConfigError, SpecError
from bench.registry import DATASETS, MODELS
from bench.spec_schema import (AUTO_DATASETS, OBJECTIVES, STUDY_KEYS, VARIATIONAL_OBJECTIVES,  # noqa: F401
                               format_value, read)

TRIAL_OVERHEAD_S = 3.0  # evaluation and tracking per trial, for the dry-run estimate
EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


@dataclass(frozen=True)
class Distribution:
    """One searched RunConfig field: float/int in [low, high] (log-uniform if `log`), or `choices`."""

    name: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        return getattr(trial, f"suggest_{self.kind}")(self.name, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name}: one of {', '.join(map(format_value, self.choices))}"
        bounds = f"[{format_value(self.low)}, {format_value(self.high)}]"
        return f"{self.name}: {self.kind} in {bounds}{', log' if self.log else ''}"

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
        """Stable name of the cell from its values alone, e.g. "model=vae,latent=2,seed=0"."""
        return ",".join(f"{name}={format_value(value)}" for name, value in self.params)

    @property
    def grid_key(self) -> str:
        """The key without the seed, shared by the cells that differ only in seed."""
        return ",".join(f"{name}={format_value(value)}" for name, value in self.params if name != "seed")

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
        """The grid's cross product times the seeds, seed varying slowest (a study cut short
        still covers the grid); without a [grid], one cell per seed."""
        points = itertools.product(self.seeds, itertools.product(*(values for _, values in self.grid)))
        return [Cell(i, (*zip((name for name, _ in self.grid), point), ("seed", seed)))
                for i, (seed, point) in enumerate(points)]

    def cell(self, key: str) -> Cell:
        wanted = canonical_key(key)
        for cell in self.cells():
            if canonical_key(cell.key) == wanted:
                return cell
        raise SpecError(f"no cell {key!r} in study {self.name!r} ({_label(self.path)}): "
                        f"the spec changed since that run; list the cells with a dry run")

    def config(self, cell: Cell, dataset: str | None = None, **sampled) -> RunConfig:
        """A trial's RunConfig: defaults < [fixed] < [study] < the cell's values < `sampled` ones;
        `dataset` replaces "auto" once the runner has resolved it."""
        dataset, searched = dataset or self.dataset, self.search.names() if self.search else []
        if dataset == "auto":
            raise SpecError(f"dataset is 'auto' in study {self.name!r}: resolve it first and pass "
                            f"config(cell, dataset=NAME) or use spec.with_dataset(NAME)")
        if dataset not in DATASETS:
            raise SpecError(DATASETS.unknown_message(dataset))
        if unknown := sorted(set(sampled) - set(searched)):
            raise SpecError(f"sampled value(s) {', '.join(unknown)} are not searched in study "
                            f"{self.name!r}: searched are {', '.join(searched) or 'none'}")
        sampled = {k: float(v) if field_types()[k] is float else v for k, v in sampled.items()}
        return _run_config(self, cell, dataset, sampled, _label(self.path))

    def with_dataset(self, name: str) -> StudySpec:
        """The same study on dataset `name` (resolving "auto"), revalidated; `sha256` is kept."""
        return dataclasses.replace(override(self, dataset=name), sha256=self.sha256)

    def to_dict(self) -> dict:
        """The spec as the dict `parse_spec` reads (defaults filled in)."""
        study = {key: getattr(self, key) for key in STUDY_KEYS if key not in ("seeds", "epochs")}
        study.update(seeds=list(self.seeds), epochs=dict(self.epochs_by_dataset) or self.epochs)
        if self.time_budget_minutes is None:
            del study["time_budget_minutes"]
        search = self.search and {"n_trials": self.search.n_trials, "sampler": self.search.sampler,
                                  "pruner": self.search.pruner,
                                  "params": {p.name: p.to_dict() for p in self.search.params}}
        data = {"study": study, "grid": {name: list(values) for name, values in self.grid},
                "search": search, "fixed": dict(self.fixed)}
        return {table: values for table, values in data.items() if values}


def canonical_key(key) -> str:
    """A cell key whatever the order of the [grid] axes it was made in: reordering the axes in a
    spec retrained every cell and doubled n."""
    return ",".join(sorted(str(key).split(",")))


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file. A bare name such as "smoke" means experiments/smoke.toml."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:
        path = EXPERIMENTS_DIR / f"{path}.toml"
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml")))
        raise SpecError(f"spec file {str(path)!r} not found: check the path "
                        f"(shipped specs in {EXPERIMENTS_DIR}: {shipped or 'none'})") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise SpecError(f"cannot read spec file {str(path)!r}: {reason}; "
                        f"give the path of a readable UTF-8 TOML file") from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"TOML syntax error in {path.name}: {error}; fix that line") from None
    return _parse(data, path.name, str(path), hashlib.sha256(raw).hexdigest())


def parse_spec(data: dict, source: str = "<dict>") -> StudySpec:
    """Validate a spec given as a dict (as `tomllib` returns it); `source` names it in errors."""
    return _parse(data, source, "", _canonical_sha256(data))


def override(spec: StudySpec, **study_fields) -> StudySpec:
    """`spec` with [study] fields replaced (e.g. epochs=1, seeds=[0]), revalidated and rehashed;
    changing the objective alone lets the direction default again."""
    data = spec.to_dict()
    if "objective" in study_fields and "direction" not in study_fields:
        del data["study"]["direction"]
    data["study"].update(study_fields)
    return _parse(data, f"{_label(spec.path)} with overrides", spec.path, _canonical_sha256(data))


def format_plan(spec: StudySpec, *, train_size: int | None = None, samples_per_s: float = 10_000,
                workers: int = 1, overhead_s: float = TRIAL_OVERHEAD_S) -> str:
    """The dry run: every cell, the trials, and the time estimated as runs x epochs x train_size
    / (samples_per_s x workers) + `overhead_s` per run; `train_size` defaults to the dataset's."""
    cells, trials, search = spec.cells(), spec.trials_per_cell, spec.search
    runs, points = len(cells) * trials, len(cells) // len(spec.seeds)
    lines = [f"study {spec.name!r} ({_label(spec.path)}, sha256 {spec.sha256[:12]})",
             *([f"  {spec.description}"] if spec.description else []),
             f"dataset {spec.dataset}, binarize {spec.binarize}, epochs {spec.epochs}, "
             f"seeds {', '.join(map(str, spec.seeds))}, objective {spec.objective} ({spec.direction})",
             *(["fixed: " + ", ".join(f"{k}={format_value(v)}" for k, v in spec.fixed)] if spec.fixed else [])]
    if search:
        lines += [f"search: {trials} trials per cell, {search.sampler} sampler, {search.pruner} pruner",
                  *(f"  {p.describe()}" for p in search.params)]
    lines += ["", *_format_table(["#", *(name for name, _ in spec.grid), "seed"],
                                 [[c.index, *(v for _, v in c.params)] for c in cells]), "",
              f"{_plural(len(cells), 'cell')} ({_plural(points, 'grid point')} x "
              f"{_plural(len(spec.seeds), 'seed')}) x {_plural(trials, 'trial')} = {_plural(runs, 'run')}"]
    if train_size is None and spec.dataset in DATASETS:
        train_size = DATASETS.meta(spec.dataset).get("train_size")
    if train_size is None:
        return "\n".join([*lines, f"estimated time: unknown; pass train_size, the number of training "
                                  f"images of dataset {spec.dataset!r}"])
    seconds = runs * spec.epochs * train_size / (samples_per_s * workers) + runs * overhead_s / workers
    lines.append(f"estimated time: about {_format_duration(seconds)} = {_plural(runs, 'run')} x "
                 f"{_plural(spec.epochs, 'epoch')} x {train_size:,} images / "
                 f"({samples_per_s:,.0f} images/s x {_plural(workers, 'worker')}) + "
                 f"{overhead_s:g} s per run; an estimate, not a measurement")
    if spec.time_budget_minutes is not None and seconds > spec.time_budget_minutes * 60:
        lines.append(f"warning: the estimate ({_format_duration(seconds)}) exceeds time_budget_minutes = "
                     f"{spec.time_budget_minutes:g}: use fewer epochs, cells or seeds, or more workers")
    return "\n".join(lines)


# --- does the study make sense -----------------------------------------------------------------

def _parse(data, file: str, path: str, sha256: str) -> StudySpec:
    values = read(data, file)
    if search := values.pop("search"):
        search = SearchSpec(**{**search, "params": tuple(Distribution(**p) for p in search["params"])})
    spec = StudySpec(**values, search=search, path=path, sha256=sha256)
    _check_combinations(spec, file)
    for cell in spec.cells():  # every cell, and every searched field at its bounds and choices, is valid
        config = _run_config(spec, cell, spec.dataset, {}, file)
        for param in search.params if search else ():
            for value in param.choices if param.kind == "categorical" else (param.low, param.high):
                try:
                    config.replace(**{param.name: value})
                except ConfigError as error:
                    raise SpecError(f"{param.name} = {format_value(value)} from [search.params] of {file} gives "
                                    f"an invalid run in cell {cell.key}: {error}; narrow the distribution") from None
    return spec


def _check_combinations(spec: StudySpec, file: str) -> None:
    """Every model a trial can get (a field is set in one table at most) fits the objective and the datasets."""
    sources = {**{name: ("[fixed]", (value,)) for name, value in spec.fixed},
               **{name: ("[grid]", values) for name, values in spec.grid},
               **{p.name: ("[search.params]", p.choices) for p in (spec.search.params if spec.search else ())}}
    if spec.search and spec.search.pruner == "hyperband" and len(spec.cells()) > 1:
        raise SpecError(f"pruner = \"hyperband\" in [search] of {file} would judge each trial against the "
                        f"other cells (grid points and seeds) too, as Optuna's brackets span the study: use "
                        f"pruner = \"median\" (per cell) or \"none\", or search one cell")
    where, models = sources.get("model", ("the RunConfig default", (RunConfig().model,)))
    for model in models:
        if spec.objective in VARIATIONAL_OBJECTIVES and not MODELS.get(model).variational:
            raise SpecError(f"objective {spec.objective!r} in [study] of {file} needs an ELBO, but model "
                            f"{model!r} from {where} is not variational: use objective = \"val/bce\" or "
                            f"\"val/mse\", or drop {model!r}")
    datasets = [d for d in AUTO_DATASETS if d in DATASETS] if spec.dataset == "auto" else [spec.dataset]
    for model, dataset in itertools.product(models, datasets):
        if MODELS.get(model).conditional and not DATASETS.meta(dataset).get("labelled", True):
            shown = "'auto', which may resolve to" if spec.dataset == "auto" else "dataset"
            labelled = [d for d in DATASETS.names() if DATASETS.meta(d).get("labelled", True)]
            raise SpecError(f"model {model!r} from {where} of {file} needs labels, but {shown} {dataset!r} is "
                            f"unlabelled: use a labelled dataset ({', '.join(labelled)}) or drop {model!r}")


def _run_config(spec: StudySpec, cell: Cell, dataset: str, sampled: dict, file: str) -> RunConfig:
    values = {**dict(spec.fixed), "dataset": dataset, "binarize": spec.binarize, "epochs": spec.epochs,
              **cell.as_dict(), **sampled}
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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def _format_table(header: list[str], rows: list[list]) -> list[str]:
    """Columns two spaces apart, numbers right-aligned."""
    texts = [[format_value(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in texts)) for i, h in enumerate(header)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()
            for cells in (header, *texts)]
