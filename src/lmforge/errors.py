"""Errors a user can fix. The entry points print them as one line (no traceback wall) and exit 2."""

from __future__ import annotations


class LmforgeError(Exception):
    """Base class: the message alone must tell the user what is wrong and how to fix it."""


class ConfigError(LmforgeError):
    """A config key holds a bad value. Names the key, the problem and the fix."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key, self.problem, self.fix = key, problem, fix
        super().__init__(f"{key}: {problem}. Fix: {fix}")


class DataError(LmforgeError):
    """Input data (a file, a glob, a corpus) is missing or unusable."""


class CheckpointError(LmforgeError):
    """A checkpoint path is missing or the file is not an lmforge checkpoint."""


class TrainingDivergedError(LmforgeError):
    """Too many optimizer steps were skipped for a non-finite loss or gradient (`stage.max_skipped_steps`)."""
