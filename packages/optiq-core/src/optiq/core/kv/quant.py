"""How K and V are stored: affine groups along head_dim, packed codes, fp16 scales/biases.

Keeping the storage rule in one place lets the cache, the sensitivity pass (which
simulates it) and the byte accounting agree exactly. The widths and group sizes it takes
are MLX's affine ones, checked by :mod:`optiq.core.affine` as for weights.

Optionally K and V are rotated before quantizing (``x @ R``, QuaRot-style): ``R`` is
block-diagonal with one normalized Hadamard block per quantization group, so a few
outlier channels are spread over their whole group instead of stretching its scale.
``R`` is symmetric and orthogonal (``R @ R = I``), so reading back is one more ``@ R``,
and attention can work in the rotated space (``q.k = (qR).(kR)``).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from ..affine import SUPPORTED_GROUP_SIZES, check_group_size
from ..errors import ConfigError

# Scales and biases are stored in fp16 whatever the compute dtype (fp32 on CPU), so
# the bytes per token of a config do not depend on the device it runs on.
SCALE_DTYPE = mx.float16
SCALE_BITS = 16

QTensor = tuple[mx.array, mx.array, mx.array]  # packed codes (uint32), scales, biases

# "none": store K/V as they are; "hadamard": rotate each group by a Hadamard block first.
ROTATIONS: tuple[str, ...] = ("none", "hadamard")


def bits_per_element(bits: int, group_size: int) -> float:
    """Stored bits per K or V element: the code plus its share of the group's scale and bias."""
    return bits + 2 * SCALE_BITS / group_size


def check_group_divides(group_size: int, head_dims: list[int] | tuple[int, ...]) -> int:
    """Raise unless ``group_size`` is supported and divides every head dimension
    (KV groups run along head_dim)."""
    check_group_size(group_size)
    bad = sorted({d for d in head_dims if d % group_size})
    if bad:
        fits = [g for g in SUPPORTED_GROUP_SIZES if all(d % g == 0 for d in head_dims)]
        hint = f" (e.g. --group-size {max(fits)})" if fits else ""
        raise ConfigError(
            f"KV group size {group_size} does not divide the model's head_dim {bad[0]}: "
            f"choose a group size that divides it{hint}"
        )
    return group_size


def check_rotation(rotation: str) -> str:
    if rotation not in ROTATIONS:
        raise ConfigError(
            f"KV rotation {rotation!r} is not supported: use one of {', '.join(ROTATIONS)}"
        )
    return rotation


@lru_cache(maxsize=None)
def hadamard(dim: int, block: int) -> mx.array:
    """``[dim, dim]`` fp32 block-diagonal matrix of normalized Sylvester Hadamard blocks.

    Symmetric and orthogonal, so it is its own inverse. ``block`` must be a power of 2
    dividing ``dim`` (every supported group size is; it must divide head_dim anyway).
    """
    if block < 1 or block & (block - 1) or dim % block:
        raise ValueError(f"Hadamard block {block} must be a power of 2 dividing {dim}")
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    r = np.kron(np.eye(dim // block), h / np.sqrt(block))
    return mx.array(r.astype(np.float32))


def rotate(x: mx.array, rotation: str, group_size: int) -> mx.array:
    """``x @ R`` on the last axis (``R`` is its own inverse, so this also un-rotates).

    Computed in fp32 and cast back to ``x``'s dtype: an fp16 matmul would add its own rounding.
    """
    if rotation == "none":
        return x
    r = hadamard(x.shape[-1], group_size)
    if x.dtype == mx.float32:
        return x @ r
    return (x.astype(mx.float32) @ r).astype(x.dtype)


def quantize(x: mx.array, bits: int, group_size: int, rotation: str = "none") -> QTensor:
    """Quantize the last axis of ``x`` in groups (after ``rotation``); fp16 scales and biases.

    The input is rounded to fp16 first (what an fp16 model's KV cache holds anyway), so
    ``mx.quantize`` emits fp16 scales directly and the codes are computed against them.
    """
    x = rotate(x, rotation, group_size)
    if x.dtype != SCALE_DTYPE:
        x = x.astype(SCALE_DTYPE)
    return mx.quantize(x, group_size=group_size, bits=bits)


def dequantize(q: QTensor, bits: int, group_size: int, dtype: mx.Dtype, rotation: str = "none") -> mx.array:
    """Inverse of :func:`quantize` (rotation undone), computed in (and returned as) ``dtype``."""
    w, scales, biases = q
    x = mx.dequantize(
        w, scales.astype(dtype), biases.astype(dtype), group_size=group_size, bits=bits
    )
    return rotate(x, rotation, group_size)


def fake_quantize(x: mx.array, bits: int, group_size: int, rotation: str = "none") -> mx.array:
    """What the cache returns for ``x`` after storing it: quantize then dequantize."""
    return dequantize(quantize(x, bits, group_size, rotation), bits, group_size, x.dtype, rotation)
