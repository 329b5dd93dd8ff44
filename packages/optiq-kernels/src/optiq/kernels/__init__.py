"""Optional CPU kernels for OptiQ, built as an MLX C++ extension.

MLX's CPU backend has no fused dequantize-matmul: decode attention over a 4-bit KV
cache has to turn every code into fp32 with single-threaded elementwise ops before
BLAS sees it, and MLX's CPU ``exp`` costs ~20 ns per element. :func:`quantized_decode_attention`
reads the packed codes directly, in one pass, split over a few threads.

``optiq.core`` uses these kernels when they import and falls back to pure MLX when they
do not (another platform, no compiler at install time, or an MLX release other than
the one they were built against — checked here, since the extension links MLX's C++
library).
"""

from __future__ import annotations

import mlx.core as mx

from . import _ext

__all__ = ["BUILT_AGAINST_MLX", "quantized_decode_attention", "threads"]

BUILT_AGAINST_MLX: str = _ext.MLX_VERSION

if mx.__version__.split(".dev")[0] != BUILT_AGAINST_MLX:
    raise ImportError(
        f"optiq-kernels was built against MLX {BUILT_AGAINST_MLX} but MLX {mx.__version__} is installed: "
        "rebuild it (pip install --force-reinstall --no-deps --no-binary optiq-kernels optiq-kernels)"
    )

threads = _ext.threads


def quantized_decode_attention(
    q: mx.array,
    keys: tuple[mx.array, mx.array, mx.array],
    values: tuple[mx.array, mx.array, mx.array],
    *,
    k_bits: int,
    v_bits: int,
    group_size: int,
    mask: mx.array | None = None,
) -> mx.array:
    """``softmax(q @ K.T + mask) @ V`` with K and V given as packed ``mx.quantize`` triples.

    ``q`` is [B, H_kv, rows, D], already scaled (fold GQA query heads into rows);
    ``keys``/``values`` are (codes, scales, biases) shaped [B, H_kv, L, *] with a
    contiguous last axis (slices of a larger cache buffer are fine); ``mask`` is
    additive and broadcastable to [B, H_kv, rows, L]. CPU only; returns fp32.
    """
    return _ext.quantized_decode_attention(
        q, *keys, *values, mask, k_bits=k_bits, v_bits=v_bits, group_size=group_size
    )
