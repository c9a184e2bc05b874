"""DeepSpeed's activation checkpointing (partitioned across model-parallel ranks), handed to the
model with ``use_activation_checkpointing``, gives the gradients of the un-checkpointed model."""

from __future__ import annotations

import pytest
import torch
from distributed import run_distributed

from megatron import mpu
from megatron.model import ActivationCheckpointing, GPT2Model, use_activation_checkpointing

VOCAB = 64


def _grads(checkpoint: bool, seed: int, functions: ActivationCheckpointing) -> dict[str, torch.Tensor]:
    import deepspeed

    torch.manual_seed(seed)
    model = GPT2Model(num_layers=3, vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                      embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1,
                      max_sequence_length=16, checkpoint_activations=checkpoint)
    use_activation_checkpointing(model, functions)
    holders = [m for m in model.modules() if hasattr(m, "activation_checkpointing")]
    assert len(holders) == 4  # the transformer and the attention of each of the 3 layers
    assert all(m.activation_checkpointing.checkpoint is deepspeed.checkpointing.checkpoint for m in holders)
    deepspeed.checkpointing.model_parallel_cuda_manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
    logits = model(tokens[:, :-1], None, None)
    mpu.vocab_parallel_cross_entropy(logits, tokens[:, 1:]).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _configure_deepspeed_checkpointing(partition: bool, seed: int) -> ActivationCheckpointing:
    """DeepSpeed's checkpointing set up as the DeepSpeed path sets it up; its (function, tracker)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    deepspeed.checkpointing.configure(
        mpu, deepspeed_config=None, partition_activations=partition, contiguous_checkpointing=False,
        num_checkpoints=3, checkpoint_in_cpu=False, synchronize=False, profile=False)
    deepspeed.checkpointing.model_parallel_cuda_manual_seed(seed)
    return ActivationCheckpointing(deepspeed.checkpointing.checkpoint, deepspeed.checkpointing.get_cuda_rng_tracker())


def _check(rank: int, world_size: int, partition: bool) -> None:
    mpu.initialize_model_parallel(world_size)
    functions = _configure_deepspeed_checkpointing(partition, seed=7)
    plain = _grads(checkpoint=False, seed=7, functions=functions)
    checkpointed = _grads(checkpoint=True, seed=7, functions=functions)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("partition", [True, False])
def test_deepspeed_checkpointing_gives_plain_gradients(partition: bool) -> None:
    run_distributed(_check, 2, partition)
