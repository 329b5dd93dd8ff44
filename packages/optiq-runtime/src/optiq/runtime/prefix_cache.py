"""Prompt caches kept across requests, so a conversation or agent loop that resends
its history only prefills what is new.

An entry is the per-layer cache list of one token sequence (a prompt, or a prompt
plus its answer), keyed by the adapter that produced it (adapters change every
layer's keys and values). A lookup returns a private copy of the entry sharing the
longest prefix with the new prompt:

* Trimmable entries (every layer a KV cache: dense, MoE, mixed-precision KV) serve any
  common prefix: the copy is trimmed back to it.
* Entries with a recurrent layer (Gated DeltaNet's ``ArraysCache``, a full rotating
  window) cannot be trimmed; they serve only prompts that start with *all* of the
  entry's tokens. The engine therefore snapshots such models at the boundaries a
  follow-up request extends (see :mod:`optiq.runtime.engine`).

At least one prompt token is always left to prefill: the model must compute the
logits of the last prompt token to sample the first new one.

Bounded by bytes, least recently used entries first out. An entry is trimmed to what
it holds when stored (:func:`compact`: KV buffers cut to their used positions, arrays
copied out of any larger buffer such as a batch's), so the counted bytes are the sum of
the stored arrays' ``nbytes`` and that is what stays resident. Used from the engine thread
only (MLX state stays on one thread).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Iterator

import numpy as np

# Default budget: this fraction of the machine's memory.
DEFAULT_FRACTION = 1 / 8


def default_max_bytes() -> int:
    """``DEFAULT_FRACTION`` of the accelerator's memory (unified/host memory on CPU)."""
    total = 0
    try:
        import mlx.core as mx

        total = int(mx.device_info().get("memory_size", 0))
    except Exception:  # older MLX or no device info: fall back to host memory
        total = 0
    if total <= 0:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * DEFAULT_FRACTION)


def _arrays(tree: Any) -> Iterator[Any]:
    """Every ``mx.array`` in a cache ``state`` (nested tuples/lists; scalars skipped)."""
    import mlx.core as mx

    if isinstance(tree, mx.array):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for t in tree:
            yield from _arrays(t)


def cache_nbytes(cache: list) -> int:
    """Bytes of the arrays a cache list holds, as stored (what :func:`compact` leaves
    is exactly what is resident: no step slack, no views into larger buffers)."""
    return sum(int(a.nbytes) for c in cache for a in _arrays(c.state))


def _owned(x: Any, used: int | None = None) -> Any:
    """``x`` (its first ``used`` positions along axis 2) in a buffer of its own.

    ``mx.contiguous`` copies a view (a slice of a step-allocated buffer, or one row of
    a batch's state) and returns an array that already owns its buffer unchanged.
    """
    import mlx.core as mx

    if x is None:
        return None
    if used is not None and used < x.shape[2]:
        x = x[..., :used, :]
    return mx.contiguous(x)


def compact(cache: list) -> list:
    """Trim ``cache`` (in place) to what it holds, so its stored bytes are its real ones.

    KV caches allocate in steps of 256 positions and a cache extracted from a batch can
    be a view that keeps the whole batch's buffer alive; both would make the resident
    size of an entry larger than its arrays' ``nbytes`` (the soak saw ~2x). Here every
    KV buffer is cut to its used positions and every array is copied out of any larger
    buffer. A request that later extends a copy regrows it in steps, as mlx-lm does.
    Cache types not known here keep their arrays, each made to own its buffer.
    """
    from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, QuantizedKVCache

    try:
        from optiq.core.kv.cache import MixedKVCache
    except ImportError:  # pragma: no cover - optiq-core always ships it
        MixedKVCache = ()  # type: ignore[assignment,misc]

    for c in cache:
        if isinstance(c, CacheList):
            compact(list(c.caches))
        elif isinstance(c, KVCache) and c.keys is not None:
            c.keys, c.values = _owned(c.keys, c.offset), _owned(c.values, c.offset)
        elif isinstance(c, (QuantizedKVCache, MixedKVCache)) and c.keys is not None:
            c.keys = tuple(_owned(x, c.offset) for x in c.keys)
            c.values = tuple(_owned(x, c.offset) for x in c.values)
        elif isinstance(c, ArraysCache):
            c.cache = [_owned(x) for x in c.cache]
    return cache


def is_trimmable(cache: list) -> bool:
    return all(c.is_trimmable() for c in cache)


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0
    tokens_reused: int = 0
    entries: int = 0
    nbytes: int = 0
    max_bytes: int = 0
    evictions: int = 0


@dataclass
class _Entry:
    ident: tuple
    key: Hashable
    tokens: np.ndarray
    cache: list
    nbytes: int
    trimmable: bool


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """LRU store of prompt caches, bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.stats = PrefixCacheStats(max_bytes=self.max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self.stats.nbytes

    def fetch(self, key: Hashable, tokens: list[int]) -> tuple[list | None, int]:
        """A private copy of the cache of the longest reusable prefix of ``tokens`` and
        that prefix's length, or ``(None, 0)``. Never reuses all of ``tokens``."""
        self.stats.lookups += 1
        want = np.asarray(tokens, dtype=np.int64)
        limit = len(want) - 1
        best: _Entry | None = None
        best_len = 0
        for e in self._entries.values():
            if e.key != key:
                continue
            common = _common_prefix(e.tokens, want)
            if e.trimmable:
                usable = min(common, limit)
            else:
                usable = len(e.tokens) if common == len(e.tokens) <= limit else 0
            # prefer the longest; among equals the one needing the least trimming
            if usable > best_len or (
                usable == best_len and usable and best is not None and len(e.tokens) < len(best.tokens)
            ):
                best, best_len = e, usable
        if best is None or best_len == 0:
            return None, 0
        self._entries.move_to_end(best.ident)
        cache = copy.deepcopy(best.cache)
        extra = len(best.tokens) - best_len
        if extra:
            for c in cache:
                c.trim(extra)
        self.stats.hits += 1
        self.stats.tokens_reused += best_len
        return cache, best_len

    def insert(self, key: Hashable, tokens: list[int], cache: list) -> bool:
        """Keep ``cache`` (which must hold exactly ``tokens`` and is not used by anyone
        else afterwards). False when it is not worth keeping or does not fit."""
        if not tokens or not cache:
            return False
        ident = self._id(key, tokens)
        arr = np.asarray(tokens, dtype=np.int64)
        trimmable = is_trimmable(cache)
        if trimmable:
            for e in self._entries.values():
                # a longer trimmable entry already serves every prefix of this one
                if (e.key == key and e.trimmable and len(e.tokens) >= len(arr)
                        and _common_prefix(e.tokens, arr) == len(arr)):
                    self._entries.move_to_end(e.ident)
                    return False
        import mlx.core as mx

        compact(cache)
        mx.eval([c.state for c in cache])
        nbytes = cache_nbytes(cache)
        if nbytes > self.max_bytes:
            return False
        self._drop(ident)
        if trimmable:
            # shorter trimmable prefixes of this entry are now redundant
            for ident2, e in list(self._entries.items()):
                if (e.key == key and e.trimmable and len(e.tokens) < len(arr)
                        and _common_prefix(e.tokens, arr) == len(e.tokens)):
                    self._drop(ident2)
        self._entries[ident] = _Entry(ident, key, arr, cache, nbytes, trimmable)
        self.stats.nbytes += nbytes
        while self.stats.nbytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)
        return ident in self._entries

    def clear(self) -> None:
        for ident in list(self._entries):
            self._drop(ident)
        self.stats.entries = 0

    def _drop(self, ident: tuple) -> None:
        e = self._entries.pop(ident, None)
        if e is not None:
            self.stats.nbytes -= e.nbytes
            self.stats.entries = len(self._entries)

    @staticmethod
    def _id(key: Hashable, tokens: list[int]) -> tuple:
        return (key, tuple(int(t) for t in tokens))
