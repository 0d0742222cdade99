"""The schema of a study spec and its checker: a spec as `tomllib` reads it -> the checked
values of a `bench.spec.StudySpec`, or one SpecError line naming the file, table, key and fix.
The tables' keys are data (STUDY_KEYS, SEARCH_KEYS, DISTRIBUTIONS) read by one checker
(`_read`); [grid], [fixed] and [search.params] take RunConfig fields, whose ranges RunConfig checks."""

from __future__ import annotations

import difflib
import json

from bench.config import RunConfig, field_names, field_types
from bench.errors import ConfigError, RegistryError, SpecError
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
NAMED = {"model": MODELS, "loss": LOSSES, "arch": ARCHS, "dataset": DATASETS}
TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
              POSITIVE: POSITIVE, list: "a list", dict: "a table"}


def read(data, file: str) -> dict:
    """The checked values of spec `data` (read from `file`): StudySpec's [study] fields, `grid`,
    `fixed` and `search` (None, or SearchSpec's fields with one dict per Distribution)."""
    if not isinstance(data, dict):
        raise SpecError(f"{file} is not a table of tables: write [study], [grid], [search] "
                        f"and [fixed] tables")
    for key in data:
        if key not in TABLES:
            raise SpecError(f"unknown table {key!r} in {file}: {suggest(key, TABLES)}")
    tables = {}
    for name in TABLES:
        if data.get(name) is not None and not isinstance(data[name], dict):
            raise SpecError(f"{name} in {file} must be a table: write [{name}] on its own line "
                            f"and its keys below it")
        tables[name] = data.get(name)
    if tables["study"] is None:
        raise SpecError(f"missing [study] in {file}: add [study] with at least name = \"...\"")
    for key in tables["study"]:
        if key in STUDY_KEYS:
            continue
        if key in field_names() and not difflib.get_close_matches(key, STUDY_KEYS, cutoff=0.6):
            raise SpecError(f"{key!r} in [study] of {file} is a per-run setting: move it to "
                            f"[fixed] (or to [grid] to vary it)")
        raise SpecError(f"unknown key {key!r} in [study] of {file}: {suggest(key, STUDY_KEYS)}")
    grid = tuple((key, _values(key, values, "[grid]", file, "values"))
                 for key, values in (tables["grid"] or {}).items())
    search = _search(tables["search"], file)
    fixed = []
    for key, value in (tables["fixed"] or {}).items():
        _field(key, "[fixed]", file)
        if isinstance(value, list):
            raise SpecError(f"{key} in [fixed] of {file} is a list: to vary it move it to [grid], "
                            f"else give one value")
        fixed.append((key, _field_value(key, value, "[fixed]", file)))
    tables_of = {"[grid]": [k for k, _ in grid], "[fixed]": [k for k, _ in fixed],
                 "[search.params]": [p["name"] for p in search["params"]] if search else []}
    for key in field_names():
        where = [table for table, keys in tables_of.items() if key in keys]
        if len(where) > 1:
            raise SpecError(f"{key!r} is set in both {' and '.join(where)} of {file}: keep it in one of them")
    return {**_study(tables["study"], file), "grid": grid, "search": search, "fixed": tuple(fixed)}


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
    """`value` as `kind`: a type (ints pass as floats), POSITIVE, a tuple of allowed strings, or
    None for any value."""
    if kind is None:
        return value
    if isinstance(kind, tuple):
        if value not in kind:
            raise SpecError(f"unknown {key} {value!r} in {where} of {file}: {suggest(value, kind)}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {float: number, POSITIVE: number and isinstance(value, int) and value > 0,
          int: number and isinstance(value, int), bool: isinstance(value, bool)}.get(kind)
    if kind is POSITIVE and not ok:
        raise SpecError(f"{key} = {format_toml(value)} in {where} of {file} must be a positive "
                        f"integer, e.g. {key} = {EXAMPLES.get(key, '1')}")
    if not (ok if ok is not None else isinstance(value, kind)):
        example = f", e.g. {key} = {format_toml(getattr(RunConfig(), key))}" if key in field_names() else ""
        raise SpecError(f"{key} = {format_toml(value)} in {where} of {file} has the wrong type: "
                        f"{key} takes {TYPE_WORDS[kind]}{example}")
    return float(value) if kind is float else value


def _study(table: dict, file: str) -> dict:
    where = "[study]"
    epochs = table.get("epochs", RunConfig().epochs)
    seeds = table.get("seeds", [0])
    study = _read({k: v for k, v in table.items() if k not in ("epochs", "seeds")}, STUDY_KEYS, where, file)
    if not study["name"].strip():
        raise SpecError(f"empty name in [study] of {file}: name the study, e.g. name = \"default\"")
    if study["dataset"] != "auto" and study["dataset"] not in DATASETS:
        raise SpecError(f"[study] dataset of {file}: {DATASETS.unknown_message(study['dataset'])}")
    _in_range("binarize", study["binarize"], where, file)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        raise SpecError(f"seeds = {seeds} in [study] of {file} must be a list: seeds = [{seeds}]")
    if not isinstance(seeds, list) or not seeds:
        raise SpecError(f"seeds in [study] of {file} must be a non-empty list of integers, e.g. seeds = [0, 1, 2]")
    study["seeds"] = tuple(_in_range("seed", _typed("seed", s, int, where, file), where, file) for s in seeds)
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"duplicate seeds in [study] of {file}: list each seed once")
    objective = study["objective"]
    if objective not in OBJECTIVES:
        known = ", ".join(f"{name} ({direction})" for name, direction in OBJECTIVES.items())
        raise SpecError(f"unknown objective {objective!r} in [study] of {file}: use one of {known}")
    study["direction"] = study["direction"] or OBJECTIVES[objective]
    if study["direction"] != OBJECTIVES[objective]:
        raise SpecError(f"direction = {study['direction']!r} contradicts objective {objective!r} in [study] "
                        f"of {file}: {objective} is better when it is "
                        f"{'higher' if OBJECTIVES[objective] == 'maximize' else 'lower'}; "
                        f"use direction = {OBJECTIVES[objective]!r} or leave it out")
    storage = study["storage"]
    if storage and "://" not in storage and not storage.startswith("journal:"):
        raise SpecError(f"storage = {storage!r} in [study] of {file} is not an Optuna storage: "
                        f"use sqlite:///PATH.db, postgresql://..., or journal:PATH")
    if study["time_budget_minutes"] is not None and study["time_budget_minutes"] <= 0:
        raise SpecError(f"time_budget_minutes = {study['time_budget_minutes']:g} in [study] of {file} "
                        f"must be > 0: give minutes, or leave it out")
    if not isinstance(epochs, dict):
        study["epochs"] = _in_range("epochs", _typed("epochs", epochs, int, where, file), where, file)
        return study
    for name, value in epochs.items():  # per dataset: a budget that holds whichever "auto" picks
        if name not in DATASETS:
            raise SpecError(f"epochs.{name} in [study] of {file}: {DATASETS.unknown_message(name)}")
        _in_range("epochs", _typed(f"epochs.{name}", value, int, where, file), f"{where} epochs.{name}", file)
    needed = AUTO_DATASETS if study["dataset"] == "auto" else (study["dataset"],)
    missing = [name for name in needed if name not in epochs]
    if missing:
        raise SpecError(f"epochs in [study] of {file} has no entry for {', '.join(missing)}: "
                        f"add one per dataset the study can run on, or give one number")
    study.update(epochs=max(epochs[name] for name in needed), epochs_by_dataset=tuple(epochs.items()))
    return study


def _search(table: dict | None, file: str) -> dict | None:
    if table is None:
        return None
    search = _read(table, SEARCH_KEYS, "[search]", file)
    params = search.pop("params")
    if not isinstance(params, dict) or not params:
        raise SpecError(f"[search] of {file} has no [search.params]: add the searched fields, "
                        f"e.g. lr = {{ type = \"float\", low = 1e-4, high = 1e-2, log = true }}")
    return {**search, "params": tuple(_distribution(key, spec, file) for key, spec in params.items())}


def _distribution(key: str, spec, file: str) -> dict:
    field_type = _field(key, "[search.params]", file)
    if not isinstance(spec, dict):
        raise SpecError(f"{key} in [search.params] of {file} must be an inline table, e.g. "
                        f"{key} = {{ type = \"float\", low = 0.5, high = 2.0 }}")
    kind = spec.get("type")
    if kind not in DISTRIBUTIONS:
        fix = suggest(kind, DISTRIBUTIONS) if kind is not None else f"add type = one of {', '.join(DISTRIBUTIONS)}"
        raise SpecError(f"{'missing type' if kind is None else f'unknown type {kind!r}'} for {key} in "
                        f"[search.params] of {file}: {fix}")
    if kind != "categorical" and field_type.__name__ != kind:
        right = {int: '"int"', float: '"float"'}.get(field_type, '"categorical" with choices')
        raise SpecError(f"type = {kind!r} for {key} in [search.params] of {file} does not fit: {key} "
                        f"takes {TYPE_WORDS.get(field_type, field_type.__name__)}; use type = {right}")
    values = _read(spec, DISTRIBUTIONS[kind], f"the {kind} distribution of {key} in [search.params]", file)
    if kind == "categorical":
        if not values["choices"]:
            raise SpecError(f"no choices for {key} in [search.params] of {file}: list at least one, "
                            f"e.g. choices = [{format_toml(getattr(RunConfig(), key))}]")
        choices = _values(key, values["choices"], "[search.params]", file, "choices")
        return {"name": key, "kind": kind, "choices": choices}
    low, high, log = values["low"], values["high"], values["log"]
    if low >= high:
        raise SpecError(f"low = {format_value(low)} is not below high = {format_value(high)} for {key} in "
                        f"[search.params] of {file}: make low < high (a single value belongs in [fixed])")
    if log and low <= 0:
        raise SpecError(f"log = true needs low > 0, but low = {format_value(low)} for {key} in "
                        f"[search.params] of {file}: raise low or drop log")
    return {"name": key, "kind": kind, "low": low, "high": high, "log": log}


def _field(key: str, where: str, file: str) -> type:
    """The type of RunConfig field `key`, which must be one that may vary per cell."""
    if key in STUDY_ONLY:
        raise SpecError(f"{key!r} in {where} of {file} belongs to [study]: move it there, "
                        f"e.g. {STUDY_ONLY[key]}")
    if key not in field_names():
        known = [f for f in field_names() if f not in STUDY_ONLY]
        raise SpecError(f"unknown key {key!r} in {where} of {file}: {suggest(key, known)}")
    return field_types()[key]


def _field_value(key: str, value, where: str, file: str):
    """`value` as RunConfig field `key` takes it: type, registry name, range."""
    value = _typed(key, value, _field(key, where, file), where, file)
    if key in NAMED and value not in NAMED[key]:
        raise SpecError(f"{where} {key} of {file}: {NAMED[key].unknown_message(value)}")
    return _in_range(key, value, where, file)


def _in_range(key: str, value, where: str, file: str):
    """`value` if RunConfig takes it for field `key`."""
    try:
        RunConfig().replace(**{key: value})
    except ConfigError as error:
        raise SpecError(f"{key} = {format_toml(value)} in {where} of {file} is out of range: {error}") from None
    return value


def _values(key: str, values, where: str, file: str, what: str) -> tuple:
    """A non-empty list of distinct values of field `key`."""
    _field(key, where, file)
    if not isinstance(values, (list, tuple)):
        raise SpecError(f"{key} in {where} of {file} must be a list of {what}, e.g. "
                        f"[{format_toml(values)}]; a single value belongs in [fixed]")
    if not values:
        raise SpecError(f"empty {key} in {where} of {file}: list at least one value, or remove "
                        f"the key to use the default")
    coerced = tuple(_field_value(key, v, where, file) for v in values)
    duplicates = sorted({format_value(v) for v in coerced if coerced.count(v) > 1})
    if duplicates:
        raise SpecError(f"duplicate value(s) {', '.join(duplicates)} in {key} in {where} of "
                        f"{file}: list each value once")
    return coerced


def suggest(name, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(known)}"


def format_value(value) -> str:
    """A value as it appears in cell keys and tables: 0.001, 1e-05, vae, 32."""
    return repr(value) if isinstance(value, float) else str(value)


def format_toml(value) -> str:
    """A value as it would be written in TOML, for error messages."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else repr(value)
