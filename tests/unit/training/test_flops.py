"""The FLOPs formula pinned to GPT-2 124M and 345M, the peak table, MFU and the CPU matmul peak."""

from __future__ import annotations

import pytest

from megatron.mpu.utils import pad_vocab_size
from megatron.training.flops import (
    device_peak_tflops,
    hardware_flops_per_token,
    matmul_params,
    measure_matmul_tflops,
    model_flops_per_token,
    table_peak_tflops,
    utilization,
)

SEQ = 1024
# GPT-2's 50257 tokens padded to a multiple of 128 (Megatron's default, model-parallel size 1).
V = 50304


def test_gpt2_vocabulary_pads_to_50304() -> None:
    assert pad_vocab_size(50257, 128, 1) == V


def test_gpt2_124m() -> None:
    # L=12, h=768, s=1024, V=50304, by hand:
    #   N     = 12*12*768^2 + 50304*768 = 84,934,656 + 38,633,472 = 123,568,128
    #   model = 6 N + 12*12*768*1024    = 741,408,768 + 113,246,208 = 854,654,976
    #   recompute adds 24*12*768^2 + 4*12*768*1024 = 169,869,312 + 37,748,736 = 207,618,048
    assert matmul_params(12, 768, V) == 123_568_128
    assert model_flops_per_token(12, 768, SEQ, V) == 854_654_976
    assert hardware_flops_per_token(12, 768, SEQ, V, checkpoint_activations=False) == 854_654_976
    assert hardware_flops_per_token(12, 768, SEQ, V, checkpoint_activations=True) == 1_062_273_024


def test_gpt2_345m() -> None:
    # L=24, h=1024, s=1024, V=50304, by hand:
    #   N     = 12*24*1024^2 + 50304*1024 = 301,989,888 + 51,511,296 = 353,501,184
    #   model = 6 N + 12*24*1024*1024     = 2,121,007,104 + 301,989,888 = 2,422,996,992
    #   recompute adds 24*24*1024^2 + 4*24*1024*1024 = 603,979,776 + 100,663,296 = 704,643,072
    assert matmul_params(24, 1024, V) == 353_501_184
    assert model_flops_per_token(24, 1024, SEQ, V) == 2_422_996_992
    assert hardware_flops_per_token(24, 1024, SEQ, V, checkpoint_activations=True) == 3_127_640_064


@pytest.mark.parametrize("layers, hidden", [(12, 768), (24, 1024), (48, 1600)])
def test_equals_megatron_paper_form(layers: int, hidden: int) -> None:
    # Megatron-LM (Narayanan et al. 2021): 72 B s L h^2 (1 + s/6h + V/12Lh) per batch of B sequences.
    paper = 72 * SEQ * layers * hidden**2 + 12 * SEQ**2 * layers * hidden + 6 * SEQ * V * hidden
    assert model_flops_per_token(layers, hidden, SEQ, V) * SEQ == paper


def test_utilization() -> None:
    # 124M at 100k tokens/s on 8 devices of 312 TFLOP/s: 8.55e13 / 8 / 3.12e14.
    assert utilization(100_000, 854_654_976, 8, 312.0) == pytest.approx(0.034241, rel=1e-4)
    assert utilization(100_000, 854_654_976, 8, None) is None
    # Above the peak (the README main job printed MFU 122.51% with a peak measured under load): n/a.
    assert utilization(100_000, 854_654_976, 8, 10.0) is None


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "fp16", 756.0),
    ("NVIDIA H200", "bf16", 989.0), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5), ("Tesla V100-SXM2-32GB", "bf16", None),
    ("NVIDIA GeForce RTX 4090", "bf16", None)])
def test_peak_table(name: str, precision: str, peak: float | None) -> None:
    assert table_peak_tflops(name, precision) == peak


def test_flag_overrides_peak() -> None:
    assert device_peak_tflops("bf16", override=123.0) == (123.0, "flag")


def test_cpu_matmul_peak_is_positive() -> None:
    peak = measure_matmul_tflops("fp32", seconds=0.1)
    assert 1e-4 < peak < 100.0  # TFLOP/s: some GFLOP/s for a CPU core
