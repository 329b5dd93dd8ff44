"""How K and V are stored: affine groups along head_dim, packed codes, fp16 scales/biases.

Keeping the storage rule in one place lets the cache, the sensitivity pass (which
simulates it) and the byte accounting agree exactly.
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import ConfigError

# What ``mx.quantize`` (affine) can store for a KV cache. 1-bit is technically
# accepted by MLX but destroys attention; 7-bit is not supported by MLX.
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)

# Scales and biases are stored in fp16 whatever the compute dtype (fp32 on CPU), so
# the bytes per token of a config do not depend on the device it runs on.
SCALE_DTYPE = mx.float16
SCALE_BITS = 16

QTensor = tuple[mx.array, mx.array, mx.array]  # packed codes (uint32), scales, biases


def bits_per_element(bits: int, group_size: int) -> float:
    """Stored bits per K or V element: the code plus its share of the group's scale and bias."""
    return bits + 2 * SCALE_BITS / group_size


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ConfigError(
            f"{what} {bits!r} cannot be stored by the KV cache: supported widths are "
            f"{', '.join(map(str, SUPPORTED_BITS))}"
        )
    return bits


def check_group_size(group_size: int, head_dims: list[int] | tuple[int, ...] = ()) -> int:
    """Raise unless ``group_size`` is supported and divides every head dimension."""
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ConfigError(
            f"KV group size {group_size} is not supported: use one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )
    bad = sorted({d for d in head_dims if d % group_size})
    if bad:
        fits = [g for g in SUPPORTED_GROUP_SIZES if all(d % g == 0 for d in head_dims)]
        hint = f" (e.g. --group-size {max(fits)})" if fits else ""
        raise ConfigError(
            f"KV group size {group_size} does not divide the model's head_dim {bad[0]}: "
            f"choose a group size that divides it{hint}"
        )
    return group_size


def quantize(x: mx.array, bits: int, group_size: int) -> QTensor:
    """Quantize the last axis of ``x`` in groups; scales and biases come out in fp16.

    The input is rounded to fp16 first (what an fp16 model's KV cache holds anyway), so
    ``mx.quantize`` emits fp16 scales directly and the codes are computed against them.
    """
    if x.dtype != SCALE_DTYPE:
        x = x.astype(SCALE_DTYPE)
    return mx.quantize(x, group_size=group_size, bits=bits)


def dequantize(q: QTensor, bits: int, group_size: int, dtype: mx.Dtype) -> mx.array:
    """Inverse of :func:`quantize`, computed in (and returned as) ``dtype``."""
    w, scales, biases = q
    return mx.dequantize(
        w, scales.astype(dtype), biases.astype(dtype), group_size=group_size, bits=bits
    )


def fake_quantize(x: mx.array, bits: int, group_size: int) -> mx.array:
    """What the cache returns for ``x`` after storing it: quantize then dequantize."""
    return dequantize(quantize(x, bits, group_size), bits, group_size, x.dtype)
