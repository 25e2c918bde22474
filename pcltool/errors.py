"""Typed errors. Each carries the exit code the CLI returns and a message that says how to fix it."""

from __future__ import annotations


class PcltoolError(Exception):
    """Base of every error pcltool reports to a user (never a traceback)."""

    exit_code = 1


class RecipeError(PcltoolError):
    """A recipe file or a --set override is invalid."""

    exit_code = 2


class UsageError(PcltoolError):
    """A flag or argument has a value that cannot be used."""

    exit_code = 2


class DataError(PcltoolError):
    """A dataset is missing, unreadable or malformed."""

    exit_code = 3


class RunDirError(PcltoolError):
    """The run directory is missing, locked or not a pcltool run."""

    exit_code = 4


class RunLockedError(RunDirError):
    """Another pcltool process holds the run's lock."""


class MissingArtifactError(RunDirError):
    """A stage's input has not been produced yet; the message names the command that makes it."""


class StaleArtifactError(RunDirError):
    """An artifact on disk no longer matches the sha256 the manifest recorded for it."""


class TrainingDivergedError(PcltoolError):
    """The loss became NaN or infinite."""

    exit_code = 5


class VerificationError(PcltoolError):
    """An artifact failed its verification gate (parity, accuracy drop, checker)."""

    exit_code = 6


class BackendUnavailableError(PcltoolError):
    """An optional runtime (TensorRT, a GPU, an execution provider) is not installed or not usable."""

    exit_code = 7


class EngineMismatchError(PcltoolError):
    """A serialized engine was built for another GPU or TensorRT version."""

    exit_code = 8
