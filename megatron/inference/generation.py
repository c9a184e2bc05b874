"""Batched text generation with the model's key/value cache: greedy, temperature, top-k, top-p.

A batch of prompts is left-padded to one length and run through ``GPT2Model.forward`` with a
``KVCache``: one forward for the prompts, then one per new token, each costing one position of
work per row. Each row has its own position ids (its first real token at position 0) and an
attention mask hiding the pad keys, so a row's tokens are those it gets alone. Rows that finish
are dropped from the batch. All ranks of a model-parallel group call ``generate`` with the same
arguments; model-parallel rank 0's tokens are broadcast so every rank decodes alike.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from megatron.errors import ConfigError
from megatron.model import GPT2Model, KVCache


@dataclass(frozen=True)
class SamplingSettings:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    def validate(self) -> None:
        """Raise ConfigError for a temperature that is not a finite number (nan, inf: even with
        --greedy, which ignores it) or not positive, a negative top-k, a top-p (nan included)
        outside [0, 1], or top-k and top-p together."""
        if not math.isfinite(self.temperature):
            raise ConfigError(f"--temperature must be a finite positive number, got {self.temperature}")
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature} (use --greedy for argmax)")
        if self.top_k < 0:
            raise ConfigError(f"--top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"--top_p must be in [0, 1], got {self.top_p}")
        if self.top_k > 0 and self.top_p > 0.0:
            raise ConfigError("--top_k and --top_p are exclusive; pass one of them")


@dataclass(frozen=True)
class StoppingRule:
    """When a row's continuation ends: before ``eod`` (unless ``stop_at_eod`` is False), when
    prompt plus continuation reach ``max_length`` tokens (capped at max_position_embeddings), or
    after ``max_new_tokens`` new tokens when given."""

    eod: int
    max_length: int
    stop_at_eod: bool = True  # False: benchmarks force a fixed number of new tokens
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise ConfigError(f"--out-seq-length must be positive, got {self.max_length}")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be positive (or None), got {self.max_new_tokens}")


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator prompt ``index`` (0-based, in input order) samples from.

    It depends on ``seed`` and ``index`` only, so a prompt's text does not depend on the batch
    it falls in, nor on how many prompts came before it in that batch.
    """
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """``logits (..., vocab)`` with everything outside the top-k, or outside the nucleus of mass
    ``top_p`` (the most likely token is always kept), set to -inf, row by row."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p > 0.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses the threshold
        remove[..., 0] = False
        logits.scatter_(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return logits


def choose_tokens(logits: torch.Tensor, settings: SamplingSettings,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """Next token ids ``(b,)`` from ``logits (b, vocab)``: argmax, or row ``i``'s draw from its
    filtered, tempered softmax with ``generators[i]`` (drawn on the CPU, so a seed gives the same
    text on any device)."""
    if settings.greedy:
        return torch.argmax(logits, dim=-1)
    tempered = logits.float().cpu() / settings.temperature
    probs = F.softmax(filter_logits(tempered, settings.top_k, settings.top_p), dim=-1)
    tokens = [torch.multinomial(row, 1, generator=generator) for row, generator in zip(probs, generators)]
    return torch.cat(tokens).to(logits.device)


def _agree_on_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Model-parallel rank 0's tokens ``(b,)`` on every rank of the group (one broadcast a step)."""
    if mpu.get_model_parallel_world_size() == 1:
        return tokens
    agreed = tokens.to(mpu.communication_device(), torch.long).contiguous()
    dist.broadcast(agreed, mpu.get_model_parallel_src_rank(), group=mpu.get_model_parallel_group())
    return agreed.to(tokens.device)


class DecodingBatch:
    """Left-padded prompts and the rows still being decoded.

    ``prompt_tokens``/``prompt_positions`` ``(b, width)``: the prompts padded on the left with
    ``pad``, each row's first real token at position 0. ``rows``: indices into the prompts of
    the rows still decoded; ``next_positions`` ``(b, 1)``: their next token's position id;
    ``key_mask`` ``(b, capacity)``: which cache columns hold real tokens. Left padding puts every
    row's new token in the same cache column; columns past the prompts are all real tokens.
    """

    def __init__(self, contexts: list[list[int]], pad: int, capacity: int, device: torch.device) -> None:
        width = max(len(context) for context in contexts)
        lengths = torch.tensor([len(context) for context in contexts])
        tokens = torch.full((len(contexts), width), pad, dtype=torch.long)
        key_mask = torch.ones(len(contexts), capacity, dtype=torch.bool)
        for row, context in enumerate(contexts):
            tokens[row, width - len(context):] = torch.tensor(context, dtype=torch.long)
            key_mask[row, :width - len(context)] = False
        # A row's first real token is at position 0; its pads take position 0 too (they are hidden).
        positions = (torch.arange(width) - (width - lengths)[:, None]).clamp(min=0)
        self.rows = list(range(len(contexts)))
        self.prompt_tokens, self.prompt_positions = tokens.to(device), positions.to(device)  # (b, width)
        self.key_mask = key_mask.to(device)
        self.next_positions = lengths[:, None].to(device)
        self.padded = bool((lengths != width).any())

    def prompt_mask(self) -> torch.Tensor | None:
        """``(b, 1, width, width)``: causal and no pad keys; None (plain causal) without padding.

        A pad query also sees itself: a query with no visible key gets a NaN softmax from some
        attention kernels and torch versions (the math path before torch 2.5), and NaN times a
        zero probability is still NaN in the rows that attend to it in later layers.
        """
        if not self.padded:
            return None
        width = self.prompt_tokens.size(1)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.key_mask.device).tril()
        mask = causal & self.key_mask[:, None, None, :width]
        return mask | torch.eye(width, dtype=torch.bool, device=mask.device)

    def step_mask(self, total: int) -> torch.Tensor | None:
        """``(b, 1, 1, total)`` for one new position after ``total - 1`` cached ones."""
        return self.key_mask[:, None, None, :total] if self.padded else None

    def keep(self, slots: list[int], cache: KVCache) -> None:
        """Keep only the rows at ``slots`` (positions in the current batch) here and in ``cache``."""
        index = torch.tensor(slots, device=self.key_mask.device)
        cache.keep_rows(index)
        self.rows = [self.rows[slot] for slot in slots]
        self.key_mask, self.next_positions = self.key_mask[index], self.next_positions[index]
        self.padded = self.padded and not bool(self.key_mask.all())


def _validate(contexts: list[list[int]], max_length: int) -> None:
    if any(not context for context in contexts):
        raise ConfigError("every prompt needs at least one token (pass [eod] for an unconditional sample)")
    for context in contexts:
        if len(context) >= max_length:
            raise ConfigError(f"the prompt has {len(context)} tokens, not fewer than the output length "
                              f"{max_length} (--out-seq-length, capped at max_position_embeddings); shorten it")


def _cache_capacity(contexts: list[list[int]], max_length: int, stopping: StoppingRule) -> int:
    """Cache columns the batch can need: the padded prompts plus the longest continuation."""
    steps = max_length - min(len(context) for context in contexts)
    if stopping.max_new_tokens is not None:
        steps = min(steps, stopping.max_new_tokens)
    return max(len(context) for context in contexts) + steps


def _last_logits(model: GPT2Model, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The last position's logits over the true vocabulary, ``(b, vocab_size)``, on every rank."""
    last = logits[:, -1]
    if model.parallel_output:
        last = mpu.gather_from_model_parallel_region(last)
    return last[:, :vocab_size]


def _record(tokens: list[int], rows: list[int], contexts: list[list[int]], outputs: list[list[int]],
            stopping: StoppingRule, max_length: int) -> list[int]:
    """Append ``tokens[slot]`` to ``outputs[rows[slot]]`` unless it ends the row; return the slots
    of the rows that go on."""
    going = []
    for slot, (row, token) in enumerate(zip(rows, tokens)):
        if stopping.stop_at_eod and token == stopping.eod:
            continue
        outputs[row].append(token)
        full = len(contexts[row]) + len(outputs[row]) >= max_length
        if not full and len(outputs[row]) != stopping.max_new_tokens:
            going.append(slot)
    return going


@torch.inference_mode()
def generate(model: GPT2Model, contexts: list[list[int]], settings: SamplingSettings, stopping: StoppingRule,
             vocab_size: int, generators: list[torch.Generator] | None = None) -> list[list[int]]:
    """The continuations of ``contexts`` (prompts as token ids, one batch; not including them).

    ``generators[i]`` draws row ``i``'s samples (see ``prompt_generator``; unused when greedy).
    Greedy continuations equal those of each prompt alone.
    """
    if not contexts:
        return []
    max_length = min(stopping.max_length, model.max_sequence_length)
    _validate(contexts, max_length)
    if not settings.greedy and (generators is None or len(generators) != len(contexts)):
        raise ValueError(f"sampling needs one generator per prompt: {len(contexts)} prompts, "
                         f"{None if generators is None else len(generators)} generators")
    device = model.word_embeddings.weight.device
    batch = DecodingBatch(contexts, stopping.eod, _cache_capacity(contexts, max_length, stopping), device)
    cache = KVCache.empty(len(model.transformer.layers), batch.key_mask.size(1))
    logits = model(batch.prompt_tokens, batch.prompt_positions, batch.prompt_mask(), kv_cache=cache,
                   last_logits_only=True)
    outputs: list[list[int]] = [[] for _ in contexts]
    while True:
        row_generators = [] if generators is None else [generators[row] for row in batch.rows]
        tokens = _agree_on_tokens(choose_tokens(_last_logits(model, logits, vocab_size), settings, row_generators))
        going = _record(tokens.tolist(), batch.rows, contexts, outputs, stopping, max_length)
        if not going:
            return outputs
        if len(going) < len(batch.rows):
            tokens = tokens[torch.tensor(going, device=device)]
            batch.keep(going, cache)
        logits = model(tokens[:, None], batch.next_positions, batch.step_mask(cache.length + 1), kv_cache=cache)
        batch.next_positions = batch.next_positions + 1
