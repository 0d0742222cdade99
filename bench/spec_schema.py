"""The schema of a study spec and its checker: a spec as `tomllib` reads it -> the checked values of a
`bench.spec.StudySpec`, or one SpecError line naming the file, table, key and fix. The tables' keys are
data (STUDY_KEYS, SEARCH_KEYS, DISTRIBUTIONS) read by one checker (`_read`); a RunConfig field, wherever
it is set, is checked by `_field_value` against RunConfig's own types, registries and ranges."""

from __future__ import annotations

import difflib
import json

from bench.config import RunConfig, field_names, field_types
from bench.errors import ConfigError, RegistryError, SpecError
from bench.locations import name_problem
from bench.registry import ARCHS, DATASETS, LOSSES, METRICS, MODELS


def _direction(metric: str) -> str:
    """Which way Optuna should push validation metric `metric`, as its METRICS entry declares."""
    found = [m["better"][metric] for m in map(METRICS.meta, METRICS.names()) if metric in m.get("better", {})]
    if found not in (["higher"], ["lower"]):
        raise RegistryError(f"metric {metric!r} declares no direction: register it with better={{...}}")
    return "maximize" if found == ["higher"] else "minimize"


# Per-epoch validation metrics a study may optimise -> the direction that is better; val/loss is
# the training objective itself (negative ELBO, or the recon loss of an ae), always minimised.
OBJECTIVES: dict[str, str] = {name: "minimize" if name == "val/loss" else _direction(name[len("val/"):])
                              for name in ("val/elbo", "val/loss", "val/recon", "val/bce", "val/mse")}
VARIATIONAL_OBJECTIVES = ("val/elbo",)  # an ae has no ELBO to report
# What the runner tries, in order, for dataset = "auto" (full MNIST if cached, else Debian's
# Fashion-MNIST, else the bundled mnist5k); every one of them needs an epochs entry of its own.
AUTO_DATASETS = ("mnist", "fashion-mnist", "mnist5k")

# The schema: key -> (what it takes, default). A key takes a type, POSITIVE, one of a tuple of
# strings, or None (checked where it is read); REQUIRED keys have no default.
POSITIVE, REQUIRED = "a positive integer", object()
TABLES = ("study", "grid", "search", "fixed")
STUDY_KEYS = {"name": (str, REQUIRED), "description": (str, ""), "dataset": (str, "auto"),
              "binarize": (str, "none"), "seeds": (None, [0]), "epochs": (None, RunConfig().epochs),
              "objective": (str, "val/elbo"), "direction": (("maximize", "minimize"), None),
              "storage": (str, ""), "tracking_uri": (str, ""), "time_budget_minutes": (float, None)}
SEARCH_KEYS = {"n_trials": (POSITIVE, REQUIRED), "sampler": (("tpe", "random", "cmaes"), "tpe"),
               "pruner": (("median", "hyperband", "none"), "median"), "params": (None, None)}
DISTRIBUTIONS = {  # [search.params] field = { type = ..., ... }
    "float": {"type": (str, REQUIRED), "low": (float, REQUIRED), "high": (float, REQUIRED), "log": (bool, False)},
    "int": {"type": (str, REQUIRED), "low": (int, REQUIRED), "high": (int, REQUIRED), "log": (bool, False)},
    "categorical": {"type": (str, REQUIRED), "choices": (None, REQUIRED)}}
EXAMPLES = {"name": '"default"', "n_trials": "20"}
# RunConfig fields that are set once per study in [study], never per cell.
STUDY_ONLY = {"seed": "seeds = [0, 1, 2]", "epochs": "epochs = 10",
              "dataset": 'dataset = "mnist5k"', "binarize": 'binarize = "dynamic"'}
PER_CELL = [name for name in field_names() if name not in STUDY_ONLY]
NAMED = {"model": MODELS, "loss": LOSSES, "arch": ARCHS, "dataset": DATASETS}
TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def read(data, file: str) -> dict:
    """The checked values of spec `data` (read from `file`): StudySpec's [study] fields, `grid`,
    `fixed` and `search` (None, or SearchSpec's fields with one dict per Distribution)."""
    if not isinstance(data, dict):
        raise SpecError(f"{file} is not a table of tables: write [study], [grid], [search] and [fixed] tables")
    for name in data:
        if name not in TABLES:
            raise SpecError(f"unknown table {name!r} in {file}: {suggest(name, TABLES)}")
    for name in TABLES:
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise SpecError(f"{name} in {file} must be a table: write [{name}] on its own line and its keys below it")
    if data.get("study") is None:
        raise SpecError(f"missing [study] in {file}: add [study] with at least name = \"...\"")
    for key in (key for key in data["study"] if key not in STUDY_KEYS):
        if key in field_names() and not difflib.get_close_matches(key, STUDY_KEYS):
            raise SpecError(f"{key!r} in [study] of {file} is a per-run setting: move it to [fixed] "
                            f"(or to [grid] to vary it)")
        raise SpecError(f"unknown key {key!r} in [study] of {file}: {suggest(key, STUDY_KEYS)}")
    grid = {key: _values(key, values, "[grid]", file) for key, values in (data.get("grid") or {}).items()}
    search = _search(data["search"], file) if data.get("search") is not None else None
    fixed = {}
    for key, value in (data.get("fixed") or {}).items():
        _field(key, "[fixed]", file)
        if isinstance(value, list):
            raise SpecError(f"{key} in [fixed] of {file} is a list: to vary it move it to [grid], else give one value")
        fixed[key] = _field_value(key, value, "[fixed]", file)
    searched = [param["name"] for param in search["params"]] if search else []
    tables_of = {"[grid]": grid, "[fixed]": fixed, "[search.params]": searched}
    for key in field_names():
        where = [table for table, keys in tables_of.items() if key in keys]
        if len(where) > 1:
            raise SpecError(f"{key!r} is set in both {' and '.join(where)} of {file}: keep it in one of them")
    return {**_study(data["study"], file), "grid": tuple(grid.items()), "search": search,
            "fixed": tuple(fixed.items())}


def _read(table: dict, schema: dict, where: str, file: str) -> dict:
    """`table`'s values as `schema` (key -> (kind, default)) says, defaults filled in."""
    for key in table:
        if key not in schema:
            raise SpecError(f"unknown key {key!r} in {where} of {file}: {suggest(key, schema)}")
    values = {}
    for key, (kind, default) in schema.items():
        if key not in table and default is REQUIRED:
            raise SpecError(f"missing {key} in {where} of {file}: add {key} = {EXAMPLES.get(key, '...')}")
        values[key] = _typed(key, table[key], kind, where, file) if key in table else default
    return values


def _typed(key: str, value, kind, where: str, file: str):
    """`value` as `kind` takes it (see the schema above); an int passes as a float."""
    if kind is None:
        return value
    if isinstance(kind, tuple):
        if value not in kind:
            raise SpecError(f"unknown {key} {value!r} in {where} of {file}: {suggest(value, kind)}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {float: number, int: number and isinstance(value, int), POSITIVE: number and isinstance(value, int)
          and value > 0, bool: isinstance(value, bool), str: isinstance(value, str)}[kind]
    if kind is POSITIVE and not ok:
        raise SpecError(f"{key} = {format_toml(value)} in {where} of {file} must be a positive integer, "
                        f"e.g. {key} = {EXAMPLES.get(key, '1')}")
    if not ok:
        example = f", e.g. {key} = {format_toml(getattr(RunConfig(), key))}" if key in field_names() else ""
        raise SpecError(f"{key} = {format_toml(value)} in {where} of {file} has the wrong type: "
                        f"{key} takes {TYPE_WORDS[kind]}{example}")
    return float(value) if kind is float else value


def _study(table: dict, file: str) -> dict:
    study = _read(table, STUDY_KEYS, where := "[study]", file)
    seeds, objective, direction = study["seeds"], study["objective"], study["direction"]
    if problem := name_problem(study["name"]):
        raise SpecError(f"name = {study['name'][:60]!r} in [study] of {file}: {problem}; e.g. name = \"default\"")
    if study["dataset"] != "auto":  # "auto": the runner picks one of AUTO_DATASETS
        _field_value("dataset", study["dataset"], where, file)
    _field_value("binarize", study["binarize"], where, file)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        raise SpecError(f"seeds = {seeds} in [study] of {file} must be a list: seeds = [{seeds}]")
    if not isinstance(seeds, list) or not seeds:
        raise SpecError(f"seeds in [study] of {file} must be a non-empty list of integers, e.g. seeds = [0, 1, 2]")
    study["seeds"] = tuple(_field_value("seed", seed, where, file) for seed in seeds)
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"duplicate seeds in [study] of {file}: list each seed once")
    if objective not in OBJECTIVES:
        known = ", ".join(f"{name} ({better})" for name, better in OBJECTIVES.items())
        raise SpecError(f"unknown objective {objective!r} in [study] of {file}: use one of {known}")
    better = study["direction"] = OBJECTIVES[objective]
    if direction not in (None, better):
        raise SpecError(f"direction = {direction!r} contradicts objective {objective!r} in [study] of {file}: "
                        f"{objective} is better when it is {'higher' if better == 'maximize' else 'lower'}; "
                        f"use direction = {better!r} or leave it out")
    storage, budget = study["storage"], study["time_budget_minutes"]
    if storage and "://" not in storage and not storage.startswith("journal:"):
        raise SpecError(f"storage = {storage!r} in [study] of {file} is not an Optuna storage: "
                        f"use sqlite:///PATH.db, postgresql://..., or journal:PATH")
    if budget is not None and budget <= 0:
        raise SpecError(f"time_budget_minutes = {budget:g} in [study] of {file} must be > 0: "
                        f"give minutes, or leave it out")
    epochs = study["epochs"]
    if not isinstance(epochs, dict):
        study["epochs"] = _field_value("epochs", epochs, where, file)
        return study
    for name, value in epochs.items():  # per dataset: a time budget that holds whichever "auto" picks
        if name not in DATASETS:
            raise SpecError(f"epochs.{name} in [study] of {file}: {DATASETS.unknown_message(name)}")
        _field_value("epochs", _typed(f"epochs.{name}", value, int, where, file), f"{where} epochs.{name}", file)
    needed = AUTO_DATASETS if study["dataset"] == "auto" else (study["dataset"],)
    if missing := [name for name in needed if name not in epochs]:
        raise SpecError(f"epochs in [study] of {file} has no entry for {', '.join(missing)}: "
                        f"add one per dataset the study can run on, or give one number")
    study.update(epochs=max(epochs[name] for name in needed), epochs_by_dataset=tuple(epochs.items()))
    return study


def _search(table: dict, file: str) -> dict:
    search = _read(table, SEARCH_KEYS, "[search]", file)
    params = search.pop("params")
    if not isinstance(params, dict) or not params:
        raise SpecError(f"[search] of {file} has no [search.params]: add the searched fields, "
                        f"e.g. lr = {{ type = \"float\", low = 1e-4, high = 1e-2, log = true }}")
    return {**search, "params": tuple(_distribution(key, spec, file) for key, spec in params.items())}


def _distribution(key: str, spec, file: str) -> dict:
    field_type, where = _field(key, "[search.params]", file), "[search.params]"
    if not isinstance(spec, dict):
        raise SpecError(f"{key} in {where} of {file} must be an inline table, e.g. "
                        f"{key} = {{ type = \"float\", low = 0.5, high = 2.0 }}")
    kind = spec.get("type")
    if kind is None:
        raise SpecError(f"missing type for {key} in {where} of {file}: add type = one of {', '.join(DISTRIBUTIONS)}")
    if kind not in DISTRIBUTIONS:
        raise SpecError(f"unknown type {kind!r} for {key} in {where} of {file}: {suggest(kind, DISTRIBUTIONS)}")
    if kind != "categorical" and field_type.__name__ != kind:
        right = {int: '"int"', float: '"float"'}.get(field_type, '"categorical" with choices')
        raise SpecError(f"type = {kind!r} for {key} in {where} of {file} does not fit: {key} takes "
                        f"{TYPE_WORDS[field_type]}; use type = {right}")
    values = _read(spec, DISTRIBUTIONS[kind], f"the {kind} distribution of {key} in {where}", file)
    del values["type"]
    if kind == "categorical" and not values["choices"]:
        raise SpecError(f"no choices for {key} in {where} of {file}: list at least one, "
                        f"e.g. choices = [{format_toml(getattr(RunConfig(), key))}]")
    if kind == "categorical":
        return {"name": key, "kind": kind, "choices": _values(key, values["choices"], where, file, "choices")}
    if values["low"] >= values["high"]:
        raise SpecError(f"low = {format_value(values['low'])} is not below high = {format_value(values['high'])} "
                        f"for {key} in {where} of {file}: make low < high (a single value belongs in [fixed])")
    if values["log"] and values["low"] <= 0:
        raise SpecError(f"log = true needs low > 0, but low = {format_value(values['low'])} for {key} in {where} "
                        f"of {file}: raise low or drop log")
    return {"name": key, "kind": kind, **values}


def _field(key: str, where: str, file: str) -> type:
    """The type of RunConfig field `key`, which must be one that may vary per cell."""
    if key in STUDY_ONLY:
        raise SpecError(f"{key!r} in {where} of {file} belongs to [study]: move it there, e.g. {STUDY_ONLY[key]}")
    if key not in PER_CELL:
        raise SpecError(f"unknown key {key!r} in {where} of {file}: {suggest(key, PER_CELL)}")
    return field_types()[key]


def _field_value(key: str, value, where: str, file: str):
    """`value` as RunConfig field `key` takes it: its type, a registered name, in RunConfig's range."""
    value = _typed(key, value, field_types()[key], where, file)
    if key in NAMED and value not in NAMED[key]:
        raise SpecError(f"{where} {key} of {file}: {NAMED[key].unknown_message(value)}")
    try:
        RunConfig().replace(**{key: value})
    except ConfigError as error:
        raise SpecError(f"{key} = {format_toml(value)} in {where} of {file} is out of range: {error}") from None
    return value


def _values(key: str, values, where: str, file: str, what: str = "values") -> tuple:
    """A non-empty list of distinct values of per-cell field `key`."""
    _field(key, where, file)
    if not isinstance(values, (list, tuple)):
        raise SpecError(f"{key} in {where} of {file} must be a list of {what}, e.g. [{format_toml(values)}]; "
                        f"a single value belongs in [fixed]")
    if not values:
        raise SpecError(f"empty {key} in {where} of {file}: list at least one value, or remove the key to use "
                        f"the default")
    checked = tuple(_field_value(key, v, where, file) for v in values)
    duplicates = sorted({format_value(v) for v in checked if checked.count(v) > 1})
    if duplicates:
        raise SpecError(f"duplicate value(s) {', '.join(duplicates)} in {key} in {where} of {file}: "
                        f"list each value once")
    return checked


def suggest(name, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(known)}"


def format_value(value) -> str:
    """A value as it appears in cell keys and tables: 0.001, 1e-05, vae, 32."""
    return repr(value) if isinstance(value, float) else str(value)


def format_toml(value) -> str:
    """A value as it would be written in TOML, for error messages: true, "vae", 0.001."""
    return json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
