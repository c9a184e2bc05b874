"""The pipeline engine's module recomputes the transformer layers under --checkpoint-activations,
and only them: a reentrant checkpoint function (mpu's, DeepSpeed's) cannot recompute the first
stage's embedding, whose input (token ids) does not require grad."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from distributed import run_distributed

from arguments import build_parser, build_run_config
from megatron import mpu
from megatron.model import ActivationCheckpointing, lm_loss
from megatron.model.gpt2_pipe import gpt2_pipeline_description

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--max-position-embeddings", "16", "--batch-size", "2", "--checkpoint-activations",
         "--hidden-dropout", "0", "--attention-dropout", "0"]
VOCAB = 64


def _check(rank: int, world_size: int, config_path: str) -> None:
    from megatron.backends.pipeline import build_pipeline_module

    mpu.initialize_model_parallel(1)
    mpu.model_parallel_cuda_manual_seed(3)
    args = build_parser().parse_args([*FLAGS, "--deepspeed", "--deepspeed_config", config_path,
                                      "--make-vocab-size-divisible-by", "16"])
    run = build_run_config(args, VOCAB, VOCAB - 1, environ={"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29999"})
    recomputed = []

    def counting_checkpoint(function, *inputs):
        recomputed.append(len(inputs))
        return mpu.checkpoint(function, *inputs)

    torch.manual_seed(5)
    module = build_pipeline_module(gpt2_pipeline_description(run.model), run,
                                   ActivationCheckpointing(counting_checkpoint, mpu.get_cuda_rng_tracker()))
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    module.set_checkpoint_interval(run.model.checkpoint_num_layers)  # as the pipeline engine does at start-up
    logits = module(tokens[:, :-1])
    loss = lm_loss(logits, tokens[:, 1:], torch.ones(2, 16), VOCAB)
    loss.backward()
    assert recomputed == [1, 1], recomputed  # the two transformer layers, one chunk each
    assert all(p.grad is not None for p in module.parameters())


def test_only_transformer_layers_are_checkpointed(tmp_path: Path) -> None:
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    run_distributed(_check, 1, str(config))
