"""Key/value cache for incremental decoding: each new token costs one position of attention work.

Shapes: b = batch rows, np = attention heads on this rank, hn = head size. A cache belongs to one
model-parallel rank (it holds that rank's heads); every rank of the group keeps its own.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """One attention layer's keys and values so far, ``(b, np, length, hn)``.

    They live in buffers of ``capacity`` positions, grown by doubling, so appending one position
    copies one position (a ``torch.cat`` per step would copy the whole history every step).
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.length = 0
        self._keys: torch.Tensor | None = None  # (b, np, capacity, hn)
        self._values: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, :, :self.length]

    def _reserve(self, like: torch.Tensor, total: int) -> None:
        """Make room for ``total`` positions of tensors shaped and typed like ``like``."""
        if self._keys is not None and total <= self._keys.size(2):
            return
        capacity = max(total, self.capacity, 2 * (0 if self._keys is None else self._keys.size(2)))
        b, heads, _, head_size = like.shape
        keys = like.new_empty(b, heads, capacity, head_size)
        values = like.new_empty(b, heads, capacity, head_size)
        if self._keys is not None and self._values is not None:
            keys[:, :, :self.length] = self._keys[:, :, :self.length]
            values[:, :, :self.length] = self._values[:, :, :self.length]
        self._keys, self._values = keys, values

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key``/``value`` ``(b, np, new, hn)`` after the cached positions; return all
        keys and values so far, ``(b, np, length + new, hn)`` (views of the buffers)."""
        if self._keys is not None and key.size(0) != self._keys.size(0):
            raise ValueError(f"the cache holds {self._keys.size(0)} rows but {key.size(0)} arrived: "
                             "feed the batch the cache was filled with (or keep_rows first)")
        end = self.length + key.size(2)
        self._reserve(key, end)
        assert self._keys is not None and self._values is not None
        self._keys[:, :, self.length:end] = key
        self._values[:, :, self.length:end] = value
        self.length = end
        return self._keys[:, :, :end], self._values[:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (1-D indices), in that order."""
        if self._keys is not None and self._values is not None:
            self._keys = self._keys.index_select(0, rows)
            self._values = self._values.index_select(0, rows)


class KVCache:
    """The key/value caches of every layer of a model, and the number of positions filled.

    Pass it to ``GPT2Model.forward(..., kv_cache=cache)`` (it is filled in place); the next call
    continues at position ``cache.length``.
    """

    def __init__(self, layers: list[LayerKVCache]) -> None:
        self.layers = layers

    @classmethod
    def empty(cls, num_layers: int, capacity: int = 0) -> KVCache:
        """An empty cache for ``num_layers`` layers; ``capacity`` positions are reserved on the
        first write (the cache grows past it if needed)."""
        return cls([LayerKVCache(capacity) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        """Positions filled (between forwards every layer holds the same number)."""
        return self.layers[0].length if self.layers else 0

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (1-D indices) in every layer, e.g. to drop finished rows."""
        for layer in self.layers:
            layer.keep_rows(rows)
