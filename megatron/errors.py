"""The error type for user mistakes: reported as one line, without a traceback, exit status 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad flag, file or combination the user can fix; the message names the value and the fix."""


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. persistent non-finite loss); the message says why."""
