"""Errors for bad data: all ``ValueError``s that name the file and say how to fix it."""

from __future__ import annotations

from megatron.errors import ConfigError


class DataError(ConfigError):
    """Input data the pipeline cannot use (raised before training starts)."""


class LooseJSONError(DataError):
    """A loose-JSON corpus line is malformed or lacks the text key."""


class IndexedDatasetError(DataError):
    """A ``.bin``/``.idx`` pair is missing, truncated, foreign, or inconsistent."""
