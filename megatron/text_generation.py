"""Inference on a trained GPT-2: load any checkpoint at any model-parallel size, decode with a KV cache.

``load_inference_model`` reads a Megatron or DeepSpeed checkpoint (saved at any model-parallel
size), merges its shards and gives each rank of *this* run its slice, so a run's
``--model-parallel-size`` need not match the checkpoint's. Every rank reads the whole checkpoint
(memory: one full copy of the weights per rank while loading).

``cached_forward`` runs the model's own submodules with a per-layer key/value cache, so each
generated token costs one position of work (generation is linear in length, not quadratic).
All ranks of a model-parallel group call every function here with the same arguments.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from megatron.checkpoint_io import Checkpoint, read_checkpoint, repad_vocab
from megatron.errors import ConfigError
from megatron.initialize import initialize_megatron
from megatron.model import GPT2Model
from megatron.tokenizer import AbstractTokenizer, build_tokenizer

_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


def add_inference_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("inference", "checkpoint to run")
    group.add_argument("--load-iteration", type=int, default=None,
                       help="iteration to load (default: the latest complete one under --load)")
    parser.set_defaults(seq_length=None)
    return parser


def validate_inference_args(args: argparse.Namespace) -> None:
    """Checks that need no checkpoint: run them before reading anything."""
    if not args.load:
        raise ConfigError("--load is required: the checkpoint directory written by pretrain_gpt2.py --save "
                          "(or by tools/convert_checkpoint.py)")
    if args.model_parallel_size <= 0:
        raise ConfigError(f"--model-parallel-size must be positive, got {args.model_parallel_size}")
    if not args.vocab_file or not args.merge_file:
        raise ConfigError("--vocab-file and --merge-file are required (the tokenizer the model was trained with)")


def configure_from_checkpoint(args: argparse.Namespace, checkpoint: Checkpoint,
                              tokenizer: AbstractTokenizer) -> None:
    """Take the model shape from the checkpoint and pad the vocabulary for this run's size."""
    for key in _SHAPE_KEYS:
        if key not in checkpoint.model_config:
            raise ConfigError(f"checkpoint {args.load} lacks model_config[{key!r}]: not written by this codebase")
        setattr(args, key, checkpoint.model_config[key])
    if args.num_attention_heads % args.model_parallel_size:
        raise ConfigError(f"the checkpoint's {args.num_attention_heads} heads are not divisible by "
                          f"--model-parallel-size ({args.model_parallel_size}); pick a divisor")
    args.vocab_size, args.eod_token = tokenizer.vocab_size, tokenizer.eod
    if checkpoint.padded_vocab_size < args.vocab_size:
        raise ConfigError(f"the tokenizer has {args.vocab_size} tokens but the checkpoint's embedding only "
                          f"{checkpoint.padded_vocab_size}: pass the --vocab-file/--merge-file it was trained with")
    args.padded_vocab_size = mpu.pad_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by,
                                                args.model_parallel_size)
    if args.seq_length is None:
        args.seq_length = args.max_position_embeddings
    if args.seq_length > args.max_position_embeddings:
        raise ConfigError(f"--seq-length ({args.seq_length}) exceeds the checkpoint's max_position_embeddings "
                          f"({args.max_position_embeddings})")


def load_inference_model(args: argparse.Namespace) -> tuple[GPT2Model, AbstractTokenizer]:
    """Validate, read the checkpoint, start torch.distributed, build the model and load its slice.

    Every rank calls it. User errors (``ConfigError``) are raised before any process group exists.
    """
    validate_inference_args(args)
    tokenizer = build_tokenizer(args)
    checkpoint = read_checkpoint(args.load, args.load_iteration, with_optimizer=False)
    configure_from_checkpoint(args, checkpoint, tokenizer)
    initialize_megatron(args)
    model = GPT2Model(num_layers=args.num_layers, vocab_size=args.padded_vocab_size,
                      hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                      embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0,
                      max_sequence_length=args.max_position_embeddings, checkpoint_activations=False,
                      parallel_output=True)
    load_serial_weights(model, checkpoint.model)
    return model.to(args.device).eval(), tokenizer


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


@dataclass
class KVCache:
    """Keys and values of every layer, ``(b, np, positions so far, hn)``, and the positions filled."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> KVCache:
        return cls([None] * num_layers, [None] * num_layers, 0)


def _cached_attention(attention: torch.nn.Module, hidden: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
    """``ParallelSelfAttention.forward`` (eval mode) for ``t`` new positions after the cached ones."""
    mixed = attention.query_key_value(hidden)  # (b, t, 3 h / mp)
    query, key, value = (attention._split_heads(x) for x in mpu.split_tensor_along_last_dim(mixed, 3))
    if cache.keys[layer] is not None:
        key = torch.cat([cache.keys[layer], key], dim=2)  # (b, np, T, hn)
        value = torch.cat([cache.values[layer], value], dim=2)
    cache.keys[layer], cache.values[layer] = key, value
    new, total = query.size(2), key.size(2)
    # New position i (absolute total - new + i) sees keys 0 .. total - new + i.
    mask = torch.ones(new, total, dtype=torch.bool, device=hidden.device).tril(diagonal=total - new)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # (b, np, t, hn)
    b, _, t, _ = context.shape
    return attention.dense(context.transpose(1, 2).reshape(b, t, attention.hidden_size_per_partition))


@torch.no_grad()
def cached_forward(model: GPT2Model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits ``(b, t, padded_vocab)`` (gathered on every rank) for ``tokens (b, t)`` following the cache.

    Equals ``model(all tokens so far)`` at the new positions (a test checks it); extends ``cache``.
    """
    new = tokens.size(1)
    if cache.length + new > model.max_sequence_length:
        raise ConfigError(f"sequence of {cache.length + new} tokens exceeds max_position_embeddings "
                          f"({model.max_sequence_length}); shorten the prompt or --out-seq-length")
    positions = torch.arange(cache.length, cache.length + new, device=tokens.device).unsqueeze(0)
    hidden = model.word_embeddings(tokens) + model.position_embeddings(positions)
    for index, layer in enumerate(model.transformer.layers):
        hidden = hidden + _cached_attention(layer.attention, layer.input_layernorm(hidden), cache, index)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    cache.length += new
    hidden = model.transformer.final_layernorm(hidden)
    logits = F.linear(mpu.copy_to_model_parallel_region(hidden), model.word_embeddings.weight)
    return mpu.gather_from_model_parallel_region(logits)


@dataclass(frozen=True)
class SamplingSettings:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    def validate(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature} (use --greedy for argmax)")
        if self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"--top_p must be in [0, 1], got {self.top_p}")
        if self.top_k > 0 and self.top_p > 0.0:
            raise ConfigError("--top_k and --top_p are exclusive; pass one of them")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """``logits (vocab,)`` with everything outside the top-k, or outside the nucleus of mass
    ``top_p`` (the most likely token is always kept), set to -inf."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p > 0.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[1:] = remove[:-1].clone()  # keep the token that crosses the threshold
        remove[0] = False
        logits[order[remove]] = float("-inf")
    return logits


def next_token(logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator) -> int:
    """Pick from ``logits (vocab,)``: argmax, or a draw from the filtered, tempered softmax."""
    if settings.greedy:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits.float() / settings.temperature, settings.top_k, settings.top_p)
    return int(torch.multinomial(F.softmax(filtered, dim=-1), 1, generator=generator))


def _agree_on_token(token: int, device: torch.device) -> int:
    """Model-parallel rank 0's token, on every rank of the group (ranks must decode identically)."""
    if mpu.get_model_parallel_world_size() == 1:
        return token
    tensor = torch.tensor([token], dtype=torch.long, device=device)
    dist.broadcast(tensor, mpu.get_model_parallel_src_rank(), group=mpu.get_model_parallel_group())
    return int(tensor.item())


def generate(model: GPT2Model, context: list[int], max_length: int, settings: SamplingSettings,
             eod: int, vocab_size: int, generator: torch.Generator) -> list[int]:
    """The continuation of ``context`` (not including it): stops before ``eod`` or when prompt plus
    continuation reach ``max_length`` tokens (capped at max_position_embeddings)."""
    max_length = min(max_length, model.max_sequence_length)
    if len(context) >= max_length:
        raise ConfigError(f"the prompt has {len(context)} tokens, not fewer than the output length "
                          f"{max_length} (--out-seq-length, capped at max_position_embeddings); shorten it")
    device = model.word_embeddings.weight.device
    cache = KVCache.empty(len(model.transformer.layers))
    logits = cached_forward(model, torch.tensor([context], device=device), cache)[0, -1, :vocab_size]
    continuation: list[int] = []
    while True:
        token = _agree_on_token(next_token(logits, settings, generator), device)
        if token == eod:
            break
        continuation.append(token)
        if len(context) + len(continuation) >= max_length:
            break
        logits = cached_forward(model, torch.tensor([[token]], device=device), cache)[0, -1, :vocab_size]
    return continuation
