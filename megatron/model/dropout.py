"""Dropout whose mask costs one 32-bit draw per element on CPU (16 bits in half precision).

``torch.nn.functional.dropout`` on CPU draws each element's mask with ``bernoulli_`` (about 6.5 ns
an element on one core; torch uses MKL's parallel generator on Intel CPUs only) and scales it in
two more passes. Here the mask compares integers from ``torch.randint`` on int64 with
``(1 - p) * 2**bits``: two 32-bit numbers per draw (about 2 ns an element), or four 16-bit ones for
bf16 and fp16 inputs (about half that), and one ``torch.where`` writes the scaled mask: the whole
forward is about twice as fast, the backward the same single multiply. The drop probability is
``p`` rounded to a multiple of 2**-32, or of 2**-16 in half precision, whose own rounding of the
scale ``1 / (1 - p)`` is coarser (2**-8 relative in bf16); a ``p`` or ``1 - p`` below 2**-8 keeps
32 bits there too.

Both draw from the default generator, so a model-parallel RNG tracker's ``fork()`` and activation
recomputation (which restores the generator states) work the same; the masks differ from
``F.dropout``'s. On other devices ``F.dropout`` is used: there it is one fused kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LANES = {32: torch.int32, 16: torch.int16}


def keep_mask(shape: torch.Size | tuple[int, ...], keep_prob: float, device: torch.device,
              out: torch.Tensor | None = None, bits: int = 32) -> torch.Tensor:
    """Booleans of ``shape`` (into ``out`` if given), each True with probability ``keep_prob``
    rounded to a multiple of 2**-bits (at most 1 - 2**-bits; ``bits`` 32 or 16), from the default
    generator of ``device``. Masks drawn one after another hold the numbers of one mask of their
    joint size (sizes that are multiples of 64 / bits)."""
    count, per_draw = math.prod(shape), 64 // bits
    # Nearly the full int64 range (2**64 - 1 values), cut into 64 / bits numbers per draw. Unlike
    # random_, randint is out of place, which torch.compile traces without a graph break.
    draws = torch.randint(-(2**63), 2**63 - 1, ((count + per_draw - 1) // per_draw,), dtype=torch.int64,
                          device=device)
    # values below it: keep_prob of them (at most all but one in 2**bits; it must fit the lane type)
    threshold = min(round(keep_prob * 2**bits), 2**bits - 1) - 2 ** (bits - 1)
    return torch.lt(draws.view(_LANES[bits])[:count].view(shape), threshold, out=out)


def mask_bits(dtype: torch.dtype, p: float) -> int:
    """Bits drawn per mask element for dropout ``p`` of a tensor of ``dtype``: 16 in half precision
    when 2**-16 steps put ``p`` within 2**-9 of itself (``p`` and ``1 - p`` at least 2**-8), else 32."""
    half = dtype in (torch.bfloat16, torch.float16)
    return 16 if half and min(p, 1.0 - p) >= 2**-8 else 32


def keep_scale(p: float, dtype: torch.dtype) -> float:
    """``1 / (1 - p)`` rounded to ``dtype``, the factor kept elements are multiplied by (as ``F.dropout``)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=dtype))


def dropout(input: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(input, p, training)``: zeroes each element with probability ``p`` and scales the
    rest by ``1 / (1 - p)``; out of place; the mask is drawn as above on CPU."""
    if not training or p == 0.0:
        return input
    if input.device.type != "cpu" or p >= 1.0 or not input.is_floating_point():
        return F.dropout(input, p, training)
    keep = keep_mask(input.shape, 1.0 - p, input.device, bits=mask_bits(input.dtype, p))
    scale = torch.tensor(1.0 / (1.0 - p), dtype=input.dtype)  # rounded to the dtype: keep_scale(p, dtype)
    # The scaled mask is what autograd keeps (as F.dropout keeps its mask): grad = grad_out * mask.
    return input * torch.where(keep, scale, torch.zeros((), dtype=input.dtype))


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask with :func:`dropout` (``inplace=True`` keeps ``F.dropout``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(input, self.p, self.training, inplace=True)
        return dropout(input, self.p, self.training)
