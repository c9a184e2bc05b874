"""The RunConfig: every derived value worked out once from flags, tokenizer and launch
environment, before any process group exists; frozen afterwards; mistakes are ConfigErrors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from arguments import build_parser, build_run_config
from megatron.errors import ConfigError

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--max-position-embeddings", "32", "--batch-size", "2", "--train-iters", "20"]


def _world(size: int, rank: int = 0) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank), "MASTER_PORT": "29999"}


def _run(*flags: str, world: int = 1, vocab_size: int = 8000):
    args = build_parser().parse_args([*MODEL, *flags])
    return build_run_config(args, vocab_size=vocab_size, eod_token=vocab_size - 1, environ=_world(world))


def _ds_config(tmp_path: Path, config: dict) -> list[str]:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return ["--deepspeed", "--deepspeed_config", str(path)]


def test_derived_values() -> None:
    run = _run("--model-parallel-size", "2", "--gradient-accumulation-steps", "3", world=8)
    assert (run.parallel.world_size, run.parallel.data_parallel_size) == (8, 4)
    assert run.model.vocab_size == 8000 and run.model.padded_vocab_size == 8192  # 128 x mp 2 = 256
    assert run.global_batch_size == 2 * 3 * 4
    assert run.optimizer.lr_decay_iters == 20 and run.training.eval_batch_size == 2
    assert run.precision.dtype == "fp32" and run.backend_name == "megatron"
    assert run.eod_token == 7999 and str(run.device) == "cpu"


def test_configuration_is_frozen() -> None:
    run = _run()
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.training.train_iters = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.model = run.model


def test_world_size_must_split_into_replicas() -> None:
    with pytest.raises(ConfigError, match=r"world size \(3\) is not divisible by --model-parallel-size \(2\)"):
        _run("--model-parallel-size", "2", world=3)


def test_deepspeed_batch_sizes_are_resolved_at_start_up(tmp_path: Path) -> None:
    run = _run(*_ds_config(tmp_path, {"train_batch_size": 16}), world=2)
    assert run.training.gradient_accumulation_steps == 4  # 16 / (micro 2 x dp 2)
    config = run.deepspeed.engine_config()
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (16, 2, 4)
    assert config["gradient_clipping"] == 1.0 and run.backend_name == "deepspeed"
    with pytest.raises(ConfigError, match="train_batch_size must equal --batch-size x gradient accumulation"):
        _run("--gradient-accumulation-steps", "3", *_ds_config(tmp_path, {"train_batch_size": 16}), world=2)


def test_engine_config_is_a_fresh_copy(tmp_path: Path) -> None:
    run = _run(*_ds_config(tmp_path, {"zero_optimization": {"stage": 2}}))
    run.deepspeed.engine_config()["zero_optimization"]["stage"] = 3
    assert run.deepspeed.zero_stage == 2


def test_deepspeed_precision_comes_from_flags_or_config(tmp_path: Path) -> None:
    run = _run(*_ds_config(tmp_path, {"bf16": {"enabled": True}}))
    assert run.precision.dtype == "bf16"
    run = _run("--bf16", *_ds_config(tmp_path, {}))
    assert run.precision.bf16 and run.deepspeed.engine_config()["bf16"] == {"enabled": True}
    with pytest.raises(ConfigError, match="--fp16 is given but the DeepSpeed config disables fp16"):
        _run("--fp16", *_ds_config(tmp_path, {"fp16": {"enabled": False}}))


def test_nccl_without_gpus_is_refused_before_the_process_group() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    with pytest.raises(ConfigError, match="nccl needs CUDA GPUs"):
        _run("--distributed-backend", "nccl")


def test_vocab_size_flag_overrides_the_tokenizer() -> None:
    run = _run("--vocab-size", "100", "--make-vocab-size-divisible-by", "64")
    assert (run.model.vocab_size, run.model.padded_vocab_size) == (100, 128)
