"""MLX's affine quantization format: valid settings, bit packing, sizes.

A quantized weight is stored as packed unsigned codes ``q`` plus one ``scale`` and one
``bias`` per group of ``group_size`` consecutive input weights (in the model dtype), and
represents ``w = scale * q + bias``. Any (scale, bias, q) triple is valid, so better
rounding than MLX's own min/max quantizer still loads with stock ``mlx_lm.load``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..errors import ConfigError

# What MLX's affine mode accepts (1-bit is accepted by MLX but useless for LLM weights).
VALID_BITS = (2, 3, 4, 5, 6, 8)
VALID_GROUP_SIZES = (32, 64, 128)

DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def parse_bits(spec: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Parse ``"4,8"`` (or a list) into sorted unique bit widths; raise on invalid ones."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"--candidate-bits must be comma-separated integers, got '{spec}'"
            ) from None
    else:
        values = [int(b) for b in spec]
    if not values:
        raise ConfigError("no candidate bit widths given")
    bad = sorted({b for b in values if b not in VALID_BITS})
    if bad:
        raise ConfigError(
            f"unsupported candidate bits {bad}: MLX affine quantization takes "
            f"{', '.join(map(str, VALID_BITS))} bits"
        )
    return tuple(sorted(set(values)))


def check_group_size(group_size: int) -> int:
    if group_size not in VALID_GROUP_SIZES:
        raise ConfigError(
            f"unsupported group size {group_size}: MLX affine quantization takes "
            f"{', '.join(map(str, VALID_GROUP_SIZES))}"
        )
    return group_size


def fitting_group_size(in_dim: int, preferred: int) -> int | None:
    """``preferred`` if it divides ``in_dim``, else the largest smaller valid one, else None."""
    for g in sorted(VALID_GROUP_SIZES, reverse=True):
        if g <= preferred and in_dim % g == 0:
            return g
    return None


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes [..., n] into MLX's uint32 layout (LSB-first bit stream)."""
    *lead, n = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole uint32 words")
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, n)
    if bits == 8:
        words = flat.view("<u4")
    else:
        # each code's bits, least significant first, as one bit stream per row
        stream = np.unpackbits(flat[..., None], axis=-1, count=bits, bitorder="little")
        words = np.packbits(stream.reshape(flat.shape[0], n * bits), axis=-1, bitorder="little").view("<u4")
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
