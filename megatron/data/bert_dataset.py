"""BERT samples: sentence pairs ``[CLS] A [SEP] B [SEP]`` with masked-LM corruption and padding.

Documents (loose JSON) are split into sentences with a regex and tokenised once. Each document's
sentences are packed greedily into chunks of about ``seq_length - 3`` tokens. Sample ``i`` of a
split takes chunk ``perm_e[i mod n]`` (``perm_e`` shuffled with ``(seed, split, epoch)``), cuts
it at a random sentence boundary into A and B, and for the sentence head either swaps them (SOP)
or replaces B by text of another document (NSP) with probability 1/2; the pair is truncated,
framed, masked (``megatron.data.masking``) and padded. Every random choice comes from
``default_rng([seed, split, i])``, so a sample depends only on the data, the flags and ``i``:
a resumed run reads exactly the samples the uninterrupted run would have read.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron.data.builder import parse_split, require_train_documents, resolve_corpus, split_bounds
from megatron.data.cache import build_once
from megatron.data.config import DataConfig
from megatron.data.errors import DataError
from megatron.data.gpt2_dataset import SPLIT_NAMES
from megatron.data.loose_json import iter_json_texts
from megatron.data.masking import MaskingConfig, mask_tokens
from megatron.data.samplers import MegatronPretrainingSampler
from megatron.tokenizer.wordpiece import WordPieceTokenizer, train_wordpiece

SENTENCE_HEADS = ("none", "nsp", "sop")
DEMO_WORDPIECE_SIZE = 8000
# A sentence ends at . ! or ? followed by white space, or at a blank line.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
BATCH_KEYS = ("text", "types", "labels", "loss_mask", "padding_mask", "sentence_label")


def split_sentences(text: str) -> list[str]:
    """Non-empty sentences of ``text`` (a simple regex splitter: good enough for pretraining)."""
    return [sentence.strip() for sentence in _SENTENCE_END.split(text) if sentence.strip()]


@dataclass
class SentenceCorpus:
    """Tokenised sentences back to back; document ``d`` is sentences ``[doc_starts[d], doc_starts[d + 1])``."""

    tokens: np.ndarray  # int32, all sentences concatenated
    sentence_starts: np.ndarray  # int64, num_sentences + 1 offsets into tokens
    doc_starts: np.ndarray  # int64, num_documents + 1 offsets into sentences

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    def sentence(self, index: int) -> np.ndarray:
        return self.tokens[self.sentence_starts[index]:self.sentence_starts[index + 1]]

    def sentences(self, first: int, stop: int) -> np.ndarray:
        return self.tokens[self.sentence_starts[first]:self.sentence_starts[stop]]


def build_sentence_corpus(texts: Iterable[str], tokenizer: WordPieceTokenizer,
                          batch_size: int = 512) -> SentenceCorpus:
    """Split each text into sentences and tokenise them; documents without tokens are dropped."""
    pieces: list[np.ndarray] = []
    sentence_sizes: list[int] = []
    doc_sizes: list[int] = []
    batch: list[list[str]] = []

    def flush() -> None:
        flat = [sentence for doc in batch for sentence in doc]
        ids = iter(tokenizer.tokenize_batch(flat))
        for doc in batch:
            kept = [np.asarray(s, dtype=np.int32) for s in (next(ids) for _ in doc) if s]
            if kept:
                pieces.extend(kept)
                sentence_sizes.extend(len(s) for s in kept)
                doc_sizes.append(len(kept))
        batch.clear()

    for text in texts:
        batch.append(split_sentences(text))
        if len(batch) >= batch_size:
            flush()
    flush()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    sentence_starts = np.concatenate([[0], np.cumsum(sentence_sizes)]).astype(np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(doc_sizes)]).astype(np.int64)
    return SentenceCorpus(tokens, sentence_starts, doc_starts)


def build_chunks(corpus: SentenceCorpus, first_doc: int, stop_doc: int, target_tokens: int) -> np.ndarray:
    """``(n, 3)`` rows ``(document, first_sentence, stop_sentence)``: each document's sentences
    packed greedily until a chunk holds at least ``target_tokens`` tokens (the last may hold fewer)."""
    rows = []
    sizes = np.diff(corpus.sentence_starts)
    for doc in range(first_doc, stop_doc):
        start, stop = int(corpus.doc_starts[doc]), int(corpus.doc_starts[doc + 1])
        chunk_start, filled = start, 0
        for sentence in range(start, stop):
            filled += int(sizes[sentence])
            if filled >= target_tokens:
                rows.append((doc, chunk_start, sentence + 1))
                chunk_start, filled = sentence + 1, 0
        if chunk_start < stop:
            rows.append((doc, chunk_start, stop))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def truncate_pair(first: np.ndarray, second: np.ndarray, max_tokens: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Trim the longer segment, from its front or back at random, until both fit ``max_tokens``."""
    while len(first) + len(second) > max_tokens:
        excess = len(first) + len(second) - max_tokens
        amount = min(excess, max(abs(len(first) - len(second)), 1))
        longer_is_first = len(first) >= len(second)
        longer = first if longer_is_first else second
        longer = longer[amount:] if rng.random() < 0.5 else longer[:len(longer) - amount]
        first, second = (longer, second) if longer_is_first else (first, longer)
    return first, second


@dataclass(frozen=True)
class BertSampleConfig:
    """What a BERT sample looks like."""

    seq_length: int
    seed: int
    sentence_head: str = "sop"  # none | nsp | sop
    masking: MaskingConfig = MaskingConfig()


class BertDataset(torch.utils.data.Dataset):
    """``num_samples`` samples of ``BATCH_KEYS`` (int64; ``[seq_length]`` each, ``sentence_label`` 0-dim)
    over the chunks of documents ``[first_doc, stop_doc)``.

    ``sentence_label`` is 1 when B was swapped (SOP) or taken from another document (NSP).
    """

    def __init__(self, name: str, corpus: SentenceCorpus, first_doc: int, stop_doc: int, num_samples: int,
                 tokenizer: WordPieceTokenizer, config: BertSampleConfig) -> None:
        self.name, self.corpus, self.config = name, corpus, config
        self.split_index = SPLIT_NAMES.index(name)
        self.num_samples = num_samples
        self.chunks = build_chunks(corpus, first_doc, stop_doc, config.seq_length - 3)
        if len(self.chunks) == 0:
            raise DataError(f"the {name} split has no text (documents {first_doc}-{stop_doc}); "
                            "give it documents with --split, or add data")
        self.cls, self.sep, self.pad, self.mask = tokenizer.cls, tokenizer.sep, tokenizer.pad, tokenizer.mask
        self.special_ids = tokenizer.special_ids
        self.random_ids = np.setdiff1d(np.arange(tokenizer.vocab_size), self.special_ids)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _chunk(self, index: int) -> np.ndarray:
        epoch, position = divmod(index, len(self.chunks))
        if epoch not in self._orders:
            shuffle = np.random.default_rng([self.config.seed, self.split_index, epoch, 1])
            self._orders[epoch] = shuffle.permutation(len(self.chunks))
        return self.chunks[self._orders[epoch][position]]

    def _segments(self, chunk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A and B of one chunk, cut at a random sentence boundary (inside the sentence if only one)."""
        _, first, stop = (int(v) for v in chunk)
        if stop - first >= 2:
            cut = int(rng.integers(first + 1, stop))
            return self.corpus.sentences(first, cut), self.corpus.sentences(cut, stop)
        tokens = self.corpus.sentence(first)
        cut = int(rng.integers(1, len(tokens))) if len(tokens) > 1 else len(tokens)
        return tokens[:cut], tokens[cut:]

    def _other_document_text(self, doc: int, rng: np.random.Generator) -> np.ndarray:
        """Text from a random chunk of another document (NSP's negative B), from a random sentence on."""
        other = int(rng.integers(len(self.chunks)))
        if self.chunks[other][0] == doc:
            other = (other + 1) % len(self.chunks)
        _, first, stop = (int(v) for v in self.chunks[other])
        return self.corpus.sentences(int(rng.integers(first, stop)), stop)

    def _pair(self, chunk: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        first, second = self._segments(chunk, rng)
        head = self.config.sentence_head
        if head == "none" or rng.random() >= 0.5:
            return first, second, 0
        if head == "sop":
            return second, first, 1
        return first, self._other_document_text(int(chunk[0]), rng), 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.config.seed, self.split_index, index])
        first, second, sentence_label = self._pair(self._chunk(index), rng)
        first, second = truncate_pair(first, second, self.config.seq_length - 3, rng)
        tokens = np.concatenate([[self.cls], first, [self.sep], second, [self.sep]]).astype(np.int64)
        types = np.concatenate([np.zeros(len(first) + 2), np.ones(len(second) + 1)]).astype(np.int64)
        masked = mask_tokens(tokens, rng, self.mask, self.special_ids, self.random_ids, self.config.masking)
        padding = self.config.seq_length - len(tokens)

        def pad(array: np.ndarray, value: int) -> np.ndarray:
            return np.pad(array, (0, padding), constant_values=value)

        return {"text": pad(masked.inputs, self.pad), "types": pad(types, 0),
                "labels": pad(masked.labels, 0), "loss_mask": pad(masked.loss_mask, 0),
                "padding_mask": pad(np.ones(len(tokens), dtype=np.int64), 0),
                "sentence_label": np.array(sentence_label, dtype=np.int64)}


def _log(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def load_corpus(paths: list[str], data: DataConfig, tokenizer: WordPieceTokenizer,
                flag: str = "--train-data") -> SentenceCorpus:
    """Sentences of the loose-JSON files (or corpus names such as ``demo``) in ``paths``, given
    with ``flag``; DataError if they hold no document with text."""
    files = [resolve_corpus(name, data) for name in paths]
    texts = (text for path in files for text in iter_json_texts(path, data.text_key, data.skip_bad_lines))
    corpus = build_sentence_corpus(texts, tokenizer)
    if corpus.num_documents == 0:
        raise DataError(f"{flag} {', '.join(files)} holds no documents: the file is empty or every line's "
                        f"{data.text_key!r} is empty; give it at least one line such as {{\"text\": \"...\"}}")
    return corpus


def build_bert_datasets(data: DataConfig, config: BertSampleConfig, tokenizer: WordPieceTokenizer,
                        num_samples: tuple[int, int, int]) -> tuple[BertDataset | None, ...]:
    """Train/valid/test ``BertDataset``s from ``--train-data`` split by documents with ``--split``
    (or whole, with ``--valid-data``/``--test-data`` as the other splits). A validation or test
    split with no documents or 0 requested samples is None; the train split never is. Raises
    DataError for unusable data (no documents, a --split giving train none)."""
    if data.data_path:
        raise DataError("BERT reads loose JSON (--train-data), which keeps sentence and document "
                        "boundaries; --data-path (indexed .bin/.idx) is not supported for BERT yet")
    corpus = load_corpus(data.train_data, data, tokenizer)
    separate = [data.valid_data, data.test_data]
    if any(separate):
        corpora = [corpus] + [load_corpus(p, data, tokenizer, f"--{name}-data") if p else None
                              for name, p in zip(SPLIT_NAMES[1:], separate)]
        ranges = [(c, 0, c.num_documents) if c is not None else (None, 0, 0) for c in corpora]
    else:
        bounds = split_bounds(corpus.num_documents, parse_split(data.split))
        require_train_documents(bounds, ", ".join(resolve_corpus(n, data) for n in data.train_data), data.split)
        ranges = [(corpus, bounds[i], bounds[i + 1]) for i in range(3)]
    datasets = []
    for name, (source, first, stop), count in zip(SPLIT_NAMES, ranges, num_samples):
        usable = source is not None and stop > first and count > 0
        datasets.append(BertDataset(name, source, first, stop, count, tokenizer, config) if usable else None)
    sizes = ", ".join(f"{n} {len(d.chunks) if d else 0} chunks" for n, d in zip(SPLIT_NAMES, datasets))
    _log(f"BERT datasets built from {corpus.num_documents} documents, "
         f"{len(corpus.sentence_starts) - 1} sentences: {sizes}")
    return tuple(datasets)


def collate_bert(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack each key of ``BATCH_KEYS`` into a LongTensor with a leading batch dimension."""
    return {key: torch.from_numpy(np.stack([sample[key] for sample in samples])).long() for key in BATCH_KEYS}


def build_bert_data_loader(dataset: BertDataset, micro_batch_size: int, num_workers: int,
                           consumed_samples: int, data_parallel_rank: int,
                           data_parallel_size: int) -> torch.utils.data.DataLoader:
    """Loader for this data-parallel rank resuming at ``consumed_samples`` (see ``samplers.py``)."""
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_bert, generator=torch.Generator(),
                                       persistent_workers=num_workers > 0)


def demo_wordpiece_path(demo_dir: str | Path, lowercase: bool = True) -> Path:
    return Path(demo_dir) / f"bert-{'uncased' if lowercase else 'cased'}-vocab.txt"


def ensure_demo_wordpiece(demo_dir: str | Path = "data/demo", lowercase: bool = True) -> Path:
    """Train the demo WordPiece vocabulary (8000 tokens) on the demo corpus once; returns its path.

    Every rank may call it: one trains (under a file lock) and renames the file into place.
    """
    from megatron.data.demo import DEMO_DIR_FIX, ensure_demo_corpus

    data = ensure_demo_corpus(demo_dir)["data"]
    target = demo_wordpiece_path(demo_dir, lowercase)

    def build(tmp: Path) -> None:
        train_wordpiece(iter_json_texts(data), DEMO_WORDPIECE_SIZE, tmp, lowercase=lowercase)

    build_once(target, build, fix=DEMO_DIR_FIX)
    return target
