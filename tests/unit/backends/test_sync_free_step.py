"""The Megatron path's training step reads nothing on the host (no device synchronisation).

A host read of a device value is ``aten._local_scalar_dense`` underneath (``.item()``,
``float(t)``, ``bool(t)``, ``.tolist()`` of a 0-dim); a dispatch mode records every op the step
runs, so any such read inside ``backend.train_step`` fails the test. The same steps with a
non-finite gradient are skipped on the device, and the outcome read afterwards is the one the
host-side path computes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from distributed import run_distributed
from torch.utils._python_dispatch import TorchDispatchMode

from megatron import mpu
from megatron.model import GPT2Model

VOCAB = 128
HOST_READS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}


class RecordHostReads(TorchDispatchMode):
    """Records the ops that read a device value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


class Poison:
    """A multiplier of the training loss: 1.0, or NaN for a step whose gradients must be skipped."""

    value = 1.0


def _backend(precision: str, clip_grad: float, initial_loss_scale: float = 2.0**32, micro_batches: int = 2):
    """A ``MegatronBackend`` over ``pretrain_gpt2.forward_step`` (batch, masks, model, loss) times
    ``Poison.value``, on one fixed batch."""
    import pretrain_gpt2
    from arguments import build_parser, build_run_config
    from megatron.backends.megatron import MegatronBackend

    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--max-position-embeddings", "16", "--batch-size", "2", "--lr", "1e-3", "--train-iters", "10",
            "--clip-grad", str(clip_grad), "--initial-loss-scale", str(initial_loss_scale),
            "--make-vocab-size-divisible-by", "1", "--gradient-accumulation-steps", str(micro_batches)]
    if precision != "fp32":
        argv.append(f"--{precision}")
    run = build_run_config(build_parser().parse_args(argv), vocab_size=VOCAB, eod_token=VOCAB - 1, environ={})
    torch.manual_seed(1)
    model = GPT2Model(2, VOCAB, 32, 4, 0.0, 0.0, 0.0, 16, False)
    mpu.model_parallel_cuda_manual_seed(1)

    def forward_step(data_iterator, model, run):
        return pretrain_gpt2.forward_step(data_iterator, model, run) * Poison.value

    return MegatronBackend(model, run, forward_step)


def _batches():
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    return itertools.repeat({"text": tokens})


def _step(backend, poison: float = 1.0):
    Poison.value = poison
    try:
        return backend.train_step(_batches())
    finally:
        Poison.value = 1.0


def _check(rank: int, world_size: int, precision: str, clip_grad: float) -> None:
    mpu.initialize_model_parallel(1)
    backend = _backend(precision, clip_grad, initial_loss_scale=1024.0)  # dynamic, but no overflow here
    assert backend.sync_free, "torch's fused AdamW should allow the sync-free step on CPU"
    _step(backend)  # first step outside the recorder (lazy state init)
    weights = [p.detach().clone() for p in backend.parameters()]
    recorder = RecordHostReads()
    with recorder:
        good = _step(backend)
        bad = _step(backend, float("nan"))
    assert recorder.reads == [], f"host reads inside train_step: {recorder.reads}"
    # read afterwards: the good step applied, the NaN step skipped and left the weights alone
    assert float(good.skipped) == 0.0 and float(bad.skipped) == 1.0, (good, bad)
    assert torch.isfinite(good.loss) and not torch.isfinite(bad.loss)
    assert (good.grad_norm is None) == (clip_grad == 0 and precision != "fp32")
    after_good = [p.detach().clone() for p in backend.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(weights, after_good))
    _step(backend, float("nan"))
    assert all(torch.equal(a, p) for a, p in zip(after_good, backend.parameters()))
    assert backend.lr_scheduler.num_iters == 2  # two applied steps; skips do not advance the schedule
    if precision != "fp32":
        assert backend.optimizer.skipped_steps == 2


@pytest.mark.parametrize("precision, clip_grad", [("fp32", 1.0), ("fp32", 0.0), ("bf16", 1.0), ("fp16", 1.0),
                                                  ("fp16", 0.0)])
def test_train_step_reads_nothing_on_the_host(precision: str, clip_grad: float) -> None:
    run_distributed(_check, 1, precision, clip_grad)


def _check_dynamic_scale_on_device(rank: int, world_size: int) -> None:
    """fp16 from the default scale 2^32: overflows lower the scale on the device, as on the host."""
    mpu.initialize_model_parallel(1)
    backend = _backend("fp16", 1.0, micro_batches=1)
    host = _backend("fp16", 1.0, micro_batches=1)
    host.sync_free = False  # the same steps through update_master_grads / clip / step
    for _ in range(6):
        device_result = _step(backend)
        host_result = _step(host)
        assert float(device_result.skipped) == float(host_result.skipped)
        assert backend.loss_scale() == host.loss_scale()
    assert backend.optimizer.skipped_steps == host.optimizer.skipped_steps > 0
    for a, b in zip(backend.parameters(), host.parameters()):
        assert torch.equal(a, b)


def test_dynamic_loss_scale_on_device_matches_the_host_path() -> None:
    run_distributed(_check_dynamic_scale_on_device, 1)
