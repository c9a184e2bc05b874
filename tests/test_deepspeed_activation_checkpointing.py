"""DeepSpeed's activation checkpointing (partitioned across model-parallel ranks) replaces
mpu.checkpoint and gives the gradients of the un-checkpointed model."""

from __future__ import annotations

import argparse

import pytest
import torch
from distributed import run_distributed

from megatron import mpu
from megatron.model import GPT2Model

VOCAB = 64


def _grads(checkpoint: bool, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = GPT2Model(num_layers=3, vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                      embedding_dropout_prob=0.1, attention_dropout_prob=0.1, output_dropout_prob=0.1,
                      max_sequence_length=16, checkpoint_activations=checkpoint)
    mpu.model_parallel_cuda_manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
    logits = model(tokens[:, :-1], None, None)
    mpu.vocab_parallel_cross_entropy(logits, tokens[:, 1:]).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _check(rank: int, world_size: int, partition: bool) -> None:
    from megatron.deepspeed_backend import configure_activation_checkpointing

    mpu.initialize_model_parallel(world_size)
    args = argparse.Namespace(partition_activations=partition, contigious_checkpointing=False,
                              num_layers=3, checkpoint_in_cpu=False, synchronize_each_layer=False,
                              profile_backward=False, seed=7)
    configure_activation_checkpointing(args, {})
    import deepspeed

    assert mpu.checkpoint is deepspeed.checkpointing.checkpoint
    plain = _grads(checkpoint=False, seed=7)
    checkpointed = _grads(checkpoint=True, seed=7)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("partition", [True, False])
def test_deepspeed_checkpointing_gives_plain_gradients(partition: bool) -> None:
    run_distributed(_check, 2, partition)
