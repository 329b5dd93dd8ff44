"""Attention that reads mixed-precision K/V codes directly, hooked into mlx-lm models.

mlx-lm attention modules call ``scaled_dot_product_attention(queries, keys, values,
cache=..., scale=..., mask=...)`` from ``mlx_lm.models.base``, imported into each model
module. :func:`install_attention` replaces that name in the modules of a given model
with :func:`mixed_scaled_dot_product_attention`, which handles our caches and hands
every other cache to the stock function unchanged, so the patch is safe for other
models in the process. The swap goes through :mod:`optiq.core.mlx_lm_seam`: held until
:func:`uninstall_attention` (a server keeps it for its lifetime), or for one block with
:func:`mixed_attention`.

For a few query rows (decode) it reads the packed codes directly, never materialising
a full-precision copy of the cache. On the CPU that is one fused, multi-threaded kernel
from ``optiq-kernels`` (:func:`optiq.core.cpu.kernels`) when it is installed; otherwise, and on a
GPU, ``mx.quantized_matmul`` (K at ``k_bits``, V at ``v_bits``; on the CPU, keys at
2/4/8 bits go through :func:`unpacked_scores`, which is faster there), ``mx.compile``-d
shapelessly so MLX fuses the code unpacking and one trace serves every context length.
For many rows (prefill) it uses the lazily dequantized keys/values the cache returned
and the fused SDPA, which is much faster there (MLX's quantized matmul is slow for many
rows on the CPU).
"""

from __future__ import annotations

import contextlib
import sys
from functools import lru_cache
from typing import Any, Iterator

import mlx.core as mx
from mlx import nn

from .. import mlx_lm_seam as seam
from ..cpu import exp, kernels, on_cpu
from . import cache as _cache
from . import quant
from .cache import PACKED_MAX_ROWS as QMM_MAX_QUERY_ROWS
from .cache import _MixedBase

_STOCK_SDPA = seam.stock_sdpa()


# Widths whose codes never straddle a byte in MLX's packing (element j of a uint32 word
# sits at bits [j*bits, (j+1)*bits), words little-endian).
BYTE_ALIGNED_BITS = (2, 4, 8)


def unpacked_scores(q: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """``q @ dequantize(w).T`` [.., R, L] without dequantizing: BLAS on the raw codes.

    On the CPU, MLX's ``quantized_matmul`` with ``transpose=True`` is compute-bound
    (~3x slower than an fp32 GEMV of the same matrix). Here the packed words are viewed
    as bytes and split into ``8 // bits`` code planes with shifts and masks; plane ``j``
    holds elements ``j, j + 8/bits, ...`` of every row, so it is multiplied with the
    matching strided slice of ``q``. Per group: ``score = s * (q_g . c_g) + b * sum(q_g)``.
    """
    per = 8 // bits
    by = w.view(mx.uint8)
    mask = (1 << bits) - 1
    planes = [by if bits == 8 else (by >> (j * bits)) & mask for j in range(per)]
    n_groups = scales.shape[-1]
    gw = group_size // per  # width of one group inside a plane
    dt = q.dtype
    s, b = scales.astype(dt), biases.astype(dt)
    out = None
    for g in range(n_groups):
        raw = None
        for j, c in enumerate(planes):
            qj = q[..., j::per][..., g * gw : (g + 1) * gw]
            cj = c if n_groups == 1 else c[..., g * gw : (g + 1) * gw]
            r = qj @ cj.astype(dt).swapaxes(-1, -2)
            raw = r if raw is None else raw + r
        qsum = q[..., g * group_size : (g + 1) * group_size].sum(-1, keepdims=True)
        term = raw * mx.expand_dims(s[..., g], -2) + qsum * mx.expand_dims(b[..., g], -2)
        out = term if out is None else out + term
    return out


def _plane_scores(bits: int, q_planes: list[mx.array], q_sum: mx.array, codes: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """:func:`unpacked_scores` for one group per row (``group_size == head_dim``).

    Takes the query already split into its strided planes (slicing cannot be compiled
    shapelessly), so the rest is shape-agnostic: scales/biases are ``[.., L, 1]``.
    """
    mask = (1 << bits) - 1
    dt = q_sum.dtype
    raw = None
    for j, qj in enumerate(q_planes):
        c = codes if bits == 8 else (codes >> (j * bits)) & mask
        r = qj @ c.astype(dt).swapaxes(-1, -2)
        raw = r if raw is None else raw + r
    return raw * scales.astype(dt).swapaxes(-1, -2) + q_sum * biases.astype(dt).swapaxes(-1, -2)


def _exp_values(bits: int, group_size: int, shifted: mx.array, w: mx.array, scales: mx.array, biases: mx.array):
    """``(exp(shifted) @ dequantize(values), exp(shifted))``: softmax-values before normalizing.

    The normalization (a reduction) stays outside: MLX 0.32's shapeless compile
    corrupts memory on reductions whose length changes between calls.
    """
    e = exp(shifted)
    return mx.quantized_matmul(e, w, scales, biases, transpose=False, group_size=group_size, bits=bits), e


def _softmax_values(bits: int, group_size: int, scores: mx.array, w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    """``softmax(scores) @ dequantize(values)``, normalized after the product (R x D, not R x L)."""
    # In the scores' dtype (fp32 on the CPU path; on a GPU the scales match it), sums in fp32.
    shifted = scores - scores.max(axis=-1, keepdims=True)
    out, e = _compiled_exp_values(bits, group_size)(shifted, w, scales, biases)
    f32 = mx.float32
    return (out.astype(f32) / e.astype(f32).sum(axis=-1, keepdims=True)).astype(scores.dtype)


# Decode runs these per layer and token with a context length that grows every step:
# compiled shapelessly (one trace per format, not per length), MLX fuses the unpacking
# into single kernels and skips most per-op dispatch overhead (~0.15 ms per layer/step).
@lru_cache(maxsize=None)
def _compiled_plane_scores(bits: int):
    return mx.compile(lambda *a: _plane_scores(bits, *a), shapeless=True)


@lru_cache(maxsize=None)
def _compiled_exp_values(bits: int, group_size: int):
    return mx.compile(lambda *a: _exp_values(bits, group_size, *a), shapeless=True)


def _key_scores(q: mx.array, kw: mx.array, ks: mx.array, kb: mx.array, bits: int, group_size: int) -> mx.array:
    """``q @ dequantize(keys).T`` by the fastest route for the device and format."""
    if not (on_cpu() and bits in BYTE_ALIGNED_BITS):
        return mx.quantized_matmul(q, kw, ks, kb, transpose=True, group_size=group_size, bits=bits)
    if ks.shape[-1] != 1:
        return unpacked_scores(q, kw, ks, kb, bits, group_size)
    per = 8 // bits
    q_planes = [q[..., j::per] for j in range(per)]
    return _compiled_plane_scores(bits)(q_planes, q.sum(-1, keepdims=True), kw.view(mx.uint8), ks, kb)


def _fold_mask(mask: Any, B: int, n_kv_heads: int, rep: int, N: int, L: int) -> mx.array:
    """An attention mask over [B, Hq, N, L] as [B or 1, H_kv, rep * N, L] (bool or additive)."""
    if isinstance(mask, str):
        mask = mx.arange(L - N, L)[:, None] >= mx.arange(L)[None]
    if mask.ndim == 4 and mask.shape[1] != 1:  # per query head -> (kv head, repeat)
        mask = mask.reshape(mask.shape[0], n_kv_heads, rep, N, L)
    else:  # [B or 1, 1, N, L] or [N, L]: the same for every head
        mask = mx.expand_dims(mask if mask.ndim == 4 else mask.reshape(1, 1, N, L), 2)
    mask = mx.broadcast_to(mask, (mask.shape[0], n_kv_heads, rep, N, L))
    return mask.reshape(mask.shape[0], n_kv_heads, rep * N, L)


def quantized_attention(
    queries: mx.array,
    cache: _MixedBase,
    scale: float,
    mask: Any,
) -> mx.array:
    """Attention of ``queries`` [B, Hq, N, D] over the packed K/V of ``cache``."""
    (kw, ks, kb), (vw, vs, vb) = cache.quantized_state()
    B, n_q_heads, N, D = queries.shape
    n_kv_heads = kw.shape[1]
    rep = n_q_heads // n_kv_heads
    L = kw.shape[2]
    dt = queries.dtype
    # Fold the query heads sharing one KV head into the row dimension: one matmul per KV head.
    q = (queries * scale).reshape(B, n_kv_heads, rep * N, D)
    if mask is not None:
        mask = _fold_mask(mask, B, n_kv_heads, rep, N, L)
    k = kernels() if on_cpu() else None
    if k is not None:  # rotates the query in and the output back itself
        if mask is not None and mask.dtype == mx.bool_:
            mask = mx.where(mask, 0.0, -mx.inf)
        return k.quantized_decode_attention(
            q, (kw, ks, kb), (vw, vs, vb), k_bits=cache.k_bits, v_bits=cache.v_bits,
            group_size=cache.group_size, mask=mask, hadamard=cache.rotation == "hadamard",
        ).astype(dt).reshape(B, n_q_heads, N, -1)
    q = quant.rotate(q, cache.rotation, cache.group_size)  # stored keys are rotated: q.k = qR.kR
    if dt != ks.dtype and not on_cpu():
        # MLX's CPU kernel takes fp16 scales with fp32 inputs (same result); elsewhere match dtypes.
        ks, kb, vs, vb = (x.astype(dt) for x in (ks, kb, vs, vb))
    scores = _key_scores(q, kw, ks, kb, cache.k_bits, cache.group_size)
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    out = _softmax_values(cache.v_bits, cache.group_size, scores, vw, vs, vb)
    out = quant.rotate(out, cache.rotation, cache.group_size)  # p.(VR) = (p.V)R: R undoes itself
    return out.reshape(B, n_q_heads, N, -1)


def mixed_scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """Drop-in for mlx-lm's ``scaled_dot_product_attention`` that understands our caches."""
    if (
        isinstance(cache, _MixedBase)
        and sinks is None
        and queries.shape[2] <= QMM_MAX_QUERY_ROWS
        and queries.shape[1] % cache.keys[0].shape[1] == 0
    ):
        cache.mark_packed_reader()
        return quantized_attention(queries, cache, scale, mask)
    return _STOCK_SDPA(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


def _attention_modules(model: nn.Module) -> set[Any]:
    """Python modules (files) of the model's layers that use mlx-lm's stock SDPA."""
    found = set()
    for _, m in model.named_modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is not None and getattr(mod, "scaled_dot_product_attention", None) in (
            _STOCK_SDPA,
            mixed_scaled_dot_product_attention,
        ):
            found.add(mod)
    return found


def install_attention(model: nn.Module) -> int:
    """Route the model's attention through :func:`mixed_scaled_dot_product_attention`
    until :func:`uninstall_attention`.

    Returns the number of model source modules patched. Idempotent. Models whose
    attention does not use mlx-lm's shared SDPA still work (through the dequantized
    keys/values the cache returns), only without the packed-code decode path.
    """
    return seam.hold_sdpa(_attention_modules(model), mixed_scaled_dot_product_attention)


def uninstall_attention(model: nn.Module) -> None:
    """Give back :func:`install_attention`'s patch (stock SDPA unless a block still holds it)."""
    _cache._PATCH_EPOCH[0] += 1  # existing caches must hand out real keys/values again
    seam.release_sdpa(_attention_modules(model))


@contextlib.contextmanager
def mixed_attention(model: nn.Module) -> Iterator[int]:
    """:func:`install_attention` for one ``with`` block (yields the module count)."""
    try:
        with seam.sdpa_replaced(_attention_modules(model), mixed_scaled_dot_product_attention) as n:
            yield n
    finally:
        _cache._PATCH_EPOCH[0] += 1  # as in uninstall_attention
