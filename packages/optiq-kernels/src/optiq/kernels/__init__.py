"""Optional CPU kernels for OptiQ, built as an MLX C++ extension.

MLX's CPU backend has no fast fused dequantize-matmul for a few rows:

- decode attention over a 4-bit KV cache has to turn every code into fp32 with
  single-threaded elementwise ops before BLAS sees it, and MLX's CPU ``exp`` costs
  ~20 ns per element. :func:`quantized_decode_attention` reads the packed codes
  directly, in one pass, split over a few threads;
- its ``quantized_matmul`` runs ~1.3 G multiply-adds/s for one row, 3x slower than an
  fp32 GEMV of the same matrix. :func:`quantized_matmul` converts eight codes at a time
  in vector registers, over a few threads (~10x MLX's, ~3x the fp32 GEMV, 4-bit).

``optiq.core`` uses these kernels when they import and falls back to pure MLX when they
do not (another platform, no compiler at install time, or an MLX release other than
the one they were built against — checked here, since the extension links MLX's C++
library).
"""

from __future__ import annotations

import mlx.core as mx

from . import _ext

__all__ = ["BUILT_AGAINST_MLX", "gather_quantized_matmul", "quantized_decode_attention", "quantized_matmul", "threads"]

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
    hadamard: bool = False,
) -> mx.array:
    """``softmax(q @ K.T + mask) @ V`` with K and V given as packed ``mx.quantize`` triples.

    ``q`` is [B, H_kv, rows, D], already scaled (fold GQA query heads into rows);
    ``keys``/``values`` are (codes, scales, biases) shaped [B, H_kv, L, *] with a
    contiguous last axis (slices of a larger cache buffer are fine); ``mask`` is
    additive and broadcastable to [B, H_kv, rows, L]. ``hadamard``: K and V were stored
    as ``x @ R`` (``R`` one normalized Sylvester Hadamard block per group, its own
    inverse), so ``q`` is rotated in and the output back. CPU only; returns fp32.
    """
    return _ext.quantized_decode_attention(
        q, *keys, *values, mask, k_bits=k_bits, v_bits=v_bits, group_size=group_size, hadamard=hadamard
    )


def quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int
) -> mx.array:
    """``x @ dequantize(w, scales, biases).T`` for a few rows of ``x`` [rows, K].

    ``w`` [N, K * bits / 32] uint32, ``scales``/``biases`` [N, K / group_size]: what
    ``mx.quantize`` (affine) returns. Differentiable with respect to ``x``. CPU only;
    returns fp32 [rows, N].
    """
    return _ext.quantized_matmul(x, w, scales, biases, bits=bits, group_size=group_size)


def gather_quantized_matmul(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, indices: mx.array, *, bits: int, group_size: int
) -> mx.array:
    """``x[t] @ dequantize(w[indices[t]]).T`` for a pool of quantized experts (MoE decode).

    ``x`` [T, rows, K], ``indices`` [T] (one expert per block of rows), ``w`` [E, N,
    K * bits / 32] with ``scales``/``biases`` [E, N, K / group_size]. An index outside
    the pool gives NaNs. Differentiable with respect to ``x``. CPU only; returns fp32
    [T, rows, N].
    """
    return _ext.gather_quantized_matmul(x, w, scales, biases, indices, bits=bits, group_size=group_size)
