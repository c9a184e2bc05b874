"""Data-parallel gradient averaging for the Megatron path (DeepSpeed does its own)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron import mpu

DEFAULT_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket


@dataclass
class _Bucket:
    """Parameters whose gradients travel in one flat all-reduce."""

    params: list[nn.Parameter]
    ready: set[int] = field(default_factory=set)  # ids of the parameters whose gradient is final
    work: dist.Work | None = None
    flat: torch.Tensor | None = None
    grads: list[torch.Tensor] = field(default_factory=list)


def _build_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
    """Consecutive same-dtype parameters, up to about ``bucket_bytes`` of gradient a bucket."""
    buckets: list[_Bucket] = []
    size = 0
    for param in params:
        nbytes = param.numel() * param.element_size()
        if not buckets or buckets[-1].params[-1].dtype != param.dtype or size + nbytes > bucket_bytes:
            buckets.append(_Bucket([]))
            size = 0
        buckets[-1].params.append(param)
        size += nbytes
    return buckets


class DistributedDataParallel(nn.Module):
    """Wraps a model; gradients are averaged over the data-parallel group.

    Parameters are grouped into buckets of about ``bucket_bytes`` in reverse registration order
    (roughly the order backward finishes their gradients). A hook on each parameter counts
    finished gradients; when a bucket is complete its flat all-reduce starts asynchronously, so
    communication overlaps the rest of backward. ``allreduce_params()`` waits for the launched
    buckets, reduces any bucket that did not complete (parameters without a gradient this step)
    and writes the averages back into ``.grad``. Only a backward with ``sync_gradients`` set
    communicates: the backend clears it for all but the last micro batch of a step.

    Every rank launches the buckets in the same order (the same graph finishes the same
    gradients in the same order), which gloo and NCCL require. The all-reduce of each element is
    the same as one flat all-reduce of everything, so results do not depend on the bucketing.
    Parameters start equal on every replica because initialisation is seeded identically.
    """

    def __init__(self, module: nn.Module, fp32_allreduce: bool = False,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        super().__init__()
        self.module = module
        self.sync_gradients = True
        self.fp32_allreduce = fp32_allreduce
        params = [param for param in module.parameters() if param.requires_grad]
        self._buckets = _build_buckets(list(reversed(params)), bucket_bytes)
        self._bucket_of: dict[nn.Parameter, _Bucket] = {}
        if mpu.get_data_parallel_world_size() > 1:
            for bucket in self._buckets:
                for param in bucket.params:
                    self._bucket_of[param] = bucket
                    param.register_post_accumulate_grad_hook(self._gradient_ready)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)

    def _gradient_ready(self, param: nn.Parameter) -> None:
        if not self.sync_gradients:
            return
        bucket = self._bucket_of[param]
        if bucket.work is not None:
            raise RuntimeError("a parameter's gradient was accumulated again after its data-parallel all-reduce "
                               "started (the parameter is used in two separate backward passes of one micro "
                               "batch); the averaged gradient would miss the second part")
        bucket.ready.add(id(param))
        if len(bucket.ready) == len(bucket.params):
            self._launch(bucket, bucket.params)

    def _launch(self, bucket: _Bucket, params: list[nn.Parameter]) -> None:
        world_size = mpu.get_data_parallel_world_size()
        bucket.grads = [param.grad.data for param in params]
        flat = _flatten_dense_tensors(bucket.grads)
        if self.fp32_allreduce:
            flat = flat.float()
        flat.div_(world_size)
        bucket.flat = flat
        bucket.work = dist.all_reduce(flat, group=mpu.get_data_parallel_group(), async_op=True)

    def allreduce_params(self) -> None:
        """Finish the data-parallel average of every gradient (after the step's last backward)."""
        if mpu.get_data_parallel_world_size() == 1:
            return
        for bucket in self._buckets:
            if bucket.work is None:
                with_grad = [param for param in bucket.params if param.grad is not None]
                if not with_grad:
                    continue
                self._launch(bucket, with_grad)
            bucket.work.wait()
            for grad, synced in zip(bucket.grads, _unflatten_dense_tensors(bucket.flat, bucket.grads)):
                grad.copy_(synced)
            bucket.ready, bucket.work, bucket.flat, bucket.grads = set(), None, None, []
