"""Typed errors: each is raised where the problem is detected, its message names the problem
and the fix, and `bench.cli` prints it as one line and exits non-zero (no traceback)."""


class BenchError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 2


class RegistryError(BenchError, KeyError):
    """Unknown model, loss, architecture, dataset, preset or metric name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(BenchError, ValueError):
    """A run configuration that cannot be trained (bad sizes, impossible combinations)."""


class ArchError(ConfigError):
    """An architecture that cannot take the dataset's image size."""


class DataError(BenchError):
    """A dataset that cannot be loaded: missing, corrupt or mismatched files."""


class SpecError(BenchError, ValueError):
    """A study spec (TOML) that is invalid."""


class DivergedError(BenchError, ArithmeticError):
    """Training produced a NaN or infinite loss."""

    def __init__(self, message: str, epoch: int = -1, step: int = -1):
        super().__init__(message)
        self.epoch, self.step = epoch, step


class TrackingError(BenchError):
    """The MLflow store or a run in it cannot be used as asked."""


class StudyError(BenchError):
    """An Optuna study that cannot be run or resumed as asked."""


class CheckpointError(BenchError):
    """A checkpoint that is refused: not a plain state dict (it could run code when loaded)."""
