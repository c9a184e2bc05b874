"""Start-up checks of the files an inference tool writes at the end of its run.

Generation and evaluation write their output only after loading a model (and, for evaluation,
after the whole run): a path that cannot be written must be reported before any of that.
"""

from __future__ import annotations

import os

from megatron.errors import ConfigError


def check_output_file(flag: str, path: str | os.PathLike) -> None:
    """Raise ConfigError naming ``flag`` unless ``path`` can be created or overwritten: its
    directory exists and is writable, and ``path`` is not a directory (nor an unwritable file).

    Writes nothing. Every rank may call it (each checks its own view of the file system).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory; pass a file path such as {os.path.join(path, 'out.json')}")
    if not os.path.exists(directory):
        raise ConfigError(f"{flag} {path}: the directory {directory} does not exist; create it first")
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag} {path}: {directory} is not a directory; pass a path in a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the directory {directory} is not writable; pass a path in a "
                          "writable directory")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path} exists and is not writable; pass another path or fix its permissions")
