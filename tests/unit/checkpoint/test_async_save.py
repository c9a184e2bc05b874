"""The pieces of ``--async-save``: a snapshot later steps cannot change, files written from it
equal to a direct save, and a background failure raised where the training thread waits."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from megatron.checkpoint.async_save import BackgroundSaver, BufferPool, Snapshots, snapshot


def _state() -> dict:
    weight = torch.arange(6.0).reshape(2, 3)
    return {"model": {"weight": weight, "bias_view": weight[0]}, "step": 3, "groups": [{"lr": 0.1, "params": [0]}],
            "rng": (torch.get_rng_state(), 7), "args": argparse.Namespace(lr=0.1), "none": None}


def test_a_snapshot_does_not_change_when_training_does() -> None:
    state = _state()
    copy, _ = snapshot(state)
    state["model"]["weight"].add_(100.0)
    state["groups"][0]["lr"] = 0.5
    state["args"].lr = 0.5
    assert torch.equal(copy["model"]["weight"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(copy["model"]["bias_view"], torch.arange(3.0))
    assert copy["groups"][0]["lr"] == 0.1 and copy["args"].lr == 0.1
    assert copy["step"] == 3 and copy["none"] is None and copy["rng"][1] == 7


def test_written_snapshots_load_as_the_state(tmp_path: Path) -> None:
    state = _state()
    sink = Snapshots()
    sink.save(state, str(tmp_path / "a" / "model.pt"))
    sink.save(state["model"], str(tmp_path / "b.pt"), zipfile=False)
    state["model"]["weight"].zero_()
    sink.write_all()
    assert not sink.files, "the host copies are released once written"
    loaded = torch.load(tmp_path / "a" / "model.pt", weights_only=False)
    assert torch.equal(loaded["model"]["weight"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(torch.load(tmp_path / "b.pt", weights_only=True)["weight"], torch.arange(6.0).reshape(2, 3))


def test_the_next_snapshot_reuses_the_written_ones_buffers(tmp_path: Path) -> None:
    pool = BufferPool()
    state = _state()
    first = Snapshots(pool)
    first.save(state, str(tmp_path / "1.pt"))
    buffers = {id(buffer) for _, _, _, kept in first.files for buffer in kept}
    first.write_all()
    state["model"]["weight"].mul_(2.0)
    second = Snapshots(pool)
    second.save(state, str(tmp_path / "2.pt"))
    assert {id(buffer) for _, _, _, kept in second.files for buffer in kept} == buffers
    state["model"]["weight"].zero_()
    second.write_all()
    loaded = torch.load(tmp_path / "2.pt", weights_only=False)
    assert torch.equal(loaded["model"]["weight"], 2.0 * torch.arange(6.0).reshape(2, 3))
    assert torch.equal(torch.load(tmp_path / "1.pt", weights_only=False)["model"]["weight"],
                       torch.arange(6.0).reshape(2, 3))


def test_a_sparse_tensor_is_copied_not_pooled(tmp_path: Path) -> None:
    """Hostile finding: a pooled dense buffer cannot take a sparse tensor's copy_."""
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, 3.0]), (4,), check_invariants=True)
    sink = Snapshots(BufferPool())
    sink.save({"sparse": sparse, "dense": torch.ones(2)}, str(tmp_path / "s.pt"))
    sparse.mul_(0.0)
    sink.write_all()
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    assert torch.equal(loaded["sparse"].to_dense(), torch.tensor([1.0, 0.0, 3.0, 0.0]))


def test_a_background_failure_is_raised_by_wait() -> None:
    saver = BackgroundSaver()  # no process group: none is created
    done = []
    saver.start(lambda: done.append(1), "iter_1")
    saver.wait()
    assert done == [1] and not saver.busy

    def fail() -> None:
        raise OSError(28, "No space left on device")

    saver.start(fail, "iter_2")
    with pytest.raises(OSError, match="No space left"):
        saver.wait()
    saver.wait()  # nothing in flight any more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_weights_finite_by_sums_agrees_with_the_elementwise_check(dtype: torch.dtype) -> None:
    """The save's finite-weights check sums each tensor; it must decide as the elementwise check:
    a NaN or an Inf anywhere is caught, and huge finite weights whose sum overflows are not."""
    from megatron.checkpoint.protocol import weights_finite

    torch.manual_seed(0)
    good = [torch.randn(1000, 37).to(dtype), torch.randn(5).to(dtype), torch.zeros(0, dtype=dtype)]
    assert weights_finite(good) and weights_finite([])
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        for index in range(2):
            params = [param.clone() for param in good]
            params[index].view(-1)[-1] = bad_value
            assert not weights_finite(params), (bad_value, index)
    big = torch.finfo(dtype).max
    assert weights_finite([torch.full((8,), big, dtype=dtype)])  # the sum overflows; the elements are finite
    inf_pair = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # sums to NaN, not to a finite value
    assert not weights_finite([inf_pair])


def test_weights_finite_checks_complex_and_integer_tensors_elementwise() -> None:
    """Hostile review: a complex tensor's sum in fp32 dropped its imaginary part, so a NaN there
    passed the check."""
    from megatron.checkpoint.protocol import weights_finite

    for dtype in (torch.complex64, torch.complex128):
        assert weights_finite([torch.ones(3, dtype=dtype)])
        for bad in (complex(0, float("nan")), complex(0, float("inf")), complex(float("nan"), 0)):
            assert not weights_finite([torch.randn(4), torch.tensor([1, bad], dtype=dtype)]), (dtype, bad)
    assert weights_finite([torch.arange(5), torch.ones(2, dtype=torch.bool), torch.randn(3)])
