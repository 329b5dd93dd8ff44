"""Choosing codes, scales and biases inside MLX's affine format.

Three rounding methods, each measured by ``benchmarks/convert_quality.py``:

``rtn``
    MLX's own quantizer (``mx.quantize`` on the weight in the output dtype): per group,
    min/max range, round to nearest. This is what ``mlx_lm.convert`` writes.
``clip``
    Per group, search a shrunken range (clipping outliers often lowers the total error),
    then refine scale and bias by least squares given the codes (a few alternations).
    The error of each input column is weighted by the mean square of its calibration
    activation when known (activation-aware), else unweighted.
``gptq``
    Error-compensating rounding (GPTQ, Frantar et al. 2022) with the calibration
    Hessian ``H = E[x x^T]`` of the layer's inputs: columns are rounded one at a time
    and each rounding error is pushed onto the not-yet-rounded columns so that the
    layer *output* error ``||(W - Q) X||`` stays small. Group parameters come from the
    ``clip`` search on the partially updated weights.

Scales and biases are rounded to the output dtype (bf16 for a bf16 model) *before*
codes are chosen, so the dequantized weights computed here are exactly the weights a
stock ``mlx_lm.load`` of the written model uses.

Rows are independent given the Hessian, so several bit widths are quantized in one call
by stacking copies of the weight along the rows (``bits`` may be a per-row array).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from .formats import dequantize, unpack

ROUNDING_METHODS = ("rtn", "clip", "gptq")

# Range shrink factors tried by the clip search (1.0 = plain min/max): every one for
# GPTQ's group parameters; for ``clip`` rounding a coarse grid, then each group's best
# factor +- CLIP_REFINE (the same 0.05 steps over the same range in 7 passes instead of
# 10: the rounding of a multi-GB model is dominated by these passes; on Gaussian and
# t-distributed weights the error is within 0.03% of the full grid's).
CLIP_GRID = tuple(np.round(np.linspace(1.0, 0.55, 10), 3))
CLIP_COARSE = (1.0, 0.9, 0.8, 0.7, 0.6)
CLIP_REFINE = 0.05
LS_ITERS = 2
GPTQ_DAMP = 0.01


_numpy_blas_limited = False


def limit_numpy_blas_threads() -> None:
    """Run numpy's own OpenBLAS single-threaded (best effort).

    Rounding does many small numpy factorizations and matmuls between MLX calls; numpy's
    bundled OpenBLAS thread pool then fights MLX's (and the system OpenBLAS) threads for
    the same cores, making a 384x384 Cholesky ~50x slower than single-threaded.
    """
    global _numpy_blas_limited
    if _numpy_blas_limited:
        return
    _numpy_blas_limited = True
    import ctypes
    import glob
    import os

    libdir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for lib in glob.glob(os.path.join(libdir, "*openblas*.so*")):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn(ctypes.c_int(1))
                return


@dataclass
class Quantized:
    """Codes [..., n] (uint8), scales and biases [..., n / group_size] (fp32, dtype-exact)."""

    codes: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.scales, self.biases, self.group_size)


def _maxq(bits: int | np.ndarray, rows: int) -> np.ndarray:
    b = np.broadcast_to(np.asarray(bits, dtype=np.int64), (rows,))
    return ((1 << b) - 1).astype(np.float32)


def _codes(w, s, b, maxq):
    return np.clip(np.rint((w - b) / s), 0, maxq)


def _safe_scale(s: mx.array) -> mx.array:
    return mx.where(mx.abs(s) < 1e-8, mx.array(1e-8, mx.float32), s)


def _round_mx(x: mx.array, dtype: mx.Dtype) -> mx.array:
    """Round fp32 values to what ``dtype`` stores (so codes are chosen for the stored scales)."""
    return x if dtype == mx.float32 else x.astype(dtype).astype(mx.float32)


# Adding and subtracting 1.5 * 2^23 rounds an fp32 to the nearest integer, ties to even --
# exactly what ``mx.round`` does for |x| < 2^22, at a fraction of its CPU cost; larger
# values only arise outside the code range, and the clip that follows maps them the same.
_RINT = 12582912.0


def _codes_mx(w: mx.array, s: mx.array, b: mx.array, mq: mx.array) -> mx.array:
    return mx.clip(((w - b) / s + _RINT) - _RINT, 0, mq)


@mx.compile
def _group_error(w: mx.array, s: mx.array, b: mx.array, mq: mx.array) -> mx.array:
    """Each group's squared rounding error, in one fused pass (the search runs it 12 times)."""
    r = w - (_codes_mx(w, s, b, mq) * s + b)
    return (r * r).sum(-1, keepdims=True)


@mx.compile
def _weighted_group_error(w: mx.array, d: mx.array, s: mx.array, b: mx.array, mq: mx.array) -> mx.array:
    r = w - (_codes_mx(w, s, b, mq) * s + b)
    return (d * (r * r)).sum(-1, keepdims=True)


@mx.compile
def _ls_sums(w: mx.array, d: mx.array, s: mx.array, b: mx.array, mq: mx.array) -> tuple[mx.array, ...]:
    """Weighted sums for the least-squares (scale, bias) given the codes: q, q^2, q w."""
    q = _codes_mx(w, s, b, mq)
    dq = d * q
    return dq.sum(-1, keepdims=True), (dq * q).sum(-1, keepdims=True), (dq * w).sum(-1, keepdims=True)


@mx.compile
def _ls_sums_unweighted(w: mx.array, s: mx.array, b: mx.array, mq: mx.array) -> tuple[mx.array, ...]:
    """:func:`_ls_sums` with equal weights (the same values, without multiplying by ones)."""
    q = _codes_mx(w, s, b, mq)
    return q.sum(-1, keepdims=True), (q * q).sum(-1, keepdims=True), (q * w).sum(-1, keepdims=True)


def group_params(
    wg: np.ndarray,
    maxq: np.ndarray,
    d: np.ndarray | None,
    dtype: mx.Dtype,
    grid: tuple[float, ...] = CLIP_GRID,
    ls_iters: int = LS_ITERS,
) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, bias) per group for groups ``wg`` [R, G, g] under column weights ``d``.

    ``maxq`` is [R] (per-row code range), ``d`` broadcasts to [R, G, g] (None: equal).
    Returns scales and biases [R, G], already rounded to ``dtype`` (see :func:`clip_search`).
    """
    w = mx.array(np.asarray(wg, dtype=np.float32))
    mq = mx.array(np.asarray(maxq, dtype=np.float32))[:, None, None]
    dw = None if d is None else mx.broadcast_to(mx.array(np.asarray(d, dtype=np.float32)), w.shape)
    _, s, b = clip_search(w, mq, dw, dtype, grid, ls_iters)
    return np.array(s[..., 0]), np.array(b[..., 0])


def clip_search(
    w: mx.array,
    mq: mx.array,
    dw: mx.array | None,
    dtype: mx.Dtype,
    grid: tuple[float, ...] = CLIP_GRID,
    ls_iters: int = LS_ITERS,
    refine: float = 0.0,
) -> tuple[mx.array, mx.array, mx.array]:
    """The ``clip`` search on fp32 groups ``w`` [R, G, g] with code ranges ``mq`` [R, 1, 1]
    and column weights ``dw`` (None: equal): (error, scale, bias), each [R, G, 1].
    Shrink factors ``grid``, then (``refine`` > 0) each group's best factor +- ``refine``.

    The error is each group's (weighted) squared rounding error at the returned scale and
    bias, i.e. of the codes :func:`quantize_clip` writes. Runs in MLX with fused passes
    (numpy took minutes per billion weights); a group's sums run over its ``g`` weights
    in fp32 (codes and their squares are exact integers there), the 2x2 least-squares
    solve in fp64.
    """
    lo_mm, hi_mm = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    best: list[mx.array] = []  # error, scale, bias, shrink factor of each group's best

    def consider(s: mx.array, b: mx.array, a: mx.array) -> None:
        s = _safe_scale(_round_mx(s, dtype))
        b = _round_mx(b, dtype)
        err = _group_error(w, s, b, mq) if dw is None else _weighted_group_error(w, dw, s, b, mq)
        if not best:
            best[:] = [err, s, b, mx.broadcast_to(a, err.shape)]
        else:
            better = err < best[0]
            best[:] = [mx.where(better, new, old) for new, old in zip((err, s, b, a), best)]
        mx.eval(best)

    def shrink(a: mx.array) -> None:  # a == 1.0 is plain min/max; smaller values clip outliers
        lo, hi = lo_mm * a, hi_mm * a
        consider(mx.maximum(hi - lo, 1e-12) / mq, lo, a)

    for a in grid:
        shrink(mx.array(a, mx.float32))
    if refine:  # each group's best factor +- refine
        for step in (-refine, refine):
            shrink(mx.clip(best[3] + step, min(grid) - refine, 1.0))
    # least-squares refinement of (scale, bias) given the codes
    if dw is None:
        sd = mx.full(lo_mm.shape, float(w.shape[-1]), mx.float64)
        sw = w.sum(-1, keepdims=True).astype(mx.float64)
    else:
        sd = dw.sum(-1, keepdims=True).astype(mx.float64)
        sw = (dw * w).sum(-1, keepdims=True).astype(mx.float64)
    for _ in range(ls_iters):
        sums = _ls_sums_unweighted(w, best[1], best[2], mq) if dw is None else _ls_sums(w, dw, best[1], best[2], mq)
        sq, sqq, sqw = (x.astype(mx.float64) for x in sums)
        den = sd * sqq - sq * sq
        ok = mx.abs(den) > 1e-20
        s = mx.where(ok, (sd * sqw - sq * sw) / mx.where(ok, den, 1.0), best[1])
        b = mx.where(ok, (sw - s * sq) / mx.maximum(sd, 1e-20), best[2])
        consider(s.astype(mx.float32), b.astype(mx.float32), best[3])
    return best[0], best[1], best[2]


def clip_errors(
    w: mx.array, bits_list: tuple[int, ...], group_size: int, dtype: mx.Dtype,
) -> tuple[dict[int, float], float]:
    """Squared error of unweighted ``clip`` rounding of ``w`` [rows, n] at each width, and
    ``||w||^2``: what :func:`quantize_weight` (``clip``, no Hessian) would lose, without
    forming codes. Chunk by chunk along the rows (see ``source.chunks_along_first_axis``)."""
    from .source import chunks_along_first_axis

    rows, n = w.shape
    G = n // group_size
    err = dict.fromkeys(bits_list, 0.0)
    norm = 0.0
    for sl in chunks_along_first_axis(tuple(w.shape), len(bits_list)):
        wc = w[sl].astype(mx.float32).reshape(-1, G, group_size)
        norm += float((wc * wc).sum(-1).astype(mx.float64).sum())
        R = wc.shape[0]
        stacked = mx.concatenate([wc] * len(bits_list)) if len(bits_list) > 1 else wc
        mq = mx.array(np.repeat(_maxq(np.asarray(bits_list), len(bits_list)), R))[:, None, None]
        e, _, _ = clip_search(stacked, mq, None, dtype, CLIP_COARSE, refine=CLIP_REFINE)
        per = e.reshape(len(bits_list), -1).astype(mx.float64).sum(-1)
        for b, v in zip(bits_list, np.array(per).tolist()):
            err[b] += v
    return err, norm


def quantize_clip(
    w: np.ndarray | mx.array,
    bits: int | np.ndarray,
    group_size: int,
    dtype: mx.Dtype,
    d: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Range search + least squares per group. ``w`` [R, n]; ``d`` [n] column weights."""
    R, n = w.shape
    G = n // group_size
    wg = (w if isinstance(w, mx.array) else mx.array(np.asarray(w))).astype(mx.float32).reshape(R, G, group_size)
    mq = mx.array(_maxq(bits, R))[:, None, None]
    dw = None if d is None else mx.broadcast_to(mx.array(d.reshape(1, G, group_size).astype(np.float32)), wg.shape)
    _, s, b = clip_search(wg, mq, dw, dtype, CLIP_COARSE, refine=CLIP_REFINE)
    codes = _codes_mx(wg, s, b, mq).astype(mx.uint8)
    return np.array(codes).reshape(R, n), np.array(s[..., 0]), np.array(b[..., 0])


def _gptq_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of H^-1 (the form GPTQ's sequential update needs)."""
    h = h.astype(np.float64).copy()
    n = h.shape[0]
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    mean = np.mean(np.diag(h))
    for attempt in range(6):
        try:
            hd = h + np.eye(n) * (damp * (10**attempt)) * mean
            L = np.linalg.cholesky(hd)
            linv = np.linalg.inv(L)
            hinv = linv.T @ linv
            return np.linalg.cholesky(hinv).T.astype(np.float32)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Hessian is not positive definite even after damping")


def quantize_gptq(
    w: np.ndarray,
    h: np.ndarray,
    bits: int | np.ndarray,
    group_size: int,
    dtype: mx.Dtype,
    damp: float = GPTQ_DAMP,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ with groups aligned to blocks. ``w`` [R, n], ``h`` [n, n] (E[x x^T])."""
    R, n = w.shape
    g = group_size
    W = w.astype(np.float32).copy()
    dead = np.diag(h) <= 0
    W[:, dead] = 0.0
    U = _gptq_inverse(h, damp)
    d_all = np.maximum(np.diag(h), 0).astype(np.float32)
    d_all = np.where(d_all > 0, d_all, d_all[d_all > 0].mean() if (d_all > 0).any() else 1.0)
    maxq = _maxq(bits, R)
    codes = np.zeros((R, n), dtype=np.uint8)
    G = n // g
    scales = np.zeros((R, G), dtype=np.float32)
    biases = np.zeros((R, G), dtype=np.float32)
    for gi, i1 in enumerate(range(0, n, g)):
        i2 = i1 + g
        # the group's columns as contiguous rows: the sweep below reads and updates one
        # column at a time, which strided column slices made the slowest part of a convert
        W1 = np.ascontiguousarray(W[:, i1:i2].T)  # [g, R]
        s, b = group_params(W1.T[:, None, :], maxq, d_all[None, None, i1:i2], dtype)
        s, b = s[:, 0], b[:, 0]
        scales[:, gi], biases[:, gi] = s, b
        Err1 = np.zeros((g, R), dtype=np.float32)
        codes1 = np.zeros((g, R), dtype=np.uint8)
        U1 = U[i1:i2, i1:i2]
        for i in range(g):
            col = W1[i]
            q = _codes(col, s, b, maxq)
            codes1[i] = q
            err = (col - (q * s + b)) / U1[i, i]
            W1[i:] -= U1[i, i:][:, None] * err[None, :]
            Err1[i] = err
        codes[:, i1:i2] = codes1.T
        if i2 < n:
            W[:, i2:] -= np.ascontiguousarray(Err1.T) @ U[i1:i2, i2:]
    return codes, scales, biases


def quantize_rtn(w: np.ndarray, bits: int, group_size: int, dtype: mx.Dtype):
    """MLX's own quantizer on the weight cast to the output dtype (what mlx_lm.convert does)."""
    wq, s, b = mx.quantize(mx.array(w).astype(dtype), group_size=group_size, bits=bits)
    codes = unpack(np.array(wq), bits, w.shape[-1])
    return (
        codes,
        np.array(s.astype(mx.float32)),
        np.array(b.astype(mx.float32)),
    )


def quantize_weight(
    w: np.ndarray,
    bits_list: list[int] | tuple[int, ...],
    group_size: int,
    dtype: mx.Dtype,
    method: str = "gptq",
    hessian: np.ndarray | None = None,
) -> dict[int, Quantized]:
    """Quantize a 2D [out, in] or 3D [experts, out, in] weight at several bit widths.

    ``hessian``: [in, in] (2D weights) or [experts, in, in] (expert pools), E[x x^T] of
    the layer input over calibration tokens; experts that saw no token fall back to
    ``clip``. Without a Hessian, ``gptq`` degrades to unweighted ``clip``.
    """
    if method not in ROUNDING_METHODS:
        raise ValueError(f"unknown rounding method {method!r}")
    limit_numpy_blas_threads()
    w = np.asarray(w, dtype=np.float32)
    bits_list = list(bits_list)
    if method == "rtn":
        return {
            b: Quantized(*quantize_rtn(w, b, group_size, dtype), bits=b, group_size=group_size)
            for b in bits_list
        }
    if w.ndim == 3:
        per = [
            quantize_weight(
                w[e], bits_list, group_size, dtype, method,
                None if hessian is None else hessian[e],
            )
            for e in range(w.shape[0])
        ]
        return {
            b: Quantized(
                np.stack([p[b].codes for p in per]),
                np.stack([p[b].scales for p in per]),
                np.stack([p[b].biases for p in per]),
                bits=b,
                group_size=group_size,
            )
            for b in bits_list
        }
    return dict(zip(bits_list, quantize_rows([(w, b) for b in bits_list], group_size, dtype, method, hessian)))


def quantize_rows(
    blocks: list[tuple[np.ndarray, int]],
    group_size: int,
    dtype: mx.Dtype,
    method: str = "gptq",
    hessian: np.ndarray | None = None,
) -> list[Quantized]:
    """Quantize several 2D weights that share one input (and so one Hessian) in one pass.

    ``blocks`` are ``(weight [out_i, in], bits_i)`` pairs -- e.g. q/k/v projections at
    every candidate width. GPTQ treats rows independently given ``H``, so stacking them
    costs one column sweep instead of one per block.
    """
    if method not in ROUNDING_METHODS:
        raise ValueError(f"unknown rounding method {method!r}")
    limit_numpy_blas_threads()
    if method == "rtn":
        return [
            Quantized(*quantize_rtn(np.asarray(w, np.float32), b, group_size, dtype), bits=b, group_size=group_size)
            for w, b in blocks
        ]
    stacked = np.concatenate([np.asarray(w, np.float32) for w, _ in blocks], axis=0)
    row_bits = np.concatenate([np.full(w.shape[0], b) for w, b in blocks])
    usable_h = hessian is not None and np.trace(hessian) > 0
    if method == "gptq" and usable_h:
        codes, s, b_ = quantize_gptq(stacked, hessian, row_bits, group_size, dtype)
    else:
        d = np.diag(hessian).astype(np.float32) if usable_h else None
        if d is not None and not (d > 0).all():
            d = np.where(d > 0, d, max(d.max(), 1e-12) * 1e-3)
        codes, s, b_ = quantize_clip(stacked, row_bits, group_size, dtype, d)
    out, start = [], 0
    for w, bits in blocks:
        sl = slice(start, start + w.shape[0])
        out.append(Quantized(codes[sl], s[sl], b_[sl], bits=bits, group_size=group_size))
        start += w.shape[0]
    return out


def quantize_chunks(
    w: np.ndarray,
    bits_list: list[int] | tuple[int, ...],
    group_size: int,
    dtype: mx.Dtype,
    method: str,
) -> Iterator[tuple[np.ndarray, dict[int, Quantized]]]:
    """:func:`quantize_weight` without a Hessian, chunk by chunk along axis 0: yields
    ``(chunk of w, {bits: Quantized of that chunk})``.

    Rows (and experts) round independently without a Hessian, so the chunks together
    equal one call's result, with temporaries bounded by the chunk
    (see ``source.chunks_along_first_axis``).
    """
    from .source import chunks_along_first_axis

    for sl in chunks_along_first_axis(w.shape, len(bits_list)):
        yield w[sl], quantize_weight(w[sl], bits_list, group_size, dtype, method, None)


def quantize_in_chunks(
    w: np.ndarray,
    bits_list: list[int] | tuple[int, ...],
    group_size: int,
    dtype: mx.Dtype,
    method: str,
) -> dict[int, Quantized]:
    """The whole of :func:`quantize_chunks`, concatenated: equals one :func:`quantize_weight` call."""
    parts: dict[int, list[Quantized]] = {b: [] for b in bits_list}
    for _, qs in quantize_chunks(w, bits_list, group_size, dtype, method):
        for b, q in qs.items():
            parts[b].append(q)
    return {
        b: Quantized(
            np.concatenate([q.codes for q in qs]),
            np.concatenate([q.scales for q in qs]),
            np.concatenate([q.biases for q in qs]),
            bits=b,
            group_size=group_size,
        )
        for b, qs in parts.items()
    }
