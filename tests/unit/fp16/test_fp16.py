"""Loss scalers and the fp16/bf16 master-weight optimizer, on CPU, serial and on 2 gloo ranks."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from megatron import mpu
from megatron.fp16 import DynamicLossScaler, FP16_Module, FP16_Optimizer, LossScaler
from megatron.training.schedule import AnnealingLR
from tests.distributed import run_distributed

# ---------------------------------------------------------------------------------------------
# Loss scalers


def _params_with_grads(*grads: list[float]) -> list[nn.Parameter]:
    params = []
    for values in grads:
        param = nn.Parameter(torch.zeros(len(values), dtype=torch.half))
        param.grad = torch.tensor(values, dtype=torch.half)
        params.append(param)
    return params


def test_has_overflow_detects_inf_and_nan_only() -> None:
    scaler = LossScaler(1.0)
    assert not scaler.has_overflow(_params_with_grads([1.0, -65504.0], [0.0]))
    assert scaler.has_overflow(_params_with_grads([1.0], [0.0, math.inf]))
    assert scaler.has_overflow(_params_with_grads([-math.inf]))
    assert scaler.has_overflow(_params_with_grads([1.0], [math.nan]))
    assert not scaler.has_overflow([nn.Parameter(torch.zeros(2))])  # no grads at all
    assert not scaler.has_overflow(_params_with_grads([], [2.0]))  # empty grads are fine


def test_static_scaler_never_changes_and_scales_backward() -> None:
    scaler = LossScaler(128.0)
    scaler.update_scale(True)
    scaler.update_scale(False)
    assert scaler.loss_scale == 128.0
    weight = nn.Parameter(torch.ones(3))
    scaler.backward((weight * 2).sum())
    assert torch.equal(weight.grad, torch.full((3,), 256.0))
    assert scaler.scale_gradient(None, (torch.ones(2), None), None)[0].tolist() == [128.0, 128.0]
    with pytest.raises(ValueError, match="must be positive"):
        LossScaler(0.0)


def test_dynamic_overflow_halves_scale_and_restarts_window() -> None:
    scaler = DynamicLossScaler(init_scale=2.0**10, scale_window=3)
    scaler.update_scale(False)
    scaler.update_scale(False)
    scaler.update_scale(True)
    assert scaler.loss_scale == 2.0**9
    scaler.update_scale(False)
    scaler.update_scale(False)
    assert scaler.loss_scale == 2.0**9  # the window restarted at the overflow
    scaler.update_scale(False)
    assert scaler.loss_scale == 2.0**10


def test_dynamic_growth_after_each_full_window() -> None:
    scaler = DynamicLossScaler(init_scale=4.0, scale_factor=3.0, scale_window=5)
    scales = []
    for _ in range(15):
        scaler.update_scale(False)
        scales.append(scaler.loss_scale)
    assert scales == [4.0] * 4 + [12.0] * 5 + [36.0] * 5 + [108.0]


def test_hysteresis_delays_the_first_decrease() -> None:
    scaler = DynamicLossScaler(init_scale=2.0**10, scale_window=2, delayed_shift=3)
    scaler.update_scale(True)
    scaler.update_scale(True)
    assert scaler.loss_scale == 2.0**10
    scaler.update_scale(True)
    assert scaler.loss_scale == 2.0**9
    scaler.update_scale(True)  # hysteresis spent: every further overflow lowers the scale
    assert scaler.loss_scale == 2.0**8
    scaler.update_scale(False)
    scaler.update_scale(False)  # a full window grows the scale and resets hysteresis
    assert scaler.loss_scale == 2.0**9
    scaler.update_scale(True)
    scaler.update_scale(True)
    assert scaler.loss_scale == 2.0**9


def test_dynamic_scale_never_below_min_scale() -> None:
    scaler = DynamicLossScaler(init_scale=16.0, min_scale=2.0)
    for _ in range(10):
        scaler.update_scale(True)
    assert scaler.loss_scale == 2.0


def test_dynamic_state_dict_round_trip_and_validation() -> None:
    scaler = DynamicLossScaler(init_scale=64.0, scale_window=4, delayed_shift=2)
    for overflow in (True, False, False):
        scaler.update_scale(overflow)
    state = _torch_round_trip(scaler.state_dict())
    restored = DynamicLossScaler(init_scale=1.0, scale_window=4, delayed_shift=2)
    restored.load_state_dict(state)
    assert restored.state_dict() == scaler.state_dict()
    for overflow in (False, False, True, True, False):
        scaler.update_scale(overflow)
        restored.update_scale(overflow)
        assert restored.loss_scale == scaler.loss_scale
    with pytest.raises(ValueError, match="--hysteresis"):
        DynamicLossScaler(delayed_shift=0)
    with pytest.raises(ValueError, match="--min-scale"):
        DynamicLossScaler(init_scale=1.0, min_scale=2.0)
    with pytest.raises(ValueError, match="allowed keys"):
        FP16_Optimizer(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0),
                       dynamic_loss_scale=True, dynamic_loss_args={"hysteresis": 2})


# ---------------------------------------------------------------------------------------------
# FP16_Module and FP16_Optimizer on a tiny regression model


def _torch_round_trip(state: object) -> object:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 8, generator=generator)
    targets = torch.tanh(inputs @ torch.randn(8, 1, generator=generator))
    return inputs, targets


def _setup(
    dtype: torch.dtype = torch.half, **optimizer_kwargs
) -> tuple[FP16_Module, FP16_Optimizer]:
    torch.manual_seed(0)
    model = FP16_Module(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)), dtype)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    return model, FP16_Optimizer(inner, **optimizer_kwargs)


def _train_step(model: FP16_Module, optimizer: FP16_Optimizer) -> tuple[float, bool]:
    inputs, targets = _data()
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(inputs), targets)
    optimizer.backward(loss)
    optimizer.clip_master_grads(1.0)
    return loss.item(), optimizer.step()


def test_fp16_module_casts_inputs_and_outputs() -> None:
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, ids: torch.Tensor, extra: dict) -> tuple:
            assert x.dtype == torch.half and ids.dtype == torch.long
            assert extra["mask"].dtype == torch.half
            return self.linear(x), ids

    model = FP16_Module(Probe())
    out, ids = model(torch.ones(1, 2), torch.ones(1, dtype=torch.long), extra={"mask": torch.ones(1)})
    assert out.dtype == torch.float32 and ids.dtype == torch.long
    assert model.module.linear.weight.dtype == torch.half
    assert set(model.state_dict()) == {"linear.weight", "linear.bias"}  # no "module." prefix
    with pytest.raises(ValueError, match="bfloat16"):
        FP16_Module(Probe(), torch.float64)


def test_fp16_training_decreases_loss_with_fp32_masters() -> None:
    model, optimizer = _setup(dynamic_loss_scale=True, dynamic_loss_args={"init_scale": 2.0**16})
    losses = [_train_step(model, optimizer)[0] for _ in range(30)]
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.dtype == torch.half for p in model.parameters())
    assert all(p.dtype == torch.float32 for group in optimizer.param_groups for p in group["params"])
    for model_param, master in zip(optimizer.half_params, optimizer.master_params):
        assert torch.equal(model_param, master.half())
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)  # hyperparameters kept


def test_huge_initial_scale_skips_until_it_fits() -> None:
    model, optimizer = _setup(dynamic_loss_scale=True)  # Megatron's default 2**32
    results = [_train_step(model, optimizer) for _ in range(40)]
    applied = [stepped for _, stepped in results]
    assert not applied[0] and optimizer.skipped_steps == applied.count(False) > 0
    assert all(applied[optimizer.skipped_steps:])  # once the scale fits it stays clean
    assert optimizer.loss_scale == 2.0**32 / 2**optimizer.skipped_steps
    assert results[-1][0] < results[optimizer.skipped_steps][0]


def test_injected_inf_skips_step_and_lowers_scale() -> None:
    model, optimizer = _setup(dynamic_loss_scale=True, dynamic_loss_args={"init_scale": 2.0**12})
    _train_step(model, optimizer)  # populate the AdamW state
    params_before = copy.deepcopy(list(model.parameters()))
    state_before = copy.deepcopy(optimizer.state_dict())
    inputs, targets = _data()
    optimizer.zero_grad()
    optimizer.backward(nn.functional.mse_loss(model(inputs), targets), update_master_grads=False)
    model.module[0].weight.grad[3, 2] = math.inf
    optimizer.update_master_grads()
    assert optimizer.overflow
    assert optimizer.clip_master_grads(1.0).item() == -1.0
    assert optimizer.step() is False
    assert optimizer.skipped_steps == 1 and optimizer.loss_scale == 2.0**11
    for before, after in zip(params_before, model.parameters()):
        assert torch.equal(before, after)
    state_after = optimizer.state_dict()["optimizer_state_dict"]["state"]
    for index, param_state in state_before["optimizer_state_dict"]["state"].items():
        for name, value in param_state.items():
            assert torch.equal(state_after[index][name], value), name
    assert _train_step(model, optimizer)[1]  # the next clean step goes through


def test_bf16_with_static_scale_one() -> None:
    model, optimizer = _setup(torch.bfloat16)
    assert optimizer.loss_scale == 1.0
    losses = [_train_step(model, optimizer)[0] for _ in range(30)]
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert optimizer.skipped_steps == 0


def test_loss_scale_is_undone_before_the_update() -> None:
    """A static scale must not change the step: compare with the plain fp32 optimizer."""
    torch.manual_seed(0)
    reference = nn.Linear(4, 3)
    reference.bias.data = reference.bias.data.half().float()  # same values as the half copy
    mixed = copy.deepcopy(reference)
    mixed.bias.data = mixed.bias.data.half()  # one half param, one fp32 param
    plain = torch.optim.SGD(reference.parameters(), lr=0.5)
    wrapped = FP16_Optimizer(torch.optim.SGD(mixed.parameters(), lr=0.5), static_loss_scale=1024.0)
    inputs = torch.randn(5, 4)
    reference(inputs).square().sum().backward()
    plain.step()
    wrapped.backward((inputs @ mixed.weight.T + mixed.bias.float()).square().sum())
    assert wrapped.step()
    assert torch.allclose(mixed.weight, reference.weight, atol=1e-6)
    assert torch.allclose(wrapped.master_params[0], reference.bias, atol=1e-3)


def test_serial_clip_matches_torch() -> None:
    model, optimizer = _setup(dynamic_loss_scale=True, dynamic_loss_args={"init_scale": 2.0**8})
    inputs, targets = _data()
    optimizer.backward(nn.functional.mse_loss(model(inputs), targets))
    grads = [p.grad.clone() for p in optimizer.master_params]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    norm = optimizer.clip_master_grads(1e-3)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-5)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in optimizer.master_params]))
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_state_dict_round_trip_gives_identical_steps() -> None:
    lr_args = (1e-2, 3, 40, "cosine")
    model, optimizer = _setup(dynamic_loss_scale=True,
                              dynamic_loss_args={"init_scale": 2.0**20, "scale_window": 4})
    scheduler = AnnealingLR(optimizer, *lr_args)
    for _ in range(6):
        if _train_step(model, optimizer)[1]:
            scheduler.step()
    checkpoint = _torch_round_trip({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
    })
    resumed_model, resumed = _setup(dynamic_loss_scale=True,
                                    dynamic_loss_args={"init_scale": 2.0**20, "scale_window": 4})
    resumed_scheduler = AnnealingLR(resumed, *lr_args)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    assert resumed.loss_scale == optimizer.loss_scale
    assert resumed.skipped_steps == optimizer.skipped_steps > 0
    for _ in range(6):
        for m, o, s in ((model, optimizer, scheduler), (resumed_model, resumed, resumed_scheduler)):
            if _train_step(m, o)[1]:
                s.step()
        assert resumed.loss_scale == optimizer.loss_scale
        assert resumed.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        for a, b in zip(model.parameters(), resumed_model.parameters()):
            assert torch.equal(a, b)
        for a, b in zip(optimizer.master_params, resumed.master_params):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Two model-parallel ranks (real gloo processes)


def _model_parallel_worker(rank: int, world_size: int) -> None:
    mpu.initialize_model_parallel(world_size)
    shard = nn.Parameter(torch.ones(4, dtype=torch.half))  # this rank's slice of a split weight
    mpu.mark_model_parallel(shard, partition_dim=0)
    replicated = nn.Parameter(torch.ones(3, dtype=torch.half))
    optimizer = FP16_Optimizer(torch.optim.SGD([shard, replicated], lr=0.1),
                               dynamic_loss_scale=True, dynamic_loss_args={"init_scale": 2.0**8})
    assert optimizer.master_params[0].model_parallel
    assert not hasattr(optimizer.master_params[1], "model_parallel")

    # Clean step: shard grads are rank + 1, replicated grads 1 and counted once.
    optimizer.backward((rank + 1) * shard.float().sum() + replicated.float().sum())
    norm = optimizer.clip_master_grads(1e9)
    assert norm.item() == pytest.approx(math.sqrt(4 * 1 + 4 * 4 + 3 * 1))
    assert optimizer.step()

    # inf on rank 1 only: both ranks must skip.
    optimizer.zero_grad()
    optimizer.backward(shard.float().sum() + replicated.float().sum(), update_master_grads=False)
    if rank == 1:
        shard.grad[0] = math.inf
    before = [shard.detach().clone(), replicated.detach().clone()]
    optimizer.update_master_grads()
    assert optimizer.overflow, f"rank {rank} did not see the overflow"
    assert optimizer.step() is False
    assert optimizer.skipped_steps == 1 and optimizer.loss_scale == 2.0**7
    assert torch.equal(shard, before[0]) and torch.equal(replicated, before[1])


def test_model_parallel_ranks_agree_on_overflow() -> None:
    run_distributed(_model_parallel_worker, 2)
