"""The entry-point error policy: only ConfigError is a user error (one line, status 2); a
stopped run is status 1; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import pytest

from megatron.data.errors import DataError
from megatron.errors import ConfigError, TrainingAborted
from megatron.training.entry import run_entry_point


def _raise(error: BaseException):
    def body() -> None:
        raise error

    return body


def test_user_errors_are_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_entry_point(_raise(ConfigError("--lr must be positive, got -1"))) == 2
    assert run_entry_point(_raise(DataError("data.json:3 is not JSON"))) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --lr must be positive, got -1",
                                                    "error: data.json:3 is not JSON"]


def test_a_stopped_run_is_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_entry_point(_raise(TrainingAborted("5 consecutive iterations were skipped"))) == 1
    assert "error: 5 consecutive" in capsys.readouterr().err


@pytest.mark.parametrize("error", [ValueError("an internal invariant"), KeyError("model"), AssertionError()])
def test_other_errors_keep_their_traceback(error: BaseException) -> None:
    with pytest.raises(type(error)):
        run_entry_point(_raise(error))


def test_success_is_status_0() -> None:
    assert run_entry_point(lambda: None) == 0


@pytest.mark.parametrize("message", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 600000ms for recv",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"])
def test_a_lost_peer_is_one_line_and_status_1(message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_entry_point(_raise(RuntimeError(message))) == 1
    assert "another rank most likely died" in capsys.readouterr().err


@pytest.mark.parametrize("message", ["ProcessGroupGloo does not support this op", "nccl needs CUDA GPUs"])
def test_a_message_naming_a_backend_is_not_a_lost_peer(message: str) -> None:
    """Any text containing "gloo" or "NCCL" was reported as "another rank died" (issue 16)."""
    with pytest.raises(RuntimeError):
        run_entry_point(_raise(RuntimeError(message)))


def test_ctrl_c_is_one_line_and_status_130(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --exit-signal-handler, SIGINT printed a KeyboardInterrupt traceback (issue 16)."""
    assert run_entry_point(_raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.startswith("error: interrupted (SIGINT)")


def test_another_rank_waits_for_rank_0s_line_and_ctrl_c_ends_only_the_wait(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 1 waits before exiting (the launcher stops the other ranks once one exits); Ctrl-C in
    that wait printed a chained traceback (the wait ran inside the except clause) and exit 130."""
    waits: list[float] = []

    def interrupted_sleep(seconds: float) -> None:
        waits.append(seconds)
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr("megatron.training.entry.time.sleep", interrupted_sleep)
    assert run_entry_point(_raise(ConfigError("--load x does not exist"))) == 2
    assert run_entry_point(_raise(TrainingAborted("checkpoint could not be written"))) == 1
    assert waits == [2.0, 2.0]
    assert capsys.readouterr().err.splitlines() == ["error (rank 1): --load x does not exist",
                                                    "error (rank 1): checkpoint could not be written"]


def test_an_error_line_is_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``python -u`` print wrote the text and the newline apart, and two ranks' lines were
    glued together ("...write toerror: ...")."""
    writes: list[str] = []

    class Stderr:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stderr", Stderr())
    assert run_entry_point(_raise(ConfigError("--save d is not writable"))) == 2
    assert writes == ["error: --save d is not writable\n"]
