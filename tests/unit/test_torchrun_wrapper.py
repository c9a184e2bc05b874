"""megatron.torchrun's last line and exit code for a failed rank (the launch itself is covered by
the launch-script tests)."""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from megatron.torchrun import exit_code, failure_line


def _failure(exitcode: int) -> ChildFailedError:
    failure = ProcessFailure(local_rank=0, pid=123, exitcode=exitcode, error_file="/nonexistent")
    return ChildFailedError("pretrain_gpt2.py", {3: failure})


def test_a_user_error_keeps_its_exit_code() -> None:
    line, code = failure_line(_failure(2))
    assert code == 2 and line.startswith("error: pretrain_gpt2.py failed: rank 3 exited with code 2")
    assert "\\n" not in line


def test_a_signal_is_128_plus_its_number() -> None:
    line, code = failure_line(_failure(-9))
    assert code == 137 and "rank 3 was killed by SIGKILL" in line
    assert exit_code(0) == 1 and exit_code(-200) == 255
