"""Study specs: the shipped files parse, every mistake fails with a one-line fix, and a spec
turns into the same cells and RunConfigs every time."""

import copy
import hashlib
import re

import pytest

from bench.config import RunConfig
from bench.errors import SpecError
from bench.registry import DATASETS, Entry
from bench.spec import (EXPERIMENTS_DIR, OBJECTIVES, Cell, Distribution, format_plan, load_spec,
                        override, parse_spec)

# The smallest spec worth testing: two models x two latent sizes, two seeds.
BASE = {
    "study": {"name": "tiny", "dataset": "digits", "seeds": [0, 1], "epochs": 2,
              "objective": "val/bce"},
    "grid": {"model": ["ae", "vae"], "latent": [2, 8]},
    "fixed": {"arch": "seed", "lr": 1e-3},
}


def spec_with(**changes) -> dict:
    """BASE with tables changed: spec_with(grid={"latent": [2]}, study={"epochs": 3});
    a None value removes the key, a table given as None removes the table."""
    data = copy.deepcopy(BASE)
    for table, values in changes.items():
        if values is None:
            data.pop(table, None)
            continue
        data.setdefault(table, {})
        for key, value in values.items():
            if value is None:
                data[table].pop(key, None)
            else:
                data[table][key] = value
    return data


def fails(data: dict, *fragments: str) -> str:
    """parse_spec(data) raises a one-line SpecError containing every fragment."""
    with pytest.raises(SpecError) as error:
        parse_spec(data, source="tiny.toml")
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- the shipped specs -------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(EXPERIMENTS_DIR.rglob("*.toml")),
                         ids=lambda p: p.relative_to(EXPERIMENTS_DIR).as_posix())
def test_every_shipped_spec_parses_and_gives_valid_configs(path):
    spec = load_spec(path)
    assert spec.path == str(path)
    assert spec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    dataset = "mnist5k" if spec.dataset == "auto" else spec.dataset
    for cell in spec.cells():
        assert isinstance(spec.config(cell, dataset=dataset), RunConfig)


def test_default_spec_is_the_seed_question_at_scale():
    spec = load_spec(EXPERIMENTS_DIR / "default.toml")
    assert spec.name == "default"
    assert len(spec.cells()) == 3 * 2 * 4 * 3 == 72
    assert spec.grid == (("model", ("ae", "vae", "cvae")), ("loss", ("bce", "mse")),
                         ("latent", (2, 8, 16, 32)))
    assert spec.seeds == (0, 1, 2)
    assert (spec.objective, spec.direction) == ("val/bce", "minimize")
    assert spec.dataset == "auto" and spec.binarize == "none"
    assert spec.search is None and spec.trials_per_cell == 1
    assert dict(spec.fixed) == {"arch": "seed", "batch_size": 64, "lr": 1e-3,
                                "eval_k": 100, "eval_n": 500, "quality_n": 1000}
    assert spec.time_budget_minutes == 15


def test_smoke_spec_is_tiny():
    spec = load_spec("smoke")  # a bare name means experiments/smoke.toml
    assert spec.dataset == "digits" and spec.epochs == 2 and spec.seeds == (0,)
    assert len(spec.cells()) == 6
    assert {spec.config(c).model for c in spec.cells()} == {"ae", "vae", "cvae"}
    assert all(spec.config(c).eval_k == 10 for c in spec.cells())


def test_search_spec_searches_one_cell():
    spec = load_spec("search")
    assert [c.key for c in spec.cells()] == ["seed=0"]
    assert spec.search.n_trials == 12 and spec.trials_per_cell == 12
    assert (spec.search.sampler, spec.search.pruner) == ("tpe", "median")
    assert spec.search.params == (
        Distribution("lr", "float", low=1e-4, high=1e-2, log=True),
        Distribution("beta", "float", low=0.5, high=2.0),
        Distribution("latent", "int", low=2, high=64, log=True),
    )
    assert (spec.objective, spec.direction) == ("val/elbo", "maximize")
    config = spec.config(spec.cells()[0], lr=3e-3, beta=1.5, latent=20)
    assert (config.model, config.dataset, config.binarize, config.epochs) == (
        "vae", "mnist5k", "dynamic", 8)
    assert (config.lr, config.beta, config.latent) == (3e-3, 1.5, 20)


def test_search_distributions_sample_through_optuna():
    import optuna

    spec = load_spec("search")
    study = optuna.create_study(direction=spec.direction,
                                sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    sampled = {p.name: p.suggest(trial) for p in spec.search.params}
    assert sampled == trial.params
    config = spec.config(spec.cells()[0], **sampled)
    assert 1e-4 <= config.lr <= 1e-2 and 0.5 <= config.beta <= 2.0 and 2 <= config.latent <= 64
    assert isinstance(config.latent, int)


# --- cells and configs -------------------------------------------------------------------------

def test_cells_are_the_grid_times_the_seeds_with_the_seed_varying_slowest():
    spec = parse_spec(BASE)
    assert [c.key for c in spec.cells()] == [
        "model=ae,latent=2,seed=0", "model=ae,latent=8,seed=0",
        "model=vae,latent=2,seed=0", "model=vae,latent=8,seed=0",
        "model=ae,latent=2,seed=1", "model=ae,latent=8,seed=1",
        "model=vae,latent=2,seed=1", "model=vae,latent=8,seed=1",
    ]
    assert [c.index for c in spec.cells()] == list(range(8))
    assert spec.cells() == parse_spec(copy.deepcopy(BASE)).cells()


def test_cell_keys_are_unique_and_find_their_cell_again():
    spec = load_spec("default")
    keys = [c.key for c in spec.cells()]
    assert len(set(keys)) == len(keys)
    cell = spec.cells()[13]
    assert cell.key == "model=vae,loss=mse,latent=8,seed=0"
    assert cell.grid_key == "model=vae,loss=mse,latent=8" and cell.seed == 0
    assert cell.as_dict() == {"model": "vae", "loss": "mse", "latent": 8, "seed": 0}
    assert spec.cell(cell.key) == cell
    with pytest.raises(SpecError, match="no cell 'model=vae,seed=9'"):
        spec.cell("model=vae,seed=9")


def test_float_values_have_stable_keys():
    spec = parse_spec(spec_with(grid={"lr": [1e-4, 1], "model": None, "latent": None},
                                fixed={"lr": None}))
    assert spec.grid == (("lr", (1e-4, 1.0)),)  # an int is accepted for a float field
    assert [c.key for c in spec.cells()] == ["lr=0.0001,seed=0", "lr=1.0,seed=0",
                                             "lr=0.0001,seed=1", "lr=1.0,seed=1"]


def test_config_layers_fixed_study_cell_and_sampled_values():
    spec = parse_spec(spec_with(search={"n_trials": 3, "params": {
        "beta": {"type": "float", "low": 0.5, "high": 2}}}))
    cell = spec.cells()[5]  # model=ae, latent=8, seed=1
    assert spec.config(cell, beta=1.25) == RunConfig(
        model="ae", latent=8, seed=1, arch="seed", lr=1e-3, dataset="digits", epochs=2,
        beta=1.25)
    assert spec.config(cell, beta=1).beta == 1.0  # coerced to the field's type
    with pytest.raises(SpecError, match="lr are not searched"):
        spec.config(cell, lr=0.1)


def test_auto_dataset_must_be_resolved_before_configs():
    spec = parse_spec(spec_with(study={"dataset": "auto"}))
    cell = spec.cells()[0]
    with pytest.raises(SpecError, match="dataset is 'auto'"):
        spec.config(cell)
    assert spec.config(cell, dataset="mnist5k").dataset == "mnist5k"
    resolved = spec.with_dataset("mnist5k")
    assert resolved.dataset == "mnist5k" and resolved.sha256 == spec.sha256
    assert resolved.config(resolved.cells()[0]).dataset == "mnist5k"
    with pytest.raises(SpecError, match="did you mean 'mnist5k'"):
        spec.config(cell, dataset="mnist5")


def test_a_study_without_grid_or_search_is_the_fixed_config_times_the_seeds():
    spec = parse_spec(spec_with(grid=None, study={"seeds": [3, 4, 5]}))
    assert [c.key for c in spec.cells()] == ["seed=3", "seed=4", "seed=5"]
    assert spec.config(spec.cells()[2]) == RunConfig(arch="seed", lr=1e-3, dataset="digits",
                                                     epochs=2, seed=5)


def test_defaults_of_a_minimal_spec():
    spec = parse_spec({"study": {"name": "minimal"}})
    assert (spec.dataset, spec.binarize, spec.seeds, spec.epochs) == ("auto", "none", (0,), 10)
    assert (spec.objective, spec.direction) == ("val/elbo", OBJECTIVES["val/elbo"])
    assert (spec.storage, spec.tracking_uri, spec.time_budget_minutes) == ("", "", None)
    assert spec.path == "" and len(spec.sha256) == 64


def test_a_dict_spec_is_hashed_canonically():
    same = {"fixed": BASE["fixed"], "grid": BASE["grid"], "study": BASE["study"]}
    assert parse_spec(same).sha256 == parse_spec(BASE).sha256
    assert parse_spec(spec_with(study={"epochs": 3})).sha256 != parse_spec(BASE).sha256


def test_override_changes_study_fields_and_revalidates():
    spec = load_spec("default")
    quick = override(spec, epochs=1, seeds=[0])
    assert (quick.epochs, quick.seeds, len(quick.cells())) == (1, (0,), 24)
    assert quick.sha256 != spec.sha256 and quick.path == spec.path
    assert parse_spec(spec.to_dict()).cells() == spec.cells()  # to_dict round-trips
    with pytest.raises(SpecError, match="epochs = 0 in \\[study\\] of default.toml with overrides"):
        override(spec, epochs=0)
    with pytest.raises(SpecError, match="needs an ELBO"):
        override(spec, objective="val/elbo")  # the direction follows; the ae cells do not


# --- the dry run -------------------------------------------------------------------------------

def test_plan_lists_every_cell_and_the_count():
    spec = parse_spec(BASE)
    plan = format_plan(spec, train_size=1000)
    lines = plan.splitlines()
    assert "#  model  latent  seed" in lines
    for cell in spec.cells():
        row = [str(cell.index), *map(str, cell.as_dict().values())]
        assert any(line.split() == row for line in lines), row
    assert "8 cells (4 grid points x 2 seeds) x 1 trial = 8 runs" in lines


def test_plan_estimates_the_time_and_warns_over_budget():
    spec = parse_spec(spec_with(study={"time_budget_minutes": 1}, search={
        "n_trials": 5, "params": {"beta": {"type": "float", "low": 0.5, "high": 2.0}}}))
    # 8 cells x 5 trials = 40 runs: 40 x 2 epochs x 1000 images / (1000/s x 2) + 40 x 3 s / 2
    # = 100 s
    plan = format_plan(spec, train_size=1000, samples_per_s=1000, workers=2)
    assert "search: 5 trials per cell, tpe sampler, median pruner" in plan
    assert "beta: float in [0.5, 2.0]" in plan
    assert "= 40 runs" in plan
    assert "estimated time: about 1.7 min" in plan and "an estimate" in plan
    assert "warning: the estimate (1.7 min) exceeds time_budget_minutes = 1" in plan
    assert "warning" not in format_plan(spec, train_size=1000, samples_per_s=1000, workers=4)


def test_plan_takes_the_train_size_from_the_dataset_registry():
    plan = format_plan(parse_spec(BASE), samples_per_s=1259, overhead_s=0)
    assert "x 1,259 images" in plan  # digits' 1,259 training images
    assert "about 16 s" in plan  # 8 runs x 2 epochs x 1259 images / 1259 per s


def test_plan_without_a_train_size_says_so():
    unresolved = parse_spec({**BASE, "study": {**BASE["study"], "dataset": "auto"},
                             "grid": {"model": ["vae"]}})
    assert "estimated time: unknown; pass train_size" in format_plan(unresolved)


# --- mistakes, each one line that names the key and the fix ------------------------------------

MISTAKES = [
    # unknown tables and keys, with the close one suggested
    (spec_with(gird={"latent": [2]}), ["unknown table 'gird'", "did you mean 'grid'?"]),
    (spec_with(grid={"latnet": [2]}),
     ["unknown key 'latnet' in [grid] of tiny.toml: did you mean 'latent'?"]),
    (spec_with(fixed={"batchsize": 32}), ["'batchsize' in [fixed]", "did you mean 'batch_size'?"]),
    (spec_with(study={"epoch": 3}), ["'epoch' in [study]", "did you mean 'epochs'?"]),
    (spec_with(study={"seed": 3}), ["'seed' in [study]", "did you mean 'seeds'?"]),
    (spec_with(study={"lr": 0.1}), ["'lr' in [study]", "move it to [fixed]"]),
    (spec_with(search={"n_trials": 2, "samplr": "tpe", "params": {"beta": {
        "type": "float", "low": 0.5, "high": 2}}}), ["'samplr' in [search]", "'sampler'"]),
    (spec_with(search={"n_trials": 2, "params": {"beta": {
        "type": "float", "low": 0.5, "hihg": 2}}}), ["unknown key 'hihg'", "did you mean 'high'?"]),
    ({"grid": {"latent": [2]}}, ["missing [study]"]),
    (spec_with(study={"name": None}), ["missing name in [study]"]),
    # a key in two tables; the study-only fields
    (spec_with(grid={"lr": [1e-3, 1e-2]}), ["'lr' is set in both [grid] and [fixed]"]),
    (spec_with(search={"n_trials": 2, "params": {"latent": {"type": "int", "low": 2, "high": 9}}}),
     ["'latent' is set in both [grid] and [search.params]"]),
    (spec_with(grid={"epochs": [1, 2]}), ["'epochs' in [grid]", "belongs to [study]"]),
    (spec_with(fixed={"seed": 1}), ["'seed' in [fixed]", "seeds = [0, 1, 2]"]),
    (spec_with(fixed={"dataset": "mnist"}), ["'dataset' in [fixed]", "belongs to [study]"]),
    (spec_with(search={"n_trials": 2, "params": {"binarize": {
        "type": "categorical", "choices": ["none", "dynamic"]}}}),
     ["'binarize' in [search.params]"]),
    # wrong types
    (spec_with(fixed={"batch_size": "64"}), ['batch_size = "64" in [fixed]', "an integer"]),
    (spec_with(fixed={"lr": "fast"}), ["lr = \"fast\" in [fixed]", "a number, e.g. lr = 0.001"]),
    (spec_with(grid={"latent": [2, 8.5]}), ["latent = 8.5 in [grid]", "an integer"]),
    (spec_with(fixed={"batch_size": True}), ["batch_size = true", "an integer"]),
    (spec_with(fixed={"batch_size": [32, 64]}), ["batch_size in [fixed]", "move it to [grid]"]),
    (spec_with(grid={"latent": 8}), ["latent in [grid]", "must be a list"]),
    (spec_with(study={"epochs": "10"}), ['epochs = "10" in [study]', "an integer"]),
    (spec_with(study={"name": 3}), ["name = 3 in [study]", "a string"]),
    ({**BASE, "fixed": [1, 2]}, ["fixed in tiny.toml must be a table"]),
    # empty, duplicate, out-of-range values
    (spec_with(grid={"latent": []}), ["empty latent in [grid]"]),
    ({**BASE, "search": {"n_trials": 2, "pruner": "hyperband", "params": {"beta": {"type": "float", "low": 0.5,
                                                                                  "high": 2.0}}}},
     ['pruner = "hyperband" in [search] of tiny.toml', "grid points and seeds", '"median" (per cell)']),
    (spec_with(study={"name": " "}), ["name = ' ' in [study]", "empty"]),
    # a name becomes folders under results/: "../x" wrote artifacts outside them
    *((spec_with(study={"name": name}), [f"name = {name[:60]!r} in [study]", "no /, \\ or control characters"])
      for name in ("../../escaped", "/tmp/abs", "a\\b", "..", "tab\there", "x" * 101)),
    (spec_with(study={"seeds": []}), ["seeds in [study]", "non-empty list"]),
    (spec_with(study={"seeds": 0}), ["seeds = [0]"]),
    (spec_with(study={"seeds": [0, 0]}), ["duplicate seeds"]),
    (spec_with(study={"seeds": [-1]}), ["seed = -1 in [study]", ">= 0"]),
    (spec_with(grid={"latent": [2, 8, 2]}), ["duplicate value(s) 2 in latent in [grid]"]),
    (spec_with(study={"epochs": 0}), ["epochs = 0 in [study]", "positive integer"]),
    (spec_with(study={"binarize": "yes"}), ['binarize = "yes" in [study]', "none, static, dynamic"]),
    (spec_with(study={"storage": "optuna.db"}), ["storage = 'optuna.db'", "sqlite:///"]),
    (spec_with(study={"time_budget_minutes": 0}), ["time_budget_minutes = 0", "> 0"]),
    # the search
    (spec_with(search={"params": {"beta": {"type": "float", "low": 0.5, "high": 2}}}),
     ["missing n_trials in [search]"]),
    (spec_with(search={"n_trials": 0, "params": {"beta": {"type": "float", "low": 0.5,
                                                           "high": 2}}}),
     ["n_trials = 0 in [search]", "positive integer"]),
    (spec_with(search={"n_trials": 2}), ["no [search.params]"]),
    (spec_with(search={"n_trials": 2, "sampler": "tpee", "params": {"beta": {
        "type": "float", "low": 0.5, "high": 2}}}), ["unknown sampler 'tpee'", "'tpe'"]),
    (spec_with(search={"n_trials": 2, "pruner": "meridian", "params": {"beta": {
        "type": "float", "low": 0.5, "high": 2}}}), ["unknown pruner 'meridian'", "'median'"]),
    (spec_with(search={"n_trials": 2, "params": {"beta": {"type": "float", "low": 2, "high": 2}}}),
     ["low = 2.0 is not below high = 2.0 for beta"]),
    (spec_with(search={"n_trials": 2, "params": {"lr": {"type": "float", "low": 0, "high": 1,
                                                        "log": True}}}, fixed={"lr": None}),
     ["log = true needs low > 0", "for lr"]),
    (spec_with(search={"n_trials": 2, "params": {"beta": {"type": "normal", "low": 0, "high": 1}}}),
     ["unknown type 'normal' for beta"]),
    (spec_with(search={"n_trials": 2, "params": {"beta": {"low": 0, "high": 1}}}),
     ["missing type for beta"]),
    (spec_with(search={"n_trials": 2, "params": {"k": {"type": "float", "low": 1, "high": 5}}}),
     ["type = 'float' for k", 'use type = "int"']),
    (spec_with(search={"n_trials": 2, "params": {"k": {"type": "int", "low": 1.5, "high": 5}}}),
     ["low = 1.5 in the int distribution of k", "low takes an integer"]),
    (spec_with(search={"n_trials": 2, "params": {"loss": {"type": "categorical", "choices": []}}}),
     ["no choices for loss"]),
    (spec_with(search={"n_trials": 2, "params": {"k": {"type": "categorical",
                                                       "choices": [1, "5"]}}}),
     ['k = "5" in [search.params]', "an integer"]),
    (spec_with(search={"n_trials": 2, "params": {"beta": {"type": "categorical",
                                                          "choices": [0.5, 2], "low": 1}}}),
     ["unknown key 'low' in the categorical distribution of beta"]),
    # registry names, wherever they appear
    (spec_with(grid={"model": ["ae", "vea"]}), ["[grid] model", "unknown model 'vea'",
                                                "did you mean 'vae'"]),
    (spec_with(fixed={"loss": "bec"}), ["[fixed] loss", "unknown loss 'bec'", "'bce'"]),
    (spec_with(fixed={"arch": "sed"}), ["[fixed] arch", "unknown arch 'sed'", "'seed'"]),
    (spec_with(study={"dataset": "mnits"}), ["[study] dataset", "unknown dataset 'mnits'",
                                             "'mnist'"]),
    (spec_with(search={"n_trials": 2, "params": {"loss": {"type": "categorical",
                                                          "choices": ["bce", "laplac"]}}}),
     ["[search.params] loss", "unknown loss 'laplac'", "'laplace'"]),
    # impossible combinations
    (spec_with(study={"objective": "val/elbo"}),
     ["objective 'val/elbo'", "model 'ae' from [grid]", 'use objective = "val/bce"',
      "drop 'ae'"]),
    (spec_with(grid=None, study={"objective": "val/elbo"}, fixed={"model": "ae"}),
     ["model 'ae' from [fixed]", "val/mse"]),
    (spec_with(study={"objective": "val/elbo"}, grid={"model": None}, search={
        "n_trials": 2, "params": {"model": {"type": "categorical", "choices": ["vae", "ae"]}}}),
     ["model 'ae' from [search.params]"]),
    (spec_with(study={"objective": "val/nll"}),
     ["unknown objective 'val/nll'", "val/elbo (maximize), val/loss (minimize)"]),
    (spec_with(study={"direction": "maximize"}),
     ["direction = 'maximize' contradicts objective 'val/bce'", "use direction = 'minimize'"]),
    (spec_with(study={"direction": "up"}), ["unknown direction 'up'"]),
    # ranges are RunConfig's: the spec says where the value is, RunConfig what is wrong with it
    (spec_with(grid={"latent": [0, 2]}), ["latent = 0 in [grid] of tiny.toml",
                                          "latent must be a positive integer, got 0"]),
    (spec_with(fixed={"dropout": 1.5}), ["dropout = 1.5 in [fixed]", "dropout must be in [0, 1)"]),
    (spec_with(study={"epochs": {"digits": 0}}), ["epochs = 0 in [study] epochs.digits",
                                                  "epochs must be a positive integer"]),
    (spec_with(search={"n_trials": 2, "params": {"dropout": {"type": "float", "low": 0,
                                                             "high": 1}}}),
     ["dropout = 1.0 from [search.params]", "narrow the distribution"]),
]


@pytest.mark.parametrize("data, fragments", MISTAKES,
                         ids=[re.sub(r"\W+", "-", fragments[0]).strip("-")[:40]
                              for _, fragments in MISTAKES])
def test_mistakes_fail_with_a_one_line_fix(data, fragments):
    fails(data, *fragments)


def test_a_cvae_needs_a_labelled_dataset(monkeypatch):
    monkeypatch.setitem(DATASETS._entries, "noise",
                        Entry("noise", object(), {"labelled": False}))
    fails(spec_with(study={"dataset": "noise"}, grid={"model": ["vae", "cvae"]}),
          "model 'cvae' from [grid] of tiny.toml needs labels", "'noise' is unlabelled",
          "digits", "drop 'cvae'")
    assert parse_spec(spec_with(study={"dataset": "noise"})).dataset == "noise"  # no cvae: fine


# --- reading files -----------------------------------------------------------------------------

def test_a_missing_file_names_the_shipped_specs(tmp_path):
    with pytest.raises(SpecError, match="not found.*shipped specs.*default"):
        load_spec(tmp_path / "nope.toml")


def test_a_toml_syntax_error_gives_the_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[study]\nname = "broken"\nepochs = \n')
    with pytest.raises(SpecError, match=r"TOML syntax error in broken.toml: .*line 3"):
        load_spec(path)


def test_an_unreadable_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path)  # a directory
    path = tmp_path / "latin1.toml"
    path.write_bytes('[study]\nname = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(SpecError, match="UTF-8"):
        load_spec(path)


def test_errors_name_the_file_they_came_from(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[study]\nname = "mine"\n[grid]\nlatnet = [2]\n')
    with pytest.raises(SpecError, match="unknown key 'latnet' in \\[grid\\] of mine.toml"):
        load_spec(path)


def test_cells_are_plain_values():
    cell = Cell(0, (("model", "vae"), ("seed", 0)))
    assert cell.key == "model=vae,seed=0" and cell.grid_key == "model=vae"
