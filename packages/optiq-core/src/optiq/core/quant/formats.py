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


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes [..., n] into MLX's uint32 layout (LSB-first bit stream).

    ``k`` consecutive codes fill whole bytes (``k * bits`` is a multiple of 8): they are
    summed into one little-endian uint64 at their bit offsets, whose low bytes are then
    exactly the stream's bytes -- a few vectorized passes instead of one per bit.
    """
    *lead, n = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole uint32 words")
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, n)
    if bits == 8:
        words = flat.view("<u4")
    else:
        k = 8 // np.gcd(bits, 8)  # codes per whole-byte run
        runs = flat.reshape(flat.shape[0], n // k, k)
        acc = runs[..., 0].astype("<u8")
        for i in range(1, k):
            acc |= runs[..., i].astype("<u8") << np.uint64(bits * i)
        nbytes = k * bits // 8
        stream = acc.view(np.uint8).reshape(*acc.shape, 8)[..., :nbytes]
        words = np.ascontiguousarray(stream).reshape(flat.shape[0], -1).view("<u4")
    return words.astype(np.uint32).reshape(*lead, n * bits // 32)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack` (used by tests and by reading quantized models)."""
    *lead, nw = packed.shape
    raw = np.ascontiguousarray(packed, dtype="<u4").reshape(-1, nw).view(np.uint8)
    if bits == 8:
        return raw[:, :n].reshape(*lead, n).copy()
    stream = np.unpackbits(raw, axis=-1, count=n * bits, bitorder="little").reshape(-1, n, bits)
    codes = np.packbits(stream, axis=-1, bitorder="little")[..., 0]
    return codes.reshape(*lead, n)


def leaf_bits_cost(n_weights: int, bits: int, group_size: int, scale_bits: int) -> int:
    """Stored bits of a quantized weight: codes + one scale and one bias per group."""
    return n_weights * bits + (n_weights // group_size) * 2 * scale_bits


def dequantize(codes: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """fp32 weights from codes [..., n] and per-group scales/biases [..., n/g]."""
    s = np.repeat(scales, group_size, axis=-1)
    b = np.repeat(biases, group_size, axis=-1)
    return (codes.astype(np.float32) * s + b).astype(np.float32)
