"""Train a byte-level BPE in GPT-2's two-file format (``vocab.json`` + ``merges.txt``).

For the demo corpus and for users without GPT-2's files (nothing can be downloaded here).
The result loads with ``GPT2BPETokenizer`` and, like GPT-2, puts ``<|endoftext|>`` last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from megatron.tokenizer.pretokenize import gpt2_split_pattern
from megatron.tokenizer.tokenizer import EOD_TOKEN

MIN_VOCAB_SIZE = 257  # 256 byte symbols + <|endoftext|>


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike,
                         prefix: str = "gpt2", min_frequency: int = 2) -> tuple[Path, Path]:
    """Train on ``texts``; write ``{prefix}-vocab.json`` and ``{prefix}-merges.txt``.

    ``vocab_size`` counts the 256 byte symbols and ``<|endoftext|>`` (which gets the last id).
    Deterministic for the same texts. Returns ``(vocab_path, merges_path)``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at "
                         f"least {MIN_VOCAB_SIZE} (256 bytes + {EOD_TOKEN})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(gpt2_split_pattern()), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = (Path(p) for p in tokenizer.model.save(str(output_dir), prefix))
    _move_eod_last(vocab_path)
    return vocab_path, merges_path


def _move_eod_last(vocab_path: Path) -> None:
    """Renumber the vocab so ``<|endoftext|>`` has the last id, as in GPT-2's vocab.json."""
    with open(vocab_path, encoding="utf-8") as handle:
        vocab = json.load(handle)
    tokens = sorted((token for token in vocab if token != EOD_TOKEN), key=vocab.__getitem__)
    renumbered = {token: index for index, token in enumerate(tokens + [EOD_TOKEN])}
    with open(vocab_path, "w", encoding="utf-8") as handle:
        json.dump(renumbered, handle, ensure_ascii=False)
