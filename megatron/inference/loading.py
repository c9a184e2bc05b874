"""Load a trained GPT-2 for inference: any checkpoint, at any model-parallel size.

``load_inference_model`` reads a Megatron or DeepSpeed checkpoint (saved at any model-parallel
size), merges its shards and gives each rank of *this* run its slice, so a run's
``--model-parallel-size`` need not match the checkpoint's. Every rank reads the whole checkpoint
(memory: one full copy of the weights per rank while loading).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from megatron import mpu
from megatron.checkpoint.convert import Checkpoint, read_checkpoint, repad_vocab
from megatron.checkpoint.layout import check_tokenizer
from megatron.config import ParallelConfig, build_parallel_config
from megatron.errors import ConfigError
from megatron.launch import initialize_megatron, read_launch_env
from megatron.model import GPT2Model, ModelConfig, build_gpt2_model
from megatron.tokenizer import AbstractTokenizer, build_tokenizer, tokenizer_identity

_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


def add_inference_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("inference", "checkpoint to run")
    group.add_argument("--load-iteration", type=int, default=None,
                       help="iteration to load (default: the latest complete one under --load)")
    parser.set_defaults(seq_length=None)
    return parser


@dataclass(frozen=True)
class InferenceConfig:
    """What loading a checkpoint for inference needs (the model's shape comes from the checkpoint)."""

    load: str
    load_iteration: int | None
    tokenizer_type: str
    vocab_file: str | None
    merge_file: str | None
    make_vocab_size_divisible_by: int
    seq_length: int | None  # None: the checkpoint's max_position_embeddings
    seed: int
    parallel: ParallelConfig
    override_tokenizer_check: bool = False


def validate_inference_args(args: argparse.Namespace) -> None:
    """Checks that need no checkpoint: run them before reading anything."""
    if not args.load:
        raise ConfigError("--load is required: the checkpoint directory written by pretrain_gpt2.py --save "
                          "(or by tools/convert_checkpoint.py)")
    if args.model_parallel_size <= 0:
        raise ConfigError(f"--model-parallel-size must be positive, got {args.model_parallel_size}")
    if not args.vocab_file or not args.merge_file:
        raise ConfigError("--vocab-file and --merge-file are required (the tokenizer the model was trained with)")
    if args.seq_length is not None and args.seq_length <= 0:
        raise ConfigError(f"--seq-length must be positive, got {args.seq_length}")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32 - 1] (NumPy's range), got {args.seed}")
    if args.make_vocab_size_divisible_by <= 0:
        raise ConfigError(f"--make-vocab-size-divisible-by must be positive, got {args.make_vocab_size_divisible_by}")


def inference_config(args: argparse.Namespace) -> InferenceConfig:
    """The ``InferenceConfig`` of parsed flags and the launch environment. Raises ConfigError."""
    validate_inference_args(args)
    parallel = build_parallel_config(read_launch_env(), args.model_parallel_size,
                                     distributed_backend=args.distributed_backend,
                                     distributed_timeout_minutes=args.distributed_timeout_minutes)
    return InferenceConfig(
        load=args.load, load_iteration=args.load_iteration, tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file, merge_file=args.merge_file,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, seq_length=args.seq_length,
        seed=args.seed, parallel=parallel, override_tokenizer_check=args.override_tokenizer_check)


def model_config_from_checkpoint(config: InferenceConfig, checkpoint: Checkpoint,
                                 tokenizer: AbstractTokenizer) -> ModelConfig:
    """The checkpoint's shape, its vocabulary padded for this run's model-parallel size, no dropout."""
    for key in _SHAPE_KEYS:
        if key not in checkpoint.model_config:
            raise ConfigError(f"checkpoint {config.load} lacks model_config[{key!r}]: not written by this codebase")
    shape = {key: int(checkpoint.model_config[key]) for key in _SHAPE_KEYS}
    mp_size = config.parallel.model_parallel_size
    if shape["num_attention_heads"] % mp_size:
        raise ConfigError(f"the checkpoint's {shape['num_attention_heads']} heads are not divisible by "
                          f"--model-parallel-size ({mp_size}); pick a divisor")
    if checkpoint.padded_vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's embedding only "
                          f"{checkpoint.padded_vocab_size}: pass the --vocab-file/--merge-file it was trained with")
    check_tokenizer_identity(config, checkpoint, tokenizer)
    padded = mpu.pad_vocab_size(tokenizer.vocab_size, config.make_vocab_size_divisible_by, mp_size)
    return ModelConfig(**shape, vocab_size=tokenizer.vocab_size, padded_vocab_size=padded, hidden_dropout=0.0,
                       attention_dropout=0.0)


def check_tokenizer_identity(config: InferenceConfig, checkpoint: Checkpoint, tokenizer: AbstractTokenizer) -> None:
    """The tokenizer files given are the ones the checkpoint was trained with (when it recorded them)."""
    check_tokenizer(checkpoint.model_config, tokenizer_identity(config, tokenizer), config.load,
                    config.override_tokenizer_check)


def sequence_length(config: InferenceConfig, model_config: ModelConfig) -> int:
    """``--seq-length``, else the checkpoint's max_position_embeddings (which it may not exceed)."""
    limit = model_config.max_position_embeddings
    if config.seq_length is not None and config.seq_length > limit:
        raise ConfigError(f"--seq-length ({config.seq_length}) exceeds the checkpoint's max_position_embeddings "
                          f"({limit})")
    return config.seq_length or limit


@dataclass(frozen=True)
class InferenceModel:
    """A loaded model on this rank, with its tokenizer and configuration."""

    model: GPT2Model  # eval mode, this rank's model-parallel slice, logits vocab-parallel
    tokenizer: AbstractTokenizer
    config: ModelConfig
    seq_length: int
    device: torch.device

    @property
    def eod(self) -> int:
        return self.tokenizer.eod


def load_inference_model(config: InferenceConfig) -> InferenceModel:
    """Read the checkpoint, start torch.distributed, build the model and load its slice.

    Every rank calls it. User errors (``ConfigError``) are raised before any process group exists.
    """
    tokenizer = build_tokenizer(config)
    checkpoint = read_checkpoint(config.load, config.load_iteration, with_optimizer=False)
    model_config = model_config_from_checkpoint(config, checkpoint, tokenizer)
    seq_length = sequence_length(config, model_config)
    initialize_megatron(config.parallel, config.seed)
    model = build_gpt2_model(model_config)
    load_serial_weights(model, checkpoint.model)
    device = config.parallel.device
    return InferenceModel(model.to(device).eval(), tokenizer, model_config, seq_length, device)


@torch.no_grad()
def load_serial_weights(model: GPT2Model, serial: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slice of each serial tensor into ``model`` (vocabulary re-padded)."""
    serial = dict(serial)
    serial["word_embeddings.weight"] = repad_vocab(serial["word_embeddings.weight"], model.vocab_size)
    world_size, rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    params = dict(model.named_parameters())
    if params.keys() != serial.keys():
        raise ConfigError(f"checkpoint tensors do not match GPT2Model: missing {sorted(params.keys() - serial.keys())}, "
                          f"unexpected {sorted(serial.keys() - params.keys())}")
    for name, param in params.items():
        full = serial[name]
        if getattr(param, "model_parallel", False):
            full = mpu.partition_master_weight(full, param.partition_dim, world_size, rank, param.partition_stride)
        param.copy_(full)
