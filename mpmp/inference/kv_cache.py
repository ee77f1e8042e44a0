"""The KV cache: every attention layer's keys and values of the positions a micro-batch has seen.

A decode step feeds one new position per sequence; its attention needs the keys and values of all
earlier positions, which the cache keeps instead of recomputing them (the whole prefix's forward) at
every step. One KVCache holds, for one micro-batch of B sequences, the layers this rank owns (its
pipeline stage's blocks) and the heads it owns (H/tp under tensor parallelism: the cache is split
with the attention heads, no rank holds another's), preallocated to the longest context the
micro-batch reaches:

    bytes = 2 (k and v) · L_local · B · H_local · T · hd · itemsize
"""

import numpy

from mpmp.backend import xp
from mpmp.nn.layers import Block


class KVCache:
    """Keys and values [L_local, B, H_local, T, hd] and the number of positions filled (`length`).

    names: the blocks' names in the order they run (the layers' entries); capacity: T, the positions
    the micro-batch will feed in all (prompt plus generated tokens but the last, which is never fed).
    """

    def __init__(self, names, *, batch: int, heads: int, capacity: int, head_dim: int, dtype=numpy.float32):
        shape = (len(names), batch, heads, capacity, head_dim)
        self.k = xp().empty(shape, dtype=dtype)
        self.v = xp().empty(shape, dtype=dtype)
        self.names = list(names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.capacity = capacity
        self.length = 0  # positions filled: also the position of the next token fed

    @classmethod
    def for_chunk(cls, chunk, *, batch: int, capacity: int, heads: int, head_dim: int, dtype=numpy.float32):
        """A cache for the blocks of one pipeline chunk (none for a chunk of only the embedding or head)."""
        names = [m.name for m in chunk.modules if isinstance(m, Block)]
        return cls(names, batch=batch, heads=heads, capacity=capacity, head_dim=head_dim, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def layer(self, name: str) -> "LayerKV":
        """One block's entry, writing the new positions after the `length` already cached."""
        i = self._index[name]
        return LayerKV(self.k[i], self.v[i], self.length)

    def advance(self, t: int):
        """The chunk's forward over t new positions is done: they are now part of the context."""
        if self.length + t > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {t} positions > capacity {self.capacity}")
        self.length += t


class LayerKV:
    """One layer's keys and values [B, H_local, T, hd], with new positions written from `start`."""

    __slots__ = ("k", "v", "start")

    def __init__(self, k, v, start: int):
        self.k, self.v, self.start = k, v, start

    def append(self, k, v):
        """Store the new positions' k, v [B, H_local, t, hd]; return the keys and values of every
        position so far (views [B, H_local, start + t, hd], no copy)."""
        end = self.start + k.shape[-2]
        if end > self.k.shape[-2]:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.k.shape[-2]}")
        self.k[:, :, self.start : end] = k
        self.v[:, :, self.start : end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def kv_cache_bytes(*, layers: int, batch: int, heads: int, capacity: int, head_dim: int, itemsize: int = 4) -> int:
    """2 · L_local · B · H_local · T · hd · itemsize: what one micro-batch's cache holds on a rank."""
    return 2 * layers * batch * heads * capacity * head_dim * itemsize
