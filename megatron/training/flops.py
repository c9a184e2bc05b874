"""Training FLOPs of GPT-2 and the peak they are measured against, one source for logs and benchmarks.

Model FLOPs per token = 6 N + 12 L h s, with N = 12 L h^2 + V h the parameters that enter
matrix multiplies (the transformer weights and the tied output/embedding matrix; biases,
LayerNorm and position embeddings are negligible and left out). 6 N counts forward (2 N) and
backward (4 N); 12 L h s counts the attention scores and the weighted sum (QK^T and AV, 2 L h s
each forward, times 3). This is what Megatron-LM's 72 B s L h^2 (1 + s/6h + V/12Lh), PaLM's
and nanoGPT's estimates reduce to for GPT-2. Hardware FLOPs add one more forward of the
recomputed transformer layers under activation checkpointing: 24 L h^2 + 4 L h s per token.

MFU = achieved model FLOP/s per device / peak FLOP/s per device; HFU the same with hardware
FLOPs. The peak comes from ``--peak-tflops``, else a table of dense tensor-core peaks for known
GPUs, else (CPU, unknown GPU) a matmul of the training dtype timed on the spot (~0.2 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron.config import TORCH_DTYPES

# Dense (no sparsity) peak TFLOP/s per device from the vendors' data sheets. fp32 is the
# non-tensor-core rate: torch does not use TF32 for matmuls unless asked to.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}



def matmul_params(num_layers: int, hidden_size: int, vocab_size: int) -> int:
    """N = 12 L h^2 + V h: the weights that enter matrix multiplies (V the padded vocabulary)."""
    return 12 * num_layers * hidden_size**2 + vocab_size * hidden_size


def model_flops_per_token(num_layers: int, hidden_size: int, seq_length: int, vocab_size: int) -> int:
    """6 N + 12 L h s: forward and backward FLOPs of one token, without recomputation."""
    return 6 * matmul_params(num_layers, hidden_size, vocab_size) + 12 * num_layers * hidden_size * seq_length


def hardware_flops_per_token(num_layers: int, hidden_size: int, seq_length: int, vocab_size: int,
                             checkpoint_activations: bool) -> int:
    """Model FLOPs plus, under activation checkpointing, the recomputed forward of the layers."""
    flops = model_flops_per_token(num_layers, hidden_size, seq_length, vocab_size)
    if checkpoint_activations:
        flops += 24 * num_layers * hidden_size**2 + 4 * num_layers * hidden_size * seq_length
    return flops


def utilization(tokens_per_s: float, flops_per_token: int, num_devices: int, peak_tflops: float | None) -> float | None:
    """Fraction of the peak reached: tokens/s x FLOPs/token / devices / peak (None without a peak,
    or when the fraction exceeds 1: a measured peak that low cannot be trusted)."""
    if not peak_tflops:
        return None
    fraction = tokens_per_s * flops_per_token / num_devices / (peak_tflops * 1e12)
    return fraction if fraction <= 1.0 else None  # above the peak: the peak is wrong, not the model


def table_peak_tflops(device_name: str, precision: str) -> float | None:
    """Data-sheet peak for a GPU name such as 'NVIDIA H100 80GB HBM3' (None if not in the table)."""
    for key, peaks in PEAK_TFLOPS.items():  # ordered so that 'H100 PCIe' is tried before 'H100'
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def measure_matmul_tflops(precision: str, device: torch.device | str = "cpu", size: int = 512,
                          seconds: float = 0.15) -> float:
    """TFLOP/s of square ``size`` matmuls in ``precision`` on ``device``, best of repeats.

    Uses the calling process's threads (``torch.get_num_threads()`` on CPU); runs for about
    ``seconds`` after one warm-up multiply. Cheap enough for start-up, too short for a data sheet.
    """
    dtype = TORCH_DTYPES[precision]
    # Fill without touching any global RNG: training streams (and exact resume) must not see this.
    a = torch.ones(size, size, device=device).to(dtype)
    b = torch.full((size, size), 0.5, device=device).to(dtype)
    torch.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        start = time.perf_counter()
        torch.matmul(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / max(time.perf_counter() - start, 1e-9))
    return best / 1e12


def device_peak_tflops(precision: str, override: float | None = None) -> tuple[float, str]:
    """Peak TFLOP/s of this process's device and where it came from ('flag', 'table', 'measured').

    Every rank calls it (it is collective when the process group is up and the peak is
    measured): the ranks measure at the same moment, so ranks that share cores each measure their
    share of them, as they will train; and the best rank's figure is everyone's (a rank measuring
    while another still starts up would under-state the peak and over-state MFU).
    """
    if override:
        return override, "flag"
    if torch.cuda.is_available():
        peak = table_peak_tflops(torch.cuda.get_device_name(), precision)
        if peak:
            return peak, "table"
        return _best_over_ranks(lambda: measure_matmul_tflops(precision, "cuda", size=4096)), "measured"
    return _best_over_ranks(lambda: measure_matmul_tflops(precision, seconds=0.3)), "measured"


def _best_over_ranks(measure: Callable[[], float]) -> float:
    """``measure()`` taken by every rank at once (after a barrier), the largest result."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return measure()
    dist.barrier()
    figure = torch.tensor([measure()], dtype=torch.float64,
                          device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(figure, op=dist.ReduceOp.MAX)
    return float(figure.item())

