"""Fixtures shared by several test files."""

import pytest
import torch


# Tiny networks at batch 64: one torch thread is as fast as two on an idle 2-core machine and
# several times faster on a busy one (measured), and subprocess workers set their own threads.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny networks on one CPU thread: with two cores (CI, or a busy machine)
    one thread is several times faster than two that contend. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- empty MLflow and Optuna stores

@pytest.fixture(scope="session")
def new_store(tmp_path_factory):
    """`new_store(directory)` puts an empty MLflow store (`mlflow.db`) and an empty Optuna
    storage (`optuna.db`) in `directory`, where `bench` looks for them by default, and returns
    the MLflow URI. Creating a sqlite store runs over a second of schema migrations, so both are
    created once per session and copied (milliseconds). The MLflow tracking URI that the code
    sets globally (and exports to subprocesses) is reset at the end of the session."""
    import os
    import shutil

    import mlflow
    import optuna

    from bench import tracking

    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    templates = tmp_path_factory.mktemp("store-templates")
    tracking.connect(f"sqlite:///{templates / 'mlflow.db'}")
    optuna.storages.RDBStorage(f"sqlite:///{templates / 'optuna.db'}").engine.dispose()

    def copy_into(directory) -> str:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ("mlflow.db", "optuna.db"):
            shutil.copyfile(templates / name, directory / name)
        return f"sqlite:///{directory / 'mlflow.db'}"

    yield copy_into
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture
def mlflow_uri(tmp_path, new_store) -> str:
    """sqlite:///<tmp_path>/mlflow.db: a fresh, empty MLflow store (with an empty
    <tmp_path>/optuna.db beside it, the default places for `results=tmp_path`)."""
    return new_store(tmp_path)
