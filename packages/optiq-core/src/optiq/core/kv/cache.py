"""A KV cache that stores keys and values quantized at their own bit widths.

mlx-lm's ``QuantizedKVCache`` has one ``bits`` for K and V and cannot merge, extend or
filter, so it cannot join ``BatchGenerator`` batches. :class:`MixedKVCache` (one
stream) and :class:`BatchMixedKVCache` (a batch, left-padded like ``BatchKVCache``)
fill both gaps. They follow mlx-lm's cache protocol exactly, so ``generate_step``,
``stream_generate``, ``BatchGenerator`` and prompt-cache files work with them.

``update_and_fetch`` returns lazily dequantized keys and values, which any mlx-lm
attention accepts. When :func:`optiq.core.kv.attention.install_attention` has patched
the model's attention, decode steps instead read the packed codes directly with
``quantized_matmul``. Once that patched attention has handled a cache (proof that this
layer's attention goes through it), the cache stops building the unused dequantization
graph for decode steps: it hands out placeholders, saving ~0.1 ms of Python per layer
and step.

With ``rotation="hadamard"`` (the default) keys and values are stored rotated
(:func:`optiq.core.kv.quant.rotate`); everything the cache hands out is un-rotated, and
the patched attention works in the rotated space (see ``cache.rotation``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, create_attention_mask, dynamic_roll

from .. import mlx_lm_seam
from ..affine import check_bits, check_group_size
from ..errors import ConfigError
from . import quant
from .quant import QTensor

# Query rows up to which the patched attention reads packed codes (decode steps).
PACKED_MAX_ROWS = 4
# Bumped when the attention patch is removed: caches then stop trusting it.
_PATCH_EPOCH = [0]


def _tmap(fn, *qs: QTensor) -> QTensor:
    return tuple(fn(*parts) for parts in zip(*qs))  # type: ignore[return-value]


def _zeros_like_q(q: QTensor, length: int, batch: int | None = None) -> QTensor:
    """Empty storage with ``length`` positions, shaped like ``q`` on every other axis."""
    return tuple(
        mx.zeros(((batch if batch is not None else x.shape[0]), x.shape[1], length, x.shape[3]), x.dtype)
        for x in q
    )  # type: ignore[return-value]


class _MixedBase(mlx_lm_seam.base_cache_class()):
    """Shared bits of the single-stream and batch caches."""

    step = 256

    def _init_format(self, k_bits: int, v_bits: int, group_size: int, rotation: str = "hadamard") -> None:
        self.k_bits = check_bits(k_bits, "k_bits")
        self.v_bits = check_bits(v_bits, "v_bits")
        self.group_size = check_group_size(group_size)
        self.rotation = quant.check_rotation(rotation)  # how the stored K/V are rotated
        self.keys: QTensor | None = None
        self.values: QTensor | None = None
        self.dtype_name = "float32"  # compute dtype of the keys/values handed in
        self._packed_epoch = -1  # == _PATCH_EPOCH[0] once the patched attention read this cache

    def mark_packed_reader(self) -> None:
        """Called by the patched attention when it reads this cache's packed codes."""
        self._packed_epoch = _PATCH_EPOCH[0]

    # Stored by name: mx.Dtype cannot be deep-copied, and BatchGenerator deep-copies caches.
    @property
    def dtype(self) -> mx.Dtype:
        return getattr(mx, self.dtype_name)

    @dtype.setter
    def dtype(self, value: mx.Dtype) -> None:
        self.dtype_name = str(value).split(".")[-1]

    @property
    def format(self) -> tuple[int, int, int, str]:
        """(k_bits, v_bits, group_size, rotation): caches batch together only if equal."""
        return (self.k_bits, self.v_bits, self.group_size, self.rotation)

    def _store(self, start: int, keys: mx.array, values: mx.array) -> None:
        """Quantize and write ``keys``/``values`` at positions ``start:start+N``."""
        n = keys.shape[2]
        self.dtype = keys.dtype
        qk = quant.quantize(keys, self.k_bits, self.group_size, self.rotation)
        qv = quant.quantize(values, self.v_bits, self.group_size, self.rotation)
        if self.keys is None or start + n > self.keys[0].shape[2]:
            self.keys = self._grown(self.keys, start, n, qk)
            self.values = self._grown(self.values, start, n, qv)
        for dst, src in ((self.keys, qk), (self.values, qv)):
            for d, s in zip(dst, src):
                d[..., start : start + n, :] = s

    def _grown(self, q: QTensor | None, used: int, n: int, like: QTensor) -> QTensor:
        """Storage with ``used`` positions of ``q`` kept and room for ``n`` more (step-sized)."""
        extra = _zeros_like_q(like, (self.step + n - 1) // self.step * self.step)
        if q is None:
            return extra
        if used % self.step != 0:
            q = _tmap(lambda x: x[..., :used, :], q)
        return _tmap(lambda a, b: mx.concatenate([a, b], axis=2), q, extra)

    def _fetch(self, prev: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Keys/values to attend to after storing ``keys``/``values`` at ``prev``.

        Earlier positions are read back quantized (lazily dequantized). A multi-token
        call (prefill) attends to its own keys/values at full precision, as mlx-lm does
        for the chunk it quantizes after: the stored cache is the same, the prompt's
        hidden states are closer to full precision. Single tokens read everything quantized.
        """
        n = keys.shape[2]
        if n <= PACKED_MAX_ROWS and getattr(self, "_packed_epoch", -1) == _PATCH_EPOCH[0]:
            # The patched attention reads the packed codes: nothing here is used.
            shape_k = (*keys.shape[:2], prev + n, keys.shape[3])
            shape_v = (*values.shape[:2], prev + n, values.shape[3])
            zero = mx.array(0, dtype=keys.dtype)
            return mx.broadcast_to(zero, shape_k), mx.broadcast_to(zero, shape_v)
        if n > 1:
            if prev == 0:
                return keys, values
            pk, pv = self._dequantized(prev)
            return mx.concatenate([pk, keys], axis=2), mx.concatenate([pv, values], axis=2)
        return self._dequantized(prev + 1)

    def _dequantized(self, end: int) -> tuple[mx.array, mx.array]:
        k = _tmap(lambda x: x[..., :end, :], self.keys)
        v = _tmap(lambda x: x[..., :end, :], self.values)
        return (
            quant.dequantize(k, self.k_bits, self.group_size, self.dtype, self.rotation),
            quant.dequantize(v, self.v_bits, self.group_size, self.dtype, self.rotation),
        )

    def _format_state(self) -> tuple[int, int, int, str, str]:
        # Plain scalars/strings so mlx-lm's save_prompt_cache can serialize them.
        return (self.k_bits, self.v_bits, self.group_size, self.dtype_name, self.rotation)

    def _set_format_state(self, v, i: int) -> None:
        self.k_bits, self.v_bits, self.group_size = (int(x) for x in v[i : i + 3])
        self.dtype_name = str(v[i + 3])
        # Files saved before rotations existed carry no rotation: they stored K/V as is.
        self.rotation = quant.check_rotation(str(v[i + 4]) if len(v) > i + 4 else "none")
        if self.keys is not None:
            self.keys, self.values = tuple(self.keys), tuple(self.values)

    def quantized_state(self) -> tuple[QTensor, QTensor]:
        """Packed keys and values covering exactly the cached positions."""
        end = self._end()
        return (
            _tmap(lambda x: x[..., :end, :], self.keys),
            _tmap(lambda x: x[..., :end, :], self.values),
        )

    def _end(self) -> int:
        raise NotImplementedError

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (codes, scales and biases)."""
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))

    def stored_nbytes(self) -> int:
        """Bytes holding cached positions (allocation slack excluded)."""
        if self.keys is None:
            return 0
        end = self._end()
        return sum(x.nbytes // x.shape[2] * end for x in (*self.keys, *self.values))


class MixedKVCache(_MixedBase):
    """Single-stream KV cache with keys at ``k_bits`` and values at ``v_bits``."""

    def __init__(self, k_bits: int = 8, v_bits: int = 8, group_size: int = 64, rotation: str = "hadamard"):
        self._init_format(k_bits, v_bits, group_size, rotation)
        self.offset = 0

    def _end(self) -> int:
        return self.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self.offset
        self._store(prev, keys, values)
        self.offset += keys.shape[2]
        return self._fetch(prev, keys, values)

    def size(self) -> int:
        return self.offset

    @property
    def state(self):
        return (self.keys, self.values, self.offset, *self._format_state())

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v[:3]
        self._set_format_state(v, 3)

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @classmethod
    def from_kv_cache(
        cls, cache: KVCache, k_bits: int, v_bits: int, group_size: int, rotation: str = "hadamard"
    ) -> MixedKVCache:
        """Quantize the contents of a full-precision ``KVCache``."""
        out = cls(k_bits, v_bits, group_size, rotation)
        if cache.keys is not None and cache.offset > 0:
            k, v = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
            out.update_and_fetch(k, v)
        return out

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchMixedKVCache:
        return BatchMixedKVCache.merge(caches)


class BatchMixedKVCache(_MixedBase):
    """Batched, left-padded version of :class:`MixedKVCache` (mirrors ``BatchKVCache``)."""

    def __init__(
        self,
        left_padding: list[int],
        k_bits: int = 8,
        v_bits: int = 8,
        group_size: int = 64,
        rotation: str = "hadamard",
    ):
        self._init_format(k_bits, v_bits, group_size, rotation)
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self._idx = 0
        self._right_padding = None

    def _end(self) -> int:
        return self._idx

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev = self._idx
        self._store(prev, keys, values)
        self.offset = self.offset + keys.shape[2]
        self._idx += keys.shape[2]
        return self._fetch(prev, keys, values)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("Left padding can only be added to an empty BatchMixedKVCache")
            left_padding = mx.array(left_padding)
            self.left_padding += left_padding
            self.offset = self.offset - left_padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self):
        if self._right_padding is not None:
            padding = self._right_padding
            roll = lambda x: dynamic_roll(x, padding[:, None], axis=2)
            self.keys = _tmap(roll, self.keys)
            self.values = _tmap(roll, self.values)
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    @property
    def state(self):
        return (self.keys, self.values, self.offset, self.left_padding, self._idx, *self._format_state())

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v[:5]
        self._set_format_state(v, 5)
        self._right_padding = None

    def size(self) -> int:
        return self._idx

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def filter(self, batch_indices) -> None:
        """Keep only the given batch rows (in place), then drop shared left padding."""
        if self.keys is not None:
            self.keys = _tmap(lambda x: x[batch_indices], self.keys)
            self.values = _tmap(lambda x: x[batch_indices], self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        min_left_pad = min(self.left_padding.tolist()) if self.left_padding.size else 0
        if min_left_pad > 0:
            if self.keys is not None:
                self.keys = _tmap(lambda x: x[..., min_left_pad:, :], self.keys)
                self.values = _tmap(lambda x: x[..., min_left_pad:, :], self.values)
            self._idx -= min_left_pad
            self.left_padding -= min_left_pad

    def extend(self, other: BatchMixedKVCache) -> None:
        """Append the rows of ``other`` (in place), right-aligning both at the current index."""
        _check_same_format([self, other])
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        max_idx = max(self._idx, other._idx)
        ref_k = self.keys if self.keys is not None else other.keys
        ref_v = self.values if self.values is not None else other.values
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)

        def pad(c: BatchMixedKVCache):
            k, v = c.keys, c.values
            if k is None:
                bc = c.offset.shape[0]
                k = _zeros_like_q(ref_k, 0, batch=bc)
                v = _zeros_like_q(ref_v, 0, batch=bc)
            left = max_idx - c._idx
            right = max_size - k[0].shape[2] - left
            if right < 0:
                k = _tmap(lambda x: x[..., :right, :], k)
                v = _tmap(lambda x: x[..., :right, :], v)
                right = 0
            if left or right:
                widths = [(0, 0), (0, 0), (left, right), (0, 0)]
                k = _tmap(lambda x: mx.pad(x, widths), k)
                v = _tmap(lambda x: mx.pad(x, widths), v)
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, p1), (k2, v2, o2, p2) = pad(self), pad(other)
        cat = lambda a, b: mx.concatenate([a, b])
        self.keys, self.values = _tmap(cat, k1, k2), _tmap(cat, v1, v2)
        self.offset, self.left_padding = cat(o1, o2), cat(p1, p2)
        self._idx = max_idx

    def extract(self, idx: int) -> MixedKVCache:
        """Row ``idx`` as a single-stream cache (padding removed)."""
        cache = MixedKVCache(*self.format)
        cache.dtype = self.dtype
        padding = self.left_padding.tolist()[idx] if self.keys is not None else 0
        if self.keys is None or padding >= self._idx:
            return cache
        sl = lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx])
        cache.keys, cache.values = _tmap(sl, self.keys), _tmap(sl, self.values)
        cache.offset = cache.keys[0].shape[2]
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchMixedKVCache:
        """Batch single-stream caches (mixed or full-precision ``KVCache``) left-padded."""
        fmt = next((c for c in caches if isinstance(c, _MixedBase)), None)
        if fmt is None:
            raise ConfigError("BatchMixedKVCache.merge needs at least one MixedKVCache")
        caches = [
            c if isinstance(c, MixedKVCache)
            else MixedKVCache.from_kv_cache(c, *fmt.format) if isinstance(c, KVCache)
            else _raise_merge(c)
            for c in caches
        ]
        _check_same_format(caches)
        lengths = [c.size() for c in caches]
        max_length = max(lengths)
        out = cls([0] * len(caches), *fmt.format)
        out.dtype = next((c.dtype for c in caches if c.keys is not None), fmt.dtype)
        if max_length == 0:
            return out
        padding = [max_length - n for n in lengths]
        ref = next(c for c in caches if c.keys is not None)
        B = len(caches)
        keys = _zeros_like_q(ref.keys, max_length, batch=B)
        values = _zeros_like_q(ref.values, max_length, batch=B)
        for i, (p, c) in enumerate(zip(padding, caches)):
            if c.keys is None or c.offset == 0:
                continue
            for dst, src in ((keys, c.keys), (values, c.values)):
                for d, s in zip(dst, src):
                    d[i : i + 1, :, p : p + c.offset] = s[..., : c.offset, :]
        out.keys, out.values = keys, values
        out.left_padding = mx.array(padding)
        out.offset = mx.array(lengths)
        out._idx = max_length
        return out


def _raise_merge(c: Any):
    raise ConfigError(
        f"cannot batch a {type(c).__name__} with mixed-precision KV caches: build every "
        "request's cache with optiq.core.kv.make_kv_cache(model, kv_config)"
    )


def _check_same_format(caches: list[_MixedBase]) -> None:
    formats = {c.format for c in caches}
    if len(formats) > 1:
        raise ConfigError(
            "cannot batch KV caches of different formats (k_bits, v_bits, group_size, rotation): "
            f"{sorted(formats)}"
        )


# Stock ``mlx_lm.models.cache.load_prompt_cache`` resolves class names in its own module
# namespace: ours are put there for the life of the process (mlx_lm_seam.hold_cache_classes).
mlx_lm_seam.hold_cache_classes((MixedKVCache, BatchMixedKVCache))
