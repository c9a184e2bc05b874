"""GPT-2 samples over a range of documents: fixed-length windows of an endless token stream.

The stream is epoch 0, epoch 1, ... where epoch ``e`` is every document of the range, in an
order shuffled with ``(seed, split, e)``, back to back (documents already end with
``<|endoftext|>``). Epoch ``e`` yields ``(tokens_per_epoch - 1) // seq_length`` samples of
``seq_length + 1`` tokens, overlapping by one token (input + shifted labels), taken in an order
also shuffled with ``(seed, split, e)``. Epochs are independent, so sample ``i`` depends only on
the data, ``seq_length``, ``seed`` and the split: never on how many samples a run asks for.
Raising ``--train-iters`` appends epochs and a resumed run sees exactly the same samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from megatron.data.cache import load_or_build, make_cache_dir
from megatron.data.documents import Documents
from megatron.data.errors import DataError

SPLIT_NAMES = ("train", "valid", "test")


class GPT2Dataset(torch.utils.data.Dataset):
    """``num_samples`` samples ``{"text": int64[seq_length + 1]}`` from documents ``[first, stop)``.

    With ``cache_dir`` each epoch's shuffles are saved there once (atomically, whichever rank
    comes first) and loaded by the others; without it they are recomputed (cheap for small data).
    A cache file that cannot be read, or holds arrays of the wrong shape or range, is rebuilt.
    Indices past ``num_samples`` are valid too (more epochs), which blending relies on.
    ``source`` names the data in errors. Raises DataError when the range holds fewer tokens than
    one sample, or ``cache_dir`` cannot be written.
    """

    def __init__(self, name: str, documents: Documents, first: int, stop: int, num_samples: int,
                 seq_length: int, seed: int, cache_dir: str | os.PathLike | None = None, *,
                 source: str = "") -> None:
        self.name, self.documents = name, documents
        self.doc_ids = np.arange(first, stop, dtype=np.int64)
        self.num_samples, self.seq_length, self.seed = num_samples, seq_length, seed
        self.doc_sizes = np.asarray(documents.sizes[first:stop], dtype=np.int64)
        tokens_per_epoch = int(self.doc_sizes.sum())
        self.samples_per_epoch = max(tokens_per_epoch - 1, 0) // seq_length
        if self.samples_per_epoch == 0:
            of = f" of {source}" if source else ""
            raise DataError(f"the {name} split{of} has {stop - first} documents with {tokens_per_epoch} "
                            f"tokens, fewer than one sample of --seq-length {seq_length} + 1; "
                            "lower --seq-length, give this split more data with --split, or add data")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for epoch in range(self.num_epochs):
            self._epoch(epoch)

    @property
    def num_epochs(self) -> int:
        """Epochs needed to serve ``num_samples``."""
        return -(-self.num_samples // self.samples_per_epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_epochs"] = {}  # workers reload from the cache or recompute
        return state

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if index < 0:
            raise IndexError(f"sample index {index} is negative")
        epoch, local = divmod(int(index), self.samples_per_epoch)
        doc_order, doc_starts, sample_order = self._epoch(epoch)
        start = int(sample_order[local]) * self.seq_length
        return {"text": self._read(doc_order, doc_starts, start, self.seq_length + 1)}

    def _read(self, doc_order: np.ndarray, doc_starts: np.ndarray, start: int,
              length: int) -> np.ndarray:
        """``length`` tokens of the epoch stream from position ``start``."""
        position = int(np.searchsorted(doc_starts, start, side="right")) - 1
        pieces, offset = [], start - int(doc_starts[position])
        while length > 0:
            doc = int(self.doc_ids[doc_order[position]])
            take = min(length, int(self.doc_sizes[doc_order[position]]) - offset)
            pieces.append(self.documents.get(doc, offset, take))
            length, offset, position = length - take, 0, position + 1
        return np.concatenate(pieces).astype(np.int64)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, stream start of each ordered document, sample order) of ``epoch``."""
        if epoch not in self._epochs:
            doc_order, sample_order = self._load_or_build_shuffles(epoch)
            doc_starts = np.concatenate([[0], np.cumsum(self.doc_sizes[doc_order])[:-1]])
            self._epochs[epoch] = (doc_order, doc_starts, sample_order)
        return self._epochs[epoch]

    def _shuffles(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The two permutations of ``epoch``, from the seed alone."""
        split = SPLIT_NAMES.index(self.name) if self.name in SPLIT_NAMES else 3
        rng = np.random.Generator(np.random.PCG64([self.seed, split, epoch]))
        index_dtype = np.int32 if len(self.doc_ids) < 2**31 else np.int64
        doc_order = rng.permutation(len(self.doc_ids)).astype(index_dtype)
        sample_order = rng.permutation(self.samples_per_epoch).astype(np.int64)
        return doc_order, sample_order

    def _load_or_build_shuffles(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache_dir is None:
            return self._shuffles(epoch)
        target = make_cache_dir(self.cache_dir) / f"{self._cache_key()}_epoch{epoch}.npz"

        def build(tmp: Path) -> None:
            doc_order, sample_order = self._shuffles(epoch)
            with open(tmp, "wb") as handle:
                np.savez(handle, doc_order=doc_order, sample_order=sample_order)

        return load_or_build(target, build, self._read_shuffles)

    def _read_shuffles(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """The two permutations cached in ``path``; ValueError unless they have this split's
        lengths and index range (a damaged or foreign file)."""
        with np.load(path, allow_pickle=False) as arrays:
            doc_order, sample_order = arrays["doc_order"], arrays["sample_order"]
        for array, size in ((doc_order, len(self.doc_ids)), (sample_order, self.samples_per_epoch)):
            if array.shape != (size,) or array.dtype.kind not in "iu" or \
                    (size and (int(array.min()) < 0 or int(array.max()) >= size)):
                raise ValueError(f"expected a permutation of {size} indices, found {array.dtype} {array.shape}")
        return doc_order, sample_order

    def _cache_key(self) -> str:
        """Name of this split's sample index: everything a sample depends on."""
        identity = json.dumps([self.name, int(self.doc_ids[0]), len(self.doc_ids),
                               int(self.doc_sizes.sum()), self.seq_length, self.seed])
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        return f"{self.name}_{self.seq_length}sl_{self.seed}s_{digest}"


class BlendedDataset(torch.utils.data.Dataset):
    """Interleaves datasets in proportion to ``weights`` (``--data-path 0.3 A 0.7 B``).

    Dataset ``d``'s ``k``-th sample is placed at time ``(k + 0.5) / weight[d]`` and samples are
    taken in time order (ties by dataset). That order does not depend on ``num_samples``, so,
    as for ``GPT2Dataset``, sample ``i`` stays the same when a run is extended.
    """

    def __init__(self, datasets: list[torch.utils.data.Dataset], weights: list[float],
                 num_samples: int) -> None:
        self.datasets = datasets
        self.num_samples = num_samples
        self.dataset_index, self.sample_index = blend_order(weights, num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.datasets[int(self.dataset_index[index])][int(self.sample_index[index])]


def blend_order(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of sample i, its index within that dataset) for the first ``num_samples``."""
    normalized = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    times, datasets, ranks = [], [], []
    for dataset, weight in enumerate(normalized):
        # Enough entries that every time up to num_samples + len(weights) is present.
        count = int(np.ceil((num_samples + len(weights)) * weight)) + 1
        rank = np.arange(count, dtype=np.int64)
        times.append((rank + 0.5) / weight)
        datasets.append(np.full(count, dataset, dtype=np.int64))
        ranks.append(rank)
    all_datasets = np.concatenate(datasets)
    order = np.lexsort((all_datasets, np.concatenate(times)))[:num_samples]
    return all_datasets[order], np.concatenate(ranks)[order]


def blended_counts(weights: list[float], num_samples: int) -> list[int]:
    """How many samples each dataset contributes to the first ``num_samples`` of a blend."""
    dataset_index, _ = blend_order(weights, num_samples)
    return np.bincount(dataset_index, minlength=len(weights)).tolist()
