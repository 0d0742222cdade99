"""vaebench: train, evaluate, track and compare autoencoder variants."""

from bench import evaluate, losses, models, presets  # noqa: F401  (populate the registries)

try:
    from bench import data  # noqa: F401
except ImportError:  # pragma: no cover - only while the package is being assembled
    pass

from bench.registry import ALL, ARCHS, DATASETS, LOSSES, MODELS, PRESETS  # noqa: F401

__version__ = "0.1.0"


def load_run(run_id: str, tracking_uri: str | None = None):
    """The model logged by MLflow run `run_id` (state dict + config, weights_only=True)."""
    from bench.tracking import load_model

    return load_model(run_id, tracking_uri=tracking_uri)
