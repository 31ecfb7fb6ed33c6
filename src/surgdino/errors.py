"""User-facing errors: raised for bad input, printed as one line by the command line (exit 2)."""

from __future__ import annotations


class SurgDinoError(Exception):
    """An error caused by the user's input (file, field, value) with a message that says the fix."""


class ConfigError(SurgDinoError):
    """Unknown key, wrong type, bad value or unreadable config file."""


class DataError(SurgDinoError):
    """A dataset problem: annotation json, image files, registration."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class CheckpointError(SurgDinoError):
    """A checkpoint that is missing, corrupt, truncated or of the wrong kind."""
