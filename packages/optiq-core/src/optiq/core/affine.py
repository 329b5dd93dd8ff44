"""Which bit widths and group sizes MLX's affine quantization takes, checked in one place.

Quantized weights (``optiq convert``) and the quantized KV cache (``optiq kv-cache``)
are both stored with ``mx.quantize``'s affine mode, so both commands accept, and
reject with the same words, the same ``--candidate-bits`` and ``--group-size``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from .errors import ConfigError

# 1-bit is accepted by MLX but destroys LLM weights and attention alike; MLX has no 7-bit.
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128)


def _listed(values: Sequence[int]) -> str:
    return ", ".join(map(str, values))


def check_bits(bits: int, what: str = "bit width") -> int:
    """``bits`` as an int if MLX's affine mode can store it; ``what`` names it in the error."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in SUPPORTED_BITS:
        raise ConfigError(
            f"{what} {bits!r} cannot be stored: MLX affine quantization takes "
            f"{_listed(SUPPORTED_BITS)} bits"
        )
    return int(bits)


def parse_bits(spec: str | Sequence[int]) -> tuple[int, ...]:
    """``"8,4,4"`` (or a sequence) -> ``(4, 8)``: sorted unique widths, each checked."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--candidate-bits must be comma-separated integers, got {spec!r}") from None
    else:
        values = list(spec)
    if not values:
        raise ConfigError(f"--candidate-bits is empty: give one or more of {_listed(SUPPORTED_BITS)}")
    checked = [check_bits(b, "candidate bit width") for b in values]  # the first bad one is named
    return tuple(sorted(set(checked)))


def check_group_size(group_size: int) -> int:
    """``group_size`` if MLX's affine mode takes it."""
    if isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ConfigError(
            f"group size {group_size!r} is not supported: MLX affine quantization takes "
            f"{_listed(SUPPORTED_GROUP_SIZES)}"
        )
    return group_size
