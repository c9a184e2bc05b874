"""``torchrun`` as the launch scripts run it: ``python -m megatron.torchrun [torchrun's arguments]``.

The same launcher (``torch.distributed.run``: its arguments, rendezvous, restarts and logs), but a
run whose worker failed ends with one line naming the rank and its exit code, and exits with that
code (2 for a user error), instead of torchrun's ``ChildFailedError`` traceback and exit 1. The
worker's own error line is above it.
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def exit_code(code: int) -> int:
    """A worker's exit code as a shell reports it: a signal N as 128 + N (at most 255), never 0 for
    a failure."""
    if code < 0:
        return min(128 - code, 255)
    return min(code, 255) or 1


def failure_line(error: ChildFailedError) -> tuple[str, int]:
    """The one line that ends a failed run, and the exit code to end with."""
    rank, failure = error.get_first_failure()
    if failure.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-failure.exitcode}"
    else:
        how = f"exited with code {failure.exitcode}"
    return (f"error: {error.name} failed: rank {rank} {how} (its own error, if it printed one, is above); "
            "the launcher stopped the other ranks", exit_code(failure.exitcode))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("MEGATRON_TEST_LAUNCH_ECHO") == "1":  # tests: what the scripts would launch
        print("LAUNCH torchrun " + " ".join(argv), flush=True)
        return 0
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        line, code = failure_line(error)
        print(line, file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
