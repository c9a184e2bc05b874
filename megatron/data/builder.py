"""``build_train_valid_test_datasets``: from ``--train-data`` (loose JSON) or ``--data-path``.

Every rank that reads data calls it with the same arguments; caches are built once (file lock)
and every check that can fail on the data runs here, before training allocates anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from megatron.data.config import DataConfig
from megatron.data.documents import ConcatDocuments, Documents
from megatron.data.errors import DataError
from megatron.data.gpt2_dataset import SPLIT_NAMES, BlendedDataset, GPT2Dataset, blended_counts
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.data.loose_json import tokenize_cached, tokenize_in_memory
from megatron.errors import ConfigError
from megatron.tokenizer import AbstractTokenizer

Dataset = torch.utils.data.Dataset
# Registered corpus names for --train-data, resolved under --data-dir.
CORPORA = {"webtext": os.path.join("webtext", "data.json")}


def parse_split(split: str) -> list[float]:
    """``'949,50,1'`` (or ``'949/50/1'``) -> train/valid/test fractions summing to 1."""
    parts = split.replace("/", ",").split(",")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ConfigError(f"--split {split!r} must be numbers like 949,50,1") from None
    if len(values) > 3 or any(value < 0 for value in values) or sum(values) <= 0:
        raise ConfigError(f"--split {split!r} must be up to three non-negative weights with a "
                         "positive sum, e.g. 949,50,1")
    values += [0.0] * (3 - len(values))
    return [value / sum(values) for value in values]


def split_bounds(num_documents: int, fractions: list[float]) -> list[int]:
    """Document boundaries ``[0, a, b, num_documents]`` of the train/valid/test ranges."""
    cumulative = np.cumsum([0.0] + fractions)
    bounds = [int(round(value * num_documents)) for value in cumulative]
    bounds[-1] = num_documents
    return bounds


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """``['A']`` -> ``[(1.0, 'A')]``; ``['0.3', 'A', '0.7', 'B']`` -> weighted prefixes."""
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        raise ConfigError(f"--data-path {' '.join(data_path)}: give one prefix, or weight/prefix "
                         "pairs such as `0.3 A 0.7 B`")
    pairs = []
    for weight, prefix in zip(data_path[::2], data_path[1::2]):
        try:
            value = float(weight)
        except ValueError:
            raise ConfigError(f"--data-path weight {weight!r} is not a number; use pairs such as "
                             "`0.3 A 0.7 B`") from None
        if value <= 0:
            raise ConfigError(f"--data-path weight {weight} for {prefix} must be positive")
        pairs.append((value, prefix))
    return pairs


def resolve_corpus(name: str, config: DataConfig) -> str:
    """A registered corpus name (``webtext``, ``demo``) to its file; other values are paths."""
    if name == "demo":
        from megatron.data.demo import ensure_demo_corpus

        return str(ensure_demo_corpus(config.demo_data_dir)["data"])
    if name in CORPORA:
        return os.path.join(config.data_dir, CORPORA[name])
    return name


def _log(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def _check_vocab(documents: Documents, tokenizer: AbstractTokenizer, source: str) -> None:
    """Raise DataError if any token id is not below the tokenizer's vocabulary size."""
    max_token = documents.max_token()
    if max_token >= tokenizer.vocab_size:
        raise DataError(f"{source} contains token id {max_token} but the tokenizer has "
                        f"{tokenizer.vocab_size} tokens; it was preprocessed with another "
                        "vocabulary: pass that --vocab-file/--merge-file, or re-run "
                        "tools/preprocess_data.py with these")


def _load_json_documents(paths: list[str], config: DataConfig,
                         tokenizer: AbstractTokenizer) -> Documents:
    """Tokenised documents of the loose-JSON ``paths`` (cached with ``--lazy-loader``)."""
    options = {"text_key": config.text_key, "skip_bad_lines": config.skip_bad_lines}
    parts = []
    for name in paths:
        path = resolve_corpus(name, config)
        if config.lazy_loader:
            parts.append(tokenize_cached(path, tokenizer, cache_dir=config.cache_dir, **options))
        else:
            parts.append(tokenize_in_memory(path, tokenizer, **options))
    documents = parts[0] if len(parts) == 1 else ConcatDocuments(parts)
    _check_vocab(documents, tokenizer, ", ".join(paths))
    return documents


def _make(name: str, documents: Documents, first: int, stop: int, num_samples: int,
          config: DataConfig, cache_dir: str | os.PathLike | None) -> GPT2Dataset | None:
    if num_samples <= 0 or stop <= first:
        return None
    return GPT2Dataset(name, documents, first, stop, num_samples, config.seq_length, config.seed, cache_dir)


def _from_loose_json(args: DataConfig, tokenizer: AbstractTokenizer,
                     num_samples: tuple[int, int, int]) -> tuple[Dataset | None, ...]:
    cache_dir = args.cache_dir
    sample_cache = (Path(cache_dir) if cache_dir else Path(resolve_corpus(args.train_data[0], args))
                    .resolve().parent / "sample-index-cache") if args.lazy_loader else None
    train_docs = _load_json_documents(args.train_data, args, tokenizer)
    separate = [args.valid_data, args.test_data]
    if any(separate):
        _log("--valid-data/--test-data given: --train-data is used whole and --split is ignored")
        datasets = [_make("train", train_docs, 0, len(train_docs.sizes), num_samples[0], args,
                          sample_cache)]
        for name, paths, count in zip(SPLIT_NAMES[1:], separate, num_samples[1:]):
            docs = _load_json_documents(paths, args, tokenizer) if paths else None
            datasets.append(_make(name, docs, 0, len(docs.sizes), count, args, sample_cache)
                            if docs is not None else None)
        return tuple(datasets)
    bounds = split_bounds(len(train_docs.sizes), parse_split(args.split))
    return tuple(_make(name, train_docs, bounds[i], bounds[i + 1], num_samples[i], args, sample_cache)
                 for i, name in enumerate(SPLIT_NAMES))


def _from_indexed(args: DataConfig, tokenizer: AbstractTokenizer,
                  num_samples: tuple[int, int, int]) -> tuple[Dataset | None, ...]:
    weighted = parse_data_path(args.data_path)
    fractions = parse_split(args.split)
    weights = [weight for weight, _ in weighted]
    # Samples each dataset must serve per split (at least one, so a blend never lacks a part).
    counts = [[max(c, 1 if n > 0 else 0) for c in blended_counts(weights, n)] for n in num_samples]
    per_prefix = []
    for position, (_, prefix) in enumerate(weighted):
        documents = MMapIndexedDataset(prefix)
        _check_vocab(documents, tokenizer, f"{prefix}.bin")
        cache_dir = Path(args.cache_dir or Path(prefix).resolve().parent)
        cache_dir = cache_dir / f"{Path(prefix).name}.index-cache"
        bounds = split_bounds(len(documents.sizes), fractions)
        per_prefix.append([_make(name, documents, bounds[i], bounds[i + 1], counts[i][position],
                                 args, cache_dir) for i, name in enumerate(SPLIT_NAMES)])
    if len(weighted) == 1:
        return tuple(per_prefix[0])
    result = []
    for i, name in enumerate(SPLIT_NAMES):
        parts = [splits[i] for splits in per_prefix]
        if num_samples[i] <= 0 or all(part is None for part in parts):
            result.append(None)
        elif any(part is None for part in parts):
            raise DataError(f"the {name} split is empty for some --data-path datasets; adjust "
                            "--split so every dataset has documents in it")
        else:
            result.append(BlendedDataset(parts, weights, num_samples[i]))
    return tuple(result)


def build_train_valid_test_datasets(
        args: DataConfig, tokenizer: AbstractTokenizer,
        train_valid_test_num_samples: tuple[int, int, int],
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Train/valid/test datasets of ``{"text": int64[seq_length + 1]}`` samples.

    Uses ``--data-path`` (indexed, possibly a weighted blend) if given, else ``--train-data``
    (loose JSON). A split that gets no documents or 0 requested samples is None. Sample ``i``
    does not depend on ``train_valid_test_num_samples`` (see ``GPT2Dataset``). Raises
    ``ConfigError`` subclasses for bad data.
    """
    if args.data_path:
        datasets = _from_indexed(args, tokenizer, train_valid_test_num_samples)
    elif args.train_data:
        datasets = _from_loose_json(args, tokenizer, train_valid_test_num_samples)
    else:
        raise ConfigError("no training data: pass --train-data (loose JSON file or corpus name such "
                         "as demo or webtext) or --data-path (prefix of a preprocessed .bin/.idx)")
    sizes = ", ".join(f"{name} {len(d) if d is not None else 0}" for name, d in zip(SPLIT_NAMES, datasets))
    _log(f"datasets built: {sizes} samples of {args.seq_length + 1} tokens")
    return datasets[0], datasets[1], datasets[2]
