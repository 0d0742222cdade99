"""Bad input of every kind, as a user types it: each case exits non-zero with one clear line on
stderr (`bench: error: ...`), no traceback, and leaves nothing that could be taken for a result
(no finished MLflow run, no COMPLETE Optuna trial, no report). Cases run through `main` in this
process (the same code path as the `bench` command, see test_cli.py for subprocess ones)."""

import gzip
import importlib.util
import socket
from pathlib import Path

import numpy as np
import optuna
import pytest

from bench.cli import main

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:The specified dataset source can be interpreted")]

GOOD_STUDY = '[study]\nname = "bad"\ndataset = "digits"\nepochs = 1\nobjective = "val/bce"\n' \
             '[fixed]\nlatent = 2\neval_k = 5\neval_n = 50\nquality_n = 0\n'
TRAIN = ["train", "--dataset", "digits", "--epochs", "1", "--latent", "2", "--eval-k", "5", "--eval-n", "20", "--quality-n", "0",
         "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(tmp_path: Path, text: str, name: str = "spec.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def idx(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def fashion_files(directory: Path, corrupt: str | None = None) -> None:
    """Tiny valid Fashion-MNIST IDX files (30 train, 5 test), one of them truncated if asked."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"train-images-idx3-ubyte.gz": idx(np.zeros((30, 28, 28)), 2051),
             "train-labels-idx1-ubyte.gz": idx(np.arange(30) % 10, 2049),
             "t10k-images-idx3-ubyte.gz": idx(np.zeros((5, 28, 28)), 2051),
             "t10k-labels-idx1-ubyte.gz": idx(np.arange(5) % 10, 2049)}
    for name, content in files.items():
        (directory / name).write_bytes(content[:-10] if name == corrupt else content)


def no_result(results: Path) -> None:
    """Nothing under `results` that a report or a reader could take for a result."""
    if not results.exists():
        return
    assert not (results / "reports").exists() and not (results / "checkpoints").exists()
    db = results / "optuna.db"
    if db.exists() and db.stat().st_size:
        for summary in optuna.get_all_study_summaries(storage=f"sqlite:///{db}"):
            study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}")
            assert not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))


def run(capsys, args: list[str], results: Path) -> str:
    """`bench ARGS --results RESULTS`; returns its one error line, checking the rules above."""
    code = main([*args, "--results", str(results)])
    out, err = capsys.readouterr()
    assert code != 0, out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("bench: error: "), err
    no_result(results)
    return err.strip()


# name: (arguments with {tmp} for the test's directory, files to write first, words the line names)
CASES = {
    # command line
    "unknown model": (TRAIN + ["--model", "vea"], {}, ["unknown model 'vea'", "did you mean 'vae'"]),
    "unknown loss": (TRAIN + ["--loss", "bec"], {}, ["unknown loss 'bec'", "bce"]),
    "unknown arch": (TRAIN + ["--arch", "gate"], {}, ["unknown arch 'gate'", "gated"]),
    "unknown dataset": (["train", "--dataset", "fashion", "--device", "cpu"], {}, ["unknown dataset 'fashion'"]),
    "zero latent": (TRAIN + ["--latent", "0"], {}, ["latent must be a positive integer, got 0"]),
    "negative batch size": (TRAIN + ["--batch-size", "-5"], {}, ["batch_size must be a positive integer, got -5"]),
    "negative lr": (TRAIN + ["--lr", "-0.1"], {}, ["lr must be a finite number > 0"]),
    "dropout of 1": (TRAIN + ["--dropout", "1"], {}, ["dropout must be in [0, 1)"]),
    "unknown optimizer": (TRAIN + ["--optimizer", "sgd"], {}, ["optimizer must be one of adam, adamnormgrad"]),
    "negative workers": (["sweep", "{tmp}/spec.toml", "--workers", "-1"], {"spec.toml": GOOD_STUDY},
                         ["--workers must be >= 0"]),
    "empty stack": (["sweep", "{tmp}/spec.toml", "--stack", "0"], {"spec.toml": GOOD_STUDY},
                    ["--stack: must be a whole number >= 1, got '0'"]),
    "divergent lr": (TRAIN + ["--loss", "gaussian", "--lr", "1e6"], {}, ["training diverged", "lower lr"]),
    # specs
    "malformed toml": (["sweep", "{tmp}/spec.toml"], {"spec.toml": "[study\nname = 'x'\n"}, ["spec.toml", "TOML"]),
    "unknown key": (["sweep", "{tmp}/spec.toml"], {"spec.toml": GOOD_STUDY.replace("epochs", "epoch")},
                    ["unknown key 'epoch'", "epochs"]),
    "wrong type": (["sweep", "{tmp}/spec.toml"], {"spec.toml": GOOD_STUDY.replace("epochs = 1", 'epochs = "ten"')},
                   ["epochs"]),
    "empty grid": (["sweep", "{tmp}/spec.toml"], {"spec.toml": GOOD_STUDY + "[grid]\nmodel = []\n"}, ["model"]),
    "unknown model in a grid": (["sweep", "{tmp}/spec.toml"], {"spec.toml": GOOD_STUDY + '[grid]\nmodel = ["vea"]\n'},
                                ["vea"]),
    "zero epochs": (["sweep", "{tmp}/spec.toml"], {"spec.toml": GOOD_STUDY.replace("epochs = 1", "epochs = 0")},
                    ["epochs"]),
    "negative seed": (["sweep", "{tmp}/spec.toml"], {"spec.toml": GOOD_STUDY.replace("epochs = 1",
                                                                                        "epochs = 1\nseeds = [-1]")},
                      ["seed"]),
    "spec that is code": (["sweep", "{tmp}/spec.py"], {"spec.py": "import os\nos.system('touch {tmp}/pwned')\n"},
                          ["spec.py"]),
    "missing spec": (["sweep", "{tmp}/nope.toml"], {}, ["nope.toml", "not found"]),
    # storage and tracking
    "unknown storage scheme": (["sweep", "{tmp}/spec.toml", "--storage", "foo://bar"], {"spec.toml": GOOD_STUDY},
                               ["cannot open Optuna storage foo://bar"]),
    "storage without its driver": (["sweep", "{tmp}/spec.toml", "--storage", "mysql://u:hunter2@127.0.0.1/x"],
                                   {"spec.toml": GOOD_STUDY}, ["mysql driver", "u:***@", ".[scale]"]),
    "unreachable storage": (["sweep", "{tmp}/spec.toml", "--storage",
                             "postgresql://u:hunter2@127.0.0.1:{port}/x"], {"spec.toml": GOOD_STUDY},
                            ["cannot open Optuna storage postgresql://u:***@127.0.0.1"]),
    "unreachable tracking server": (["sweep", "{tmp}/spec.toml", "--tracking-uri", "http://127.0.0.1:{port}"],
                                    {"spec.toml": GOOD_STUDY}, ["does not answer", "127.0.0.1"]),
    "results inside a file": (["sweep", "{tmp}/spec.toml"], {"spec.toml": GOOD_STUDY, "file": "not a directory"},
                              ["check the path and its permissions"]),
}
RESULTS = {"results inside a file": "file/results"}


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_line_and_leaves_no_result(capsys, tmp_path, monkeypatch, name):
    args, files, words = CASES[name]
    if name == "unreachable storage" and not importlib.util.find_spec("psycopg"):
        pytest.skip("psycopg (the scale extra) is not installed: the driver case covers this path")
    port = free_port()
    for file, text in files.items():
        (tmp_path / file).write_text(text.replace("{tmp}", str(tmp_path)))
    args = [a.replace("{tmp}", str(tmp_path)).replace("{port}", str(port)) for a in args]
    results = tmp_path / RESULTS.get(name, "results")
    line = run(capsys, args, results)
    for word in words:
        assert word in line, line
    assert "hunter2" not in line
    assert not (tmp_path / "pwned").exists()  # a spec is data: nothing in it runs


def test_a_corrupt_data_file_names_the_file(capsys, tmp_path, monkeypatch):
    fashion_files(tmp_path / "fashion", corrupt="train-images-idx3-ubyte.gz")
    monkeypatch.setenv("VAEBENCH_FASHION_DIR", str(tmp_path / "fashion"))
    line = run(capsys, ["train", "--dataset", "fashion-mnist", "--device", "cpu"], tmp_path / "results")
    assert "train-images-idx3-ubyte.gz" in line and "gzip" in line


def test_a_checksum_mismatch_names_the_file_and_keeps_it(capsys, tmp_path, monkeypatch):
    fashion_files(tmp_path / "data" / "mnist")  # valid IDX files, but not the published MNIST
    monkeypatch.setenv("VAEBENCH_DATA", str(tmp_path / "data"))
    line = run(capsys, ["train", "--dataset", "mnist", "--device", "cpu"], tmp_path / "results")
    assert "sha256" in line and "mnist" in line
    assert (tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_a_study_name_reused_with_another_spec_refuses_in_one_line(capsys, tmp_path):
    results = tmp_path / "results"
    path = spec(tmp_path, GOOD_STUDY)
    assert main(["sweep", path, "--results", str(results)]) == 0
    capsys.readouterr()
    spec(tmp_path, GOOD_STUDY.replace("epochs = 1", "epochs = 3"))  # the same name, more epochs
    code = main(["sweep", path, "--results", str(results)])
    _, err = capsys.readouterr()
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "epochs: 1 -> 3" in err and "new [study] name" in err and "--restart" in err
    study = optuna.load_study(study_name="bad", storage=f"sqlite:///{results / 'optuna.db'}")
    assert [t.params for t in study.get_trials()] == [{"seed": 0}]  # nothing queued under the new values


def test_restart_retrains_a_changed_spec_from_scratch(capsys, tmp_path):
    results = tmp_path / "results"
    path = spec(tmp_path, GOOD_STUDY)
    assert main(["sweep", path, "--results", str(results)]) == 0
    spec(tmp_path, GOOD_STUDY.replace("epochs = 1", "epochs = 2"))
    assert main(["sweep", path, "--results", str(results), "--restart"]) == 0
    from bench import tracking

    client = tracking.connect(tracking.default_uri(results))
    runs = tracking.trial_runs(client, client.get_experiment_by_name("bad").experiment_id, "bad")
    assert [r.data.params["epochs"] for r in runs] == ["2"]  # the 1-epoch run is gone from the study
    study = optuna.load_study(study_name="bad", storage=f"sqlite:///{results / 'optuna.db'}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]


@pytest.fixture
def read_only(tmp_path):
    """A results directory nobody may write into: immutable for root (chattr +i), mode 555 else."""
    import os
    import shutil
    import subprocess

    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)]).returncode:
            pytest.skip("root, and this file system cannot make a directory immutable")
    else:
        path.chmod(0o555)
    yield path
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)])
    else:
        path.chmod(0o755)


def test_a_read_only_results_directory_is_one_line(capsys, tmp_path, read_only):
    line = run(capsys, ["sweep", spec(tmp_path, GOOD_STUDY)], read_only)
    assert str(read_only) in line and "writable" in line, line
    assert list(read_only.iterdir()) == []
