"""Errors the pipeline raises on purpose. Each carries a message meant for a person."""

from __future__ import annotations

from typing import Any


class EnginewrightError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class RecipeError(EnginewrightError):
    """A recipe that cannot be read or does not validate (bad input: exit code 2)."""

    exit_code = 2


class ModelError(EnginewrightError):
    """A model folder that is missing, incomplete or of an unsupported architecture."""

    exit_code = 2


class StageError(EnginewrightError):
    """A stage that could not produce its artifact."""


class VerificationError(EnginewrightError):
    """A stage's artifact missed a verification threshold from the recipe."""

    def __init__(self, stage: str, failures: list[str], metrics: dict[str, Any]):
        self.stage = stage
        self.failures = failures
        self.metrics = metrics
        super().__init__(f"stage '{stage}' failed verification: " + "; ".join(failures))

    def __reduce__(self):  # survives pickling (a stage run in a child process raises it in the parent)
        return (type(self), (self.stage, self.failures, self.metrics), self.__dict__)


class ResourceError(EnginewrightError):
    """This machine lacks what a stage needs (memory, disk); nothing was written."""

    exit_code = 2


class CacheError(EnginewrightError):
    """The artifact cache cannot be used (permissions, a lock, a broken entry that cannot be moved)."""
