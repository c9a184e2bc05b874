"""The error type for user mistakes: reported as one line, without a traceback, exit status 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad flag, file or combination the user can fix; the message names the value and the fix."""
