"""MLX's affine quantization format for weights: bit packing, sizes, group-size fitting.

A quantized weight is stored as packed unsigned codes ``q`` plus one ``scale`` and one
``bias`` per group of ``group_size`` consecutive input weights (in the model dtype), and
represents ``w = scale * q + bias``. Any (scale, bias, q) triple is valid, so better
rounding than MLX's own min/max quantizer still loads with stock ``mlx_lm.load``.
The valid widths and group sizes are in :mod:`optiq.core.affine` (shared with the KV cache).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..affine import SUPPORTED_GROUP_SIZES

DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def fitting_group_size(in_dim: int, preferred: int) -> int | None:
    """``preferred`` if it divides ``in_dim``, else the largest smaller valid one, else None."""
    for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True):
        if g <= preferred and in_dim % g == 0:
            return g
    return None


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def round_to_dtype(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """Round fp32 values to what ``dtype`` can store (so codes are chosen for the stored scales)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == mx.float32:
        return x
    if dtype == mx.float16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype == mx.bfloat16:  # round to nearest even on the top 16 bits (as MLX does)
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32)
    return np.array(mx.array(x).astype(dtype).astype(mx.float32))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes [..., n] into MLX's uint32 layout (LSB-first bit stream)."""
    codes = codes.astype(np.uint64)
    *lead, n = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole uint32 words")
    flat = codes.reshape(-1, n)
    words = np.zeros((flat.shape[0], n * bits // 32), dtype=np.uint64)
    if 32 % bits == 0:
        per = 32 // bits
        grouped = flat.reshape(flat.shape[0], -1, per)
        shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
        words = np.bitwise_or.reduce(grouped << shifts, axis=-1)
    else:  # 3, 5, 6 bits: codes straddle word boundaries
        pos = np.arange(n, dtype=np.uint64) * np.uint64(bits)
        for k in range(bits):
            bit = (flat >> np.uint64(k)) & np.uint64(1)
            p = pos + np.uint64(k)
            idx = (p // np.uint64(32)).astype(np.int64)
            contrib = bit << (p % np.uint64(32))
            # distinct codes write distinct bits, so adding equals or-ing
            np.add.at(words, (slice(None), idx), contrib)
    return words.astype(np.uint32).reshape(*lead, n * bits // 32)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack` (used by tests and by reading quantized models)."""
    *lead, nw = packed.shape
    flat = packed.reshape(-1, nw).astype(np.uint64)
    pos = np.arange(n, dtype=np.uint64) * np.uint64(bits)
    out = np.zeros((flat.shape[0], n), dtype=np.uint64)
    for k in range(bits):
        p = pos + np.uint64(k)
        idx = (p // np.uint64(32)).astype(np.int64)
        bit = (flat[:, idx] >> (p % np.uint64(32))) & np.uint64(1)
        out |= bit << np.uint64(k)
    return out.astype(np.uint8).reshape(*lead, n)


def leaf_bits_cost(n_weights: int, bits: int, group_size: int, scale_bits: int) -> int:
    """Stored bits of a quantized weight: codes + one scale and one bias per group."""
    return n_weights * bits + (n_weights // group_size) * 2 * scale_bits


def dequantize(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """fp32 weights from codes [..., n] and per-group scales/biases [..., n/g]."""
    s = np.repeat(scales, group_size, axis=-1)
    b = np.repeat(biases, group_size, axis=-1)
    return (codes.astype(np.float32) * s + b).astype(np.float32)
