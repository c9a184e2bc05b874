"""Progress that long, quiet work reports (a checkpoint's flush to disk and its hashing), for
whoever listens: the training loop's progress watchdog. Without a listener ``report`` does nothing."""

from __future__ import annotations

from collections.abc import Callable

_listener: Callable[[], None] | None = None


def report() -> None:
    """Some progress was made (a file flushed, a chunk hashed)."""
    if _listener is not None:
        _listener()


def listen(listener: Callable[[], None] | None) -> None:
    """Send every ``report`` to ``listener`` (None: to nobody)."""
    global _listener
    _listener = listener
