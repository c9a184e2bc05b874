"""``build_train_valid_test_datasets``: from ``--train-data`` (loose JSON) or ``--data-path``.

Every rank that reads data calls it with the same arguments; caches are built once (file lock)
and every check that can fail on the data runs here, before training allocates anything.
"""

from __future__ import annotations

import math
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


def _weight(text: str, flag: str, example: str, positive: bool = False) -> float:
    """``text`` as a finite number, >= 0 (> 0 if ``positive``); ConfigError naming ``flag`` (the
    flag and what the weight is for) and the weight otherwise."""
    weight = f"{flag} weight {text!r}"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{weight} is not a number; use weights such as {example}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ConfigError(f"{weight} must be a finite, {kind} number; use weights such as {example}")
    return value


def _check_weight_sum(values: list[float], flag: str, example: str) -> float:
    """The sum of ``values``; ConfigError unless it is positive and finite (no overflow)."""
    total = sum(values)  # inf on overflow (math.fsum would raise)
    if not math.isfinite(total):
        raise ConfigError(f"{flag} weights {values} sum to {total} (overflow); only their ratios matter: "
                          f"scale them down, e.g. {example}")
    if total <= 0:
        raise ConfigError(f"{flag} weights must have a positive sum, e.g. {example}")
    return total


def parse_split(split: str) -> list[float]:
    """``'949,50,1'`` (or ``'949/50/1'``) -> train/valid/test fractions summing to 1.

    Raises ConfigError for more than three weights, or a weight that is not a finite,
    non-negative number, or weights whose sum is 0 or overflows."""
    parts = split.replace("/", ",").split(",")
    if len(parts) > 3:
        raise ConfigError(f"--split {split!r} has {len(parts)} weights; give up to three "
                          "(train,valid,test), e.g. 949,50,1")
    values = [_weight(part, f"--split {split!r}:", "949,50,1") for part in parts]
    total = _check_weight_sum(values, f"--split {split!r}:", "949,50,1")
    values += [0.0] * (3 - len(values))
    return [value / total for value in values]


def split_bounds(num_documents: int, fractions: list[float]) -> list[int]:
    """Document boundaries ``[0, a, b, num_documents]`` of the train/valid/test ranges."""
    cumulative = np.cumsum([0.0] + fractions)
    bounds = [int(round(value * num_documents)) for value in cumulative]
    bounds[-1] = num_documents
    return bounds


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """``['A']`` -> ``[(1.0, 'A')]``; ``['0.3', 'A', '0.7', 'B']`` -> weighted prefixes.

    Raises ConfigError for an odd number of words, a weight that is not a finite positive
    number, or weights whose sum overflows."""
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        raise ConfigError(f"--data-path {' '.join(data_path)}: give one prefix, or weight/prefix "
                         "pairs such as `0.3 A 0.7 B`")
    pairs = []
    for weight, prefix in zip(data_path[::2], data_path[1::2]):
        pairs.append((_weight(weight, f"--data-path {prefix}:", "`0.3 A 0.7 B`", positive=True), prefix))
    _check_weight_sum([value for value, _ in pairs], "--data-path", "`0.3 A 0.7 B`")
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
                         tokenizer: AbstractTokenizer) -> tuple[Documents, str]:
    """Tokenised documents of the loose-JSON ``paths`` (cached with ``--lazy-loader``) and the
    files they came from (for messages)."""
    options = {"text_key": config.text_key, "skip_bad_lines": config.skip_bad_lines}
    parts, files = [], []
    for name in paths:
        path = resolve_corpus(name, config)
        files.append(path)
        if config.lazy_loader:
            parts.append(tokenize_cached(path, tokenizer, cache_dir=config.cache_dir, **options))
        else:
            parts.append(tokenize_in_memory(path, tokenizer, **options))
    documents = parts[0] if len(parts) == 1 else ConcatDocuments(parts)
    source = ", ".join(files)
    _check_vocab(documents, tokenizer, source)
    return documents, source


def _require_documents(documents: Documents, source: str, flag: str, text_key: str) -> None:
    """Raise DataError if the loose-JSON ``source`` (given with ``flag``) has no document."""
    if len(documents.sizes) == 0:
        raise DataError(f"{flag} {source} holds no documents: the file is empty or every line's {text_key!r} "
                        "is empty; give it at least one line such as {\"text\": \"...\"}")


def require_train_documents(bounds: list[int], source: str, split: str) -> None:
    """Raise DataError unless the train range ``[bounds[0], bounds[1])`` of ``source``'s
    ``bounds[-1]`` documents (split by ``--split split``) holds a document."""
    if bounds[1] <= bounds[0]:
        raise DataError(f"--split {split} gives the train split none of the {bounds[-1]} documents of "
                        f"{source}; give train a larger share, e.g. --split 949,50,1")


def _make(name: str, documents: Documents, first: int, stop: int, num_samples: int,
          config: DataConfig, cache_dir: str | os.PathLike | None, source: str) -> GPT2Dataset | None:
    if num_samples <= 0 or stop <= first:
        return None
    return GPT2Dataset(name, documents, first, stop, num_samples, config.seq_length, config.seed, cache_dir,
                       source=source)


def _sample_cache_dir(args: DataConfig) -> Path | None:
    """Where ``--lazy-loader`` runs keep loose JSON's sample indices (None: recomputed)."""
    if not args.lazy_loader:
        return None
    if args.cache_dir:
        return Path(args.cache_dir)
    return Path(resolve_corpus(args.train_data[0], args)).resolve().parent / "sample-index-cache"


def _from_loose_json(args: DataConfig, tokenizer: AbstractTokenizer,
                     num_samples: tuple[int, int, int]) -> tuple[Dataset | None, ...]:
    sample_cache = _sample_cache_dir(args)
    train_docs, source = _load_json_documents(args.train_data, args, tokenizer)
    _require_documents(train_docs, source, "--train-data", args.text_key)
    separate = [args.valid_data, args.test_data]
    if any(separate):
        _log("--valid-data/--test-data given: --train-data is used whole and --split is ignored")
        datasets = [_make("train", train_docs, 0, len(train_docs.sizes), num_samples[0], args,
                          sample_cache, source)]
        for name, paths, count in zip(SPLIT_NAMES[1:], separate, num_samples[1:]):
            if not paths:
                datasets.append(None)
                continue
            docs, docs_source = _load_json_documents(paths, args, tokenizer)
            _require_documents(docs, docs_source, f"--{name}-data", args.text_key)
            datasets.append(_make(name, docs, 0, len(docs.sizes), count, args, sample_cache, docs_source))
        return tuple(datasets)
    bounds = split_bounds(len(train_docs.sizes), parse_split(args.split))
    require_train_documents(bounds, source, args.split)
    return tuple(_make(name, train_docs, bounds[i], bounds[i + 1], num_samples[i], args, sample_cache,
                       source) for i, name in enumerate(SPLIT_NAMES))


def _open_indexed(prefix: str, tokenizer: AbstractTokenizer, split: str) -> tuple[MMapIndexedDataset, list[int]]:
    """The dataset of ``prefix`` and its split bounds; DataError if it or its train split is empty."""
    documents = MMapIndexedDataset(prefix)
    source = f"{prefix}.bin"
    if len(documents.sizes) == 0:
        raise DataError(f"--data-path {prefix}: {source} holds no documents; re-run "
                        "tools/preprocess_data.py on a corpus with text")
    _check_vocab(documents, tokenizer, source)
    bounds = split_bounds(len(documents.sizes), parse_split(split))
    require_train_documents(bounds, source, split)
    return documents, bounds


def _from_indexed(args: DataConfig, tokenizer: AbstractTokenizer,
                  num_samples: tuple[int, int, int]) -> tuple[Dataset | None, ...]:
    weighted = parse_data_path(args.data_path)
    weights = [weight for weight, _ in weighted]
    # Samples each dataset must serve per split (at least one, so a blend never lacks a part).
    counts = [[max(c, 1 if n > 0 else 0) for c in blended_counts(weights, n)] for n in num_samples]
    per_prefix = []
    for position, (_, prefix) in enumerate(weighted):
        documents, bounds = _open_indexed(prefix, tokenizer, args.split)
        cache_dir = Path(args.cache_dir or Path(prefix).resolve().parent)
        cache_dir = cache_dir / f"{Path(prefix).name}.index-cache"
        per_prefix.append([_make(name, documents, bounds[i], bounds[i + 1], counts[i][position],
                                 args, cache_dir, f"{prefix}.bin") for i, name in enumerate(SPLIT_NAMES)])
    if len(weighted) == 1:
        return tuple(per_prefix[0])
    result = []
    for i, name in enumerate(SPLIT_NAMES):
        parts = [splits[i] for splits in per_prefix]
        if num_samples[i] <= 0 or all(part is None for part in parts):
            result.append(None)
        elif any(part is None for part in parts):
            empty = [prefix for (_, prefix), part in zip(weighted, parts) if part is None]
            raise DataError(f"--split {args.split} gives the {name} split no documents of --data-path "
                            f"{', '.join(empty)} but some of the others; adjust --split so every dataset "
                            "has documents in it")
        else:
            result.append(BlendedDataset(parts, weights, num_samples[i]))
    return tuple(result)


def build_train_valid_test_datasets(
        args: DataConfig, tokenizer: AbstractTokenizer,
        train_valid_test_num_samples: tuple[int, int, int],
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Train/valid/test datasets of ``{"text": int64[seq_length + 1]}`` samples.

    Uses ``--data-path`` (indexed, possibly a weighted blend) if given, else ``--train-data``
    (loose JSON). A validation or test split that gets no documents or 0 requested samples is
    None; the train split is never None. Sample ``i`` does not depend on
    ``train_valid_test_num_samples`` (see ``GPT2Dataset``). Raises ``ConfigError`` subclasses
    (``DataError``) for bad data: a corpus, or a ``--valid-data``/``--test-data`` file, with no
    documents, a ``--split`` that gives the train split none, a split too small for one sample.
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
