"""The command line as a user meets it: `python -m bench ...` in a fresh directory.

A bad input gives one clear line on stderr, a non-zero exit status, no traceback and nothing
written that could be mistaken for a result; a divergent run is recorded, as FAILED with its
reason. Each subprocess imports torch and MLflow (seconds of CPU), so the module starts them
all at once, a few at a time, and each test reads the outcome of its own.
"""

import dataclasses
import json
import importlib.util
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench.data
from bench import tracking
from bench.cli import main
from bench.config import RunConfig
from bench.errors import ConfigError
from bench.models import create_model
from bench.registry import LOSSES, METRICS, MODELS, PRESETS

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.toml"
# bench.tracking silences this MLflow warning, but pytest resets warning filters for each test
pytestmark = pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")
SMALL = {"model": "vae", "dataset": "digits", "epochs": 1, "latent": 2, "eval_k": 5, "eval_n": 50, "quality_n": 0,
         "device": "cpu"}


def train(**flags) -> list[str]:
    """`bench train` with a small digits config; a flag given as None is left out."""
    flags = {**SMALL, **flags}
    return ["train", *(arg for name, value in flags.items() if value is not None
                       for arg in (f"--{name.replace('_', '-')}", str(value)))]


def missing(module: str) -> str | None:
    return None if importlib.util.find_spec(module) else f"{module} is not there yet"


# Run as subprocesses, one case for each way a command can fail (each costs seconds of imports;
# more cases run through `main` below).
# name: (arguments, words the error line names, why the case cannot run here or None)
BAD_INPUTS = {
    "unknown model": (train(model="vea"), ["unknown model 'vea'", "did you mean 'vae'"], None),
    "latent not a number": (train(latent="two"), ["--latent", "invalid int value: 'two'"], None),
    "unknown command": (["trian"], ["invalid choice: 'trian'"], None),
    "not a spec snapshot": (["worker", "{bad_snapshot}"], ["is not a spec snapshot", "TOML spec instead"], None),
    "port out of range": (["ui", "--port", "99999"], ["argument --port", "<= 65535, got '99999'"], None),
    "negative threads": (["worker", "smoke", "--threads", "-2"], ["argument --threads", ">= 1"], None),
    "negative table workers": (["table", "seed", "--workers", "-1"], ["--workers must be >= 0"], None),
    "experiment outside results": (train(experiment="../../elsewhere"),
                                   ["--experiment '../../elsewhere'", "no /, \\ or control characters"], None),
    "unknown key in a spec": (["sweep", "{typo_spec}"], ["unknown key 'epoch' in [study] of typo.toml",
                                                         "epochs"], None),
    "unknown paper table": (["table", "nope"], ["unknown paper table 'nope'"], missing("bench.tables")),
    "report without runs": (["report"], ["{results}"], missing("bench.report")),  # results/ is empty
}
COMMANDS = {
    **{name: args for name, (args, _, skip) in BAD_INPUTS.items() if skip is None},
    "divergent": train(loss="gaussian", lr=1e6),  # a Gaussian likelihood at lr 1e6 blows up at once
}


@dataclasses.dataclass
class Finished:
    args: list[str]
    cwd: Path
    results: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict[str, Finished]:
    """Every command of COMMANDS, run as `python -m bench ARGS --results <dir>/results` from an
    empty working directory of its own (the results directory of `report` exists, empty)."""
    root = tmp_path_factory.mktemp("cli")
    typo_spec = root / "typo.toml"
    typo_spec.write_text('[study]\nname = "typo"\ndataset = "digits"\nepoch = 2\n')
    bad_snapshot = root / "bad.spec.json"
    bad_snapshot.write_text("{not json")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    def run(item):
        name, args = item
        home = root / re.sub(r"\W+", "-", name)
        (home / "cwd").mkdir(parents=True)
        if name == "report without runs":
            (home / "results").mkdir()
        args = [a.format(typo_spec=typo_spec, bad_snapshot=bad_snapshot) for a in args]
        done = subprocess.run([sys.executable, "-m", "bench", *args, "--results", str(home / "results")],
                              cwd=home / "cwd", env=env, capture_output=True, text=True, timeout=600)
        return name, Finished(args, home / "cwd", home / "results", done.returncode, done.stdout, done.stderr)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(pool.map(run, COMMANDS.items()))


def error_line(done: Finished) -> str:
    """The one line a failed command writes to stderr (failing the test otherwise)."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bench: error: ")
    return lines[0]


@pytest.mark.slow  # the module's subprocesses take about 40 s of CPU together
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_a_bad_input_is_one_line_on_stderr_and_writes_nothing(finished, name):
    args, words, skip = BAD_INPUTS[name]
    if skip:
        pytest.skip(skip)
    done = finished[name]
    line = error_line(done)
    for word in words:
        assert word.format(results=done.results) in line
    assert done.stdout == ""
    assert list(done.cwd.iterdir()) == []  # no ./mlruns, no ./results
    if name == "report without runs":
        assert list(done.results.iterdir()) == []  # no empty store created on the way
    else:
        assert not done.results.exists()


@pytest.mark.slow
def test_a_divergent_run_fails_in_one_line_and_is_recorded_as_failed(finished):
    done = finished["divergent"]
    line = error_line(done)
    assert "training diverged: loss is " in line and "at epoch 1, step " in line and "lower lr" in line
    client = tracking.connect(tracking.default_uri(done.results))
    [run] = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAIL_REASON] == line.removeprefix("bench: error: ")
    assert not any(key.startswith("test/") for key in run.data.metrics)
    assert client.list_artifacts(run.info.run_id, "model") == []
    assert not (done.results / "checkpoints").exists()
    assert list(done.cwd.iterdir()) == []


# ---------------------------------------------------------------- in this process

# More bad inputs, through `main` in this process: the code paths of the subprocess cases.
MORE_BAD_INPUTS = [
    pytest.param(train(dataset="mnsit"), "unknown dataset 'mnsit': did you mean 'mnist' or 'mnist5k'?",
                 id="unknown dataset"),
    pytest.param(train(loss="msee"), "unknown loss 'msee': did you mean 'mse' or 'seed-bce'?", id="unknown loss"),
    pytest.param(train(arch="convv"), "unknown arch 'convv': did you mean 'conv'?", id="unknown arch"),
    pytest.param(train(preset="seed-vea"), "unknown preset 'seed-vea': did you mean 'seed-vae' or 'seed-cvae'?",
                 id="unknown preset"),
    pytest.param(train(latent=0), "latent must be a positive integer, got 0", id="latent 0"),
    pytest.param(train(batch_size=-1), "batch_size must be a positive integer, got -1", id="batch size -1"),
    pytest.param(train(eval_k=0), "eval_k must be a positive integer, got 0", id="eval-k 0"),
    pytest.param(train(binarize="half"), "binarize must be one of none, static, dynamic, got 'half'",
                 id="unknown binarization"),
    pytest.param(train(device="cuda"), "device 'cuda' asked for but CUDA is not available; use --device cpu",
                 id="cuda on a machine without",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param(["sweep", "no/such/spec.toml"], "spec file 'no/such/spec.toml' not found: check the path",
                 id="missing spec file"),
]


@pytest.mark.parametrize("args, message", MORE_BAD_INPUTS)
def test_more_bad_inputs_are_one_line_too(capsys, tmp_path, args, message):
    assert main([*args, "--results", str(tmp_path / "results")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"bench: error: {message}") and captured.err.count("\n") == 1
    assert not (tmp_path / "results").exists()


def test_train_prints_the_test_metrics_and_where_the_run_is(capsys, mlflow_uri, tmp_path):
    assert main([*train(), "--results", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[0] == ("vae-seed-bce-z2-digits-s0: 1 epochs on digits (none), best epoch 1 by "
                        "val/elbo, device cpu")
    run_id, uri = re.fullmatch(r"mlflow run: (\w+) \((.+)\)", lines[-1]).groups()
    assert uri == tracking.default_uri(tmp_path) == mlflow_uri
    checkpoint = Path(lines[-2].removeprefix("checkpoint: "))
    assert checkpoint == tmp_path / "checkpoints" / run_id / "best.pt" and checkpoint.is_file()
    run = tracking.connect(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "vae-seed-bce-z2-digits-s0"
    printed = dict(re.fullmatch(r"  (\S+)\s+(-?\d+\.\d{3})(?:  \(.*\))?", line).groups()
                   for line in lines if line.startswith("  test/"))
    assert set(printed) == {k for k in run.data.metrics if k.startswith("test/")} - {"test/nll_k", "test/nll_n"}
    for key, text in printed.items():  # the table shows what MLflow holds, to 3 decimals
        assert text == f"{run.data.metrics[key]:.3f}", key
    [nll] = [line for line in lines if line.startswith("  test/nll ")]
    assert nll.endswith("  (k=5, 50 images)")


def test_a_preset_is_the_starting_point_that_flags_override(capsys, mlflow_uri, tmp_path):
    assert main([*train(preset="seed-vae", latent=None, batch_size=128), "--results", str(tmp_path)]) == 0
    run_id = re.search(r"^mlflow run: (\w+) ", capsys.readouterr().out, re.M).group(1)
    run = tracking.connect(mlflow_uri).get_run(run_id)
    params = run.data.params
    assert (params["latent"], params["lr"], params["loss"], params["arch"]) == ("32", "0.0001", "seed-bce", "seed")
    assert params["batch_size"] == "128"  # the flag, not the preset's 64
    assert run.data.tags["vaebench.preset"] == "seed-vae"


def test_a_dry_run_prints_every_cell_and_trains_nothing(capsys, tmp_path):
    assert main(["sweep", str(SMOKE), "--dry-run", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out.index("#  model  loss  seed")
    rows = [line.split() for line in out[header + 1:out.index("", header)]]
    assert rows == [[str(i), model, loss, "0"] for i, (model, loss) in enumerate(
        (m, l) for m in ("vae", "cvae", "ae") for l in ("bce", "mse"))]
    assert "6 cells (6 grid points x 1 seed) x 1 trial = 6 runs" in out
    assert not (tmp_path / "results").exists()


def test_list_names_every_model(capsys):
    assert main(["list", "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"models ({len(MODELS)}):"
    assert [line.split()[0] for line in lines[1:]] == MODELS.names()


def test_list_filters_names_with_a_pattern(capsys):
    assert main(["list", "losses", "b*"]) == 0
    assert capsys.readouterr().out == f"losses (1):\n  {'bce':<14} {LOSSES.entry('bce').summary}\n"


def test_list_takes_a_plain_word_as_part_of_a_name(capsys):
    assert main(["list", "losses", "gauss"]) == 0
    gaussian = f"  {'gaussian':<14} {LOSSES.entry('gaussian').summary}"
    assert capsys.readouterr().out.splitlines() == ["losses (1):", gaussian]
    assert main(["list", "presets", "seed"]) == 0  # seed-vae and seed-cvae, not only a name equal to "seed"
    assert capsys.readouterr().out.splitlines()[0] == f"presets ({len(PRESETS.names('*seed*'))}):"


def test_list_aligns_the_summaries_after_a_long_name(capsys):
    assert main(["list", "metrics"]) == 0  # "precision-recall" is longer than the usual 14 columns
    rows = capsys.readouterr().out.splitlines()[1:]
    starts = {row.index(METRICS.entry(row.split()[0]).summary) for row in rows}
    assert starts == {2 + len("precision-recall") + 1}


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_reader_that_stops_early_gets_no_error_line(unbuffered):
    """`bench list | head -1`: the closed pipe ends the command quietly, not as a path or permission problem."""
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    child = subprocess.Popen([sys.executable, "-m", "bench", "list"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=REPO, env=env)
    child.stdout.close()  # before the interpreter has started: its first write meets a closed pipe
    assert (child.wait(timeout=60), child.stderr.read().decode()) == (141, "")


@pytest.mark.slow  # trains the smoke study's 6 trials (about 10 s)
def test_queueing_only_prints_the_commands_that_finish_the_study(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = ["--results", str(tmp_path / "results")]
    assert main(["sweep", "smoke", "--workers", "0", *results]) == 0
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("--workers 0"))
    worker, then = re.findall(r"`([^`]+)`", hint)
    assert "queued 6 of 6 trials of 'smoke'" in hint and (worker, then) == ("bench worker smoke", "bench report smoke")
    assert main([*worker.split()[1:], *results]) == 0  # as printed: the worker trains all six
    assert main([*then.split()[1:], *results]) == 0
    assert "6 finished" in (tmp_path / "results" / "reports" / "smoke" / "report.md").read_text()

    assert main(["table", "seed", "--workers", "0", *results]) == 0  # a table is not rendered from nothing
    worker = re.findall(r"`([^`]+)`", capsys.readouterr().out)[0]
    assert worker == f"bench worker {REPO / 'experiments' / 'paper' / 'seed.toml'}"  # the cwd is not above it
    assert not (tmp_path / "results" / "tables").exists()


@pytest.mark.slow  # starts the MLflow UI (about 10 s)
def test_bench_ui_serves_the_study_store_without_its_url_on_the_command_line(tmp_path, new_store):
    import urllib.request

    from bench.services import free_port

    store = new_store(tmp_path / "results")
    tracking.experiment_id(tracking.connect(store), "mine")
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "bench", "ui", "--results", str(tmp_path / "results"), "--port",
                           str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mine"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(api, timeout=2) as answer:
                    assert json.load(answer)["experiment"]["name"] == "mine"  # it serves this store
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, ui.stdout.read().decode()
                time.sleep(0.5)
        # a PostgreSQL store's URL holds its password: it is in the environment, not on `ps`
        assert str(tmp_path / "results") not in Path(f"/proc/{ui.pid}/cmdline").read_bytes().decode()
    finally:
        ui.terminate()
        ui.wait(timeout=30)


@pytest.mark.parametrize("name,value", [("VAEBENCH_GRACE_S", "1.5"), ("VAEBENCH_HEARTBEAT_S", "0"),
                                        ("VAEBENCH_STATE_EVERY_S", "soon")])
def test_a_bad_period_in_the_environment_is_one_line_naming_the_variable(tmp_path, name, value):
    """They were read at import: int("1.5") was a traceback, and a heartbeat of 0 blamed --results."""
    done = subprocess.run([sys.executable, "-m", "bench", "worker", "smoke", "--results", str(tmp_path)],
                          cwd=REPO, env={**os.environ, name: value}, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and f"{name}={value!r}" in done.stderr


REAL_LOAD = bench.data.load_dataset


def padded_digits(name, binarize="none", root=None):
    """Digits padded to 10x10 images: a size the conv architecture (stride 4) cannot take.
    Every shipped dataset fits every architecture (digits are 8x8, the rest 28x28)."""
    data = REAL_LOAD(name, binarize, root)
    pad = {split: dataclasses.replace(getattr(data, split), x=F.pad(getattr(data, split).x, (1, 1, 1, 1)))
           for split in ("train", "val", "test")}
    return dataclasses.replace(data, **pad)


def unlabelled_digits(name, binarize="none", root=None):
    """Digits without labels (num_classes 0): every shipped dataset is labelled."""
    return dataclasses.replace(REAL_LOAD(name, binarize, root), num_classes=0)


@pytest.mark.parametrize("load, args, message", [
    (padded_digits, train(arch="conv"),
     "bench: error: arch 'conv' needs image height and width divisible by 4, got 10x10; use an MLP "
     "architecture (seed, kw, iwae, gated) for this dataset"),
    (unlabelled_digits, train(model="cvae"),
     "bench: error: model 'cvae' needs a labelled dataset; 'digits' has no labels"),
], ids=["arch cannot take the image size", "cvae on unlabelled data"])
def test_an_impossible_model_for_the_data_is_one_line(monkeypatch, capsys, tmp_path, load, args, message):
    monkeypatch.setattr(bench.data, "load_dataset", load)
    assert main([*args, "--results", str(tmp_path / "results")]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", message + "\n")
    assert not (tmp_path / "results").exists()


def test_a_cvae_needs_labels():
    cfg = RunConfig(model="cvae", dataset="digits", latent=2)
    with pytest.raises(ConfigError, match="model 'cvae' needs a labelled dataset; 'digits' has no labels"):
        create_model(cfg, (1, 8, 8), num_classes=0)
    assert create_model(cfg, (1, 8, 8), num_classes=10).conditional



@pytest.mark.slow
def test_a_sweep_prints_the_comparison_writes_the_report_and_exits_1_on_a_failed_cell(capsys, tmp_path):
    spec = tmp_path / "mixed.toml"
    spec.write_text('[study]\nname = "mixed"\ndataset = "digits"\nepochs = 1\nobjective = "val/bce"\n'
                    '[grid]\nlr = [1e-3, 1e6]\n[fixed]\nloss = "gaussian"\nlatent = 2\neval_k = 5\neval_n = 50\nquality_n = 0\n')
    code = main(["sweep", str(spec), "--results", str(tmp_path / "results")])
    out, err = capsys.readouterr()
    assert code == 1
    assert "mixed on digits: 1/2 trials done" in out
    [row] = [line for line in out.splitlines() if line.startswith("0.001")]  # the comparison's one row
    assert row.rstrip().endswith(" 1")  # n = 1 seed
    [failed] = [line for line in err.splitlines() if line.startswith("FAILED ")]
    assert "lr=1000000" in failed and "training diverged" in failed
    report = tmp_path / "results" / "reports" / "mixed" / "report.html"
    assert f"report: {report}" in out and report.is_file()
    store = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"  # not this checkout's results/: `make ui` shows another
    assert out.splitlines()[-1].startswith(f"browse the runs: bench ui --tracking-uri {store}, then open http")


def test_the_browse_line_says_make_ui_only_for_the_checkouts_own_results(tmp_path, monkeypatch):
    from bench.cli import _browse

    monkeypatch.chdir(tmp_path)
    default = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    assert _browse(default, "3").startswith(f"browse the runs: bench ui --tracking-uri {default}, then open")
    (tmp_path / "Makefile").write_text("")  # a checkout: `make ui` serves its results/
    assert _browse(default, "3") == ("browse the runs: make ui, then open "
                                     "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning")
    server = "http://tracking:5000"
    assert _browse(server, "3") == f"browse the runs: {server}/#/experiments/3?workflowType=machine_learning"
