"""Shared plumbing of the OpenWebText tools: user errors, atomic outputs, loose-JSON reading.

Every tool writes each output to ``<name>.partial<pid>`` and renames it into place only when the
whole run succeeded, so a failed run leaves no output behind. User mistakes raise ``UserError``;
``cli`` turns it (and ``OSError``) into one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake the user can fix: bad flag, missing file, malformed input line."""


def require_file(path: str, flag: str) -> None:
    """Raise UserError unless ``path`` (given as ``flag``) is an existing file."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist; pass an existing file")


def check_probability(value: float, flag: str) -> float:
    """``value`` if it lies in (0, 1], else UserError naming ``flag``."""
    if not 0.0 < value <= 1.0:
        raise UserError(f"{flag} must be in (0, 1], got {value}")
    return value


@contextlib.contextmanager
def atomic_outputs(*paths: str | None) -> Iterator[list[IO[str] | None]]:
    """Text handles for ``paths`` (None stays None), renamed into place only on success.

    On any exception the partial files are deleted and the exception propagates.
    """
    partials = [None if path is None else f"{path}.partial{os.getpid()}" for path in paths]
    handles: list[IO[str] | None] = []
    try:
        for path, partial in zip(paths, partials):
            if path is not None:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            handles.append(None if partial is None else open(partial, "w", encoding="utf-8"))
        yield handles
        for handle in handles:
            if handle is not None:
                handle.close()
        for path, partial in zip(paths, partials):
            if partial is not None:
                os.replace(partial, path)
    finally:
        for handle, partial in zip(handles, partials):
            if handle is not None:
                handle.close()
            if partial is not None and os.path.exists(partial):
                os.unlink(partial)


def read_records(path: str, skip_bad_lines: bool, counts: dict[str, int],
                 text_key: str = "text") -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of a loose-JSON file.

    A line that is not a JSON object with a string ``text_key`` raises UserError naming
    ``path:line``, or with ``skip_bad_lines`` is counted in ``counts["bad_line"]`` and skipped.
    """
    require_file(path, "--input")
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            problem = _record_problem(line, text_key)
            if isinstance(problem, dict):
                yield number, problem
            elif skip_bad_lines:
                counts["bad_line"] = counts.get("bad_line", 0) + 1
            else:
                raise UserError(f"{path}:{number}: {problem}; fix or remove the line, or pass "
                                "--skip-bad-lines to skip and count it")


def _record_problem(line: bytes, text_key: str) -> dict | str:
    """The parsed record, or a description of what is wrong with ``line``."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "malformed JSON (not UTF-8)"
    except json.JSONDecodeError as error:
        return f"malformed JSON ({error.msg})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if not isinstance(record.get(text_key), str):
        return f"no string {text_key!r} field (found keys {sorted(record)}); set --text-key"
    return record


def dump_record(record: dict) -> str:
    """One loose-JSON line (with newline), non-ASCII kept as is."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def format_counts(counts: dict[str, int]) -> str:
    """``reason: n`` pairs on one line, in insertion order."""
    return ", ".join(f"{reason}: {number}" for reason, number in counts.items())


def cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; user mistakes print ``error: ...`` (one line) and return 2."""
    try:
        return main(argv)
    except (UserError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
