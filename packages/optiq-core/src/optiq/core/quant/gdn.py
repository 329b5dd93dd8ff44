"""Chunked Gated DeltaNet recurrence for fast CPU prefill and calibration.

mlx-lm's CPU path (``gated_delta_ops``) runs the recurrence one token at a time with
broadcasting element-wise ops, which dominates a calibration forward of a hybrid model
on the CPU. The same recurrence can be evaluated chunk by chunk with matmuls (the WY /
"chunkwise parallel" form of the delta rule): within a chunk of ``C`` tokens the state
updates form a unit lower-triangular system, solved once per chunk, and only ``T / C``
steps stay sequential. The result equals the step-by-step recurrence up to fp32
rounding (see tests/test_convert_gdn.py).

:func:`fast_gated_delta` swaps this implementation into the mlx-lm model modules for
the duration of a ``with`` block (through :mod:`optiq.core.mlx_lm_seam`), on the CPU only, and only for calls it supports
(no mask, scalar gates); everything else goes to the original function.
"""

from __future__ import annotations

import contextlib

import mlx.core as mx

from ..cpu import exp
from ..mlx_lm_seam import gated_delta_replaced

# 32 beats 64 on a 2-core CPU (forward 16 vs 26 ms, forward+backward 62 vs 83 ms for 8 x 256
# tokens, 4 heads of 32): less work in the per-chunk triangular solve and decay matrices.
CHUNK = 32
# Decays below e^-30 (~1e-13) are flushed to exact zeros. Trained gates are often tiny
# (median g ~ 2e-3 in the bundled model), so within a chunk most decay products sit in
# fp32's denormal range, where CPU arithmetic is ~100x slower: without the flush the
# recurrence ran 3x slower on real gates than on random ones. Every flushed term is
# dwarfed by the undecayed diagonal term (decay 1) of the same sum, far below fp32's eps.
LOG_FLUSH = -30.0
# Entries of the chunk's inverse below this (the diagonal is 1) are flushed likewise.
FLUSH_ENTRY = 1e-18


def _decay(log_ratio: mx.array) -> mx.array:
    """``exp(log_ratio)``, with negligible values (and -inf) as exact zeros, never denormals."""
    return mx.where(log_ratio < LOG_FLUSH, 0.0, exp(mx.maximum(log_ratio, LOG_FLUSH)))


@mx.custom_function
def _unit_lower_inverse(a: mx.array) -> mx.array:
    """``(I + a)^-1`` for strictly lower-triangular ``a`` [..., C, C] (forward substitution).

    MLX has no gradient for ``tri_inv``; the custom VJP (``dA = -T^T dT T^T``, kept
    strictly lower) makes the chunked recurrence differentiable.
    """
    eye = mx.eye(a.shape[-1], dtype=a.dtype)
    t = mx.linalg.tri_inv(eye + a, upper=False, stream=mx.cpu)
    # The substitution leaves denormal entries (products of many tiny decays): flushed,
    # or every matmul with ``t`` (forward and backward) slows down ~3x.
    return mx.where(mx.abs(t) < FLUSH_ENTRY, 0.0, t)


@_unit_lower_inverse.vjp
def _unit_lower_inverse_vjp(primals, cotangent, output):
    t = output
    grad = -(t.swapaxes(-1, -2) @ cotangent @ t.swapaxes(-1, -2))
    return (mx.tril(grad, k=-1),)


def chunked_gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    chunk: int = CHUNK,
) -> tuple[mx.array, mx.array]:
    """Gated delta rule over a whole sequence, chunk by chunk.

    Shapes as ``mlx_lm.models.gated_delta.gated_delta_ops`` with scalar gates:
    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g, beta [B, T, Hv]; state [B, Hv, Dv, Dk].
    Per head: ``S_t = g_t S_{t-1} + u_t k_t^T`` with ``u_t = beta_t (v_t - g_t S_{t-1} k_t)``
    and ``y_t = S_t q_t``.
    """
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    dtype = q.dtype
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    if (r := Hv // Hk) > 1:
        q = mx.repeat(q, r, -2)
        k = mx.repeat(k, r, -2)
    f32 = mx.float32
    # [B, H, T, D]
    q, k, v = (x.astype(f32).transpose(0, 2, 1, 3) for x in (q, k, v))
    g = g.astype(f32).transpose(0, 2, 1)
    beta = beta.astype(f32).transpose(0, 2, 1)
    C = min(chunk, T)
    pad = (-T) % C
    if pad:
        zp = [(0, 0), (0, 0), (0, pad), (0, 0)]
        q, k, v = (mx.pad(x, zp) for x in (q, k, v))
        g = mx.pad(g, [(0, 0), (0, 0), (0, pad)], constant_values=1.0)
        beta = mx.pad(beta, [(0, 0), (0, 0), (0, pad)])
    n = (T + pad) // C
    H = Hv
    q = q.reshape(B, H, n, C, Dk)
    k = k.reshape(B, H, n, C, Dk)
    v = v.reshape(B, H, n, C, Dv)
    beta = beta.reshape(B, H, n, C)
    logg = mx.log(mx.maximum(g, 1e-30)).reshape(B, H, n, C)
    cum = mx.cumsum(logg, axis=-1)  # log Gamma_t within the chunk
    gamma = _decay(cum)
    diff = cum[..., :, None] - cum[..., None, :]  # log(Gamma_t / Gamma_s)
    idx = mx.arange(C)
    incl = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    decay_incl = _decay(mx.where(incl, diff, -mx.inf))  # -inf above the diagonal: no inf*0 in the VJP
    decay_strict = mx.where(strict, decay_incl, 0.0)
    kk = k @ k.swapaxes(-1, -2)
    a = beta[..., None] * decay_strict * kk
    tinv = _unit_lower_inverse(a)
    w1 = tinv @ (beta[..., None] * v)  # [B,H,n,C,Dv]
    w2 = tinv @ ((beta * gamma)[..., None] * k)  # [B,H,n,C,Dk]
    qk = decay_incl * (q @ k.swapaxes(-1, -2))
    gq = gamma[..., None] * q
    last = gamma[..., -1]  # Gamma_C
    kd = _decay(cum[..., -1:] - cum)[..., None] * k  # (Gamma_C / Gamma_s) k_s
    s = state.astype(f32)
    ys = []
    for i in range(n):
        st = s.swapaxes(-1, -2)  # [B,H,Dk,Dv]
        u = w1[:, :, i] - w2[:, :, i] @ st
        ys.append(gq[:, :, i] @ st + qk[:, :, i] @ u)
        s = last[:, :, i, None, None] * s + u.swapaxes(-1, -2) @ kd[:, :, i]
    y = mx.concatenate(ys, axis=2) if n > 1 else ys[0]
    y = y[:, :, :T].transpose(0, 2, 1, 3).astype(dtype)
    return y, s


def _fast_update(original):
    """The chunked recurrence in place of ``original`` (a module's ``gated_delta_update``)."""
    from mlx_lm.models.gated_delta import compute_g, compute_lower_bound_g

    def gated_delta_update(
        q, k, v, a, b, A_log, dt_bias, state=None, mask=None, *,
        use_kernel=True, lower_bound=None, allow_neg_eigval=False,
    ):
        if mask is not None or mx.default_device() != mx.cpu:
            return original(
                q, k, v, a, b, A_log, dt_bias, state, mask,
                use_kernel=use_kernel, lower_bound=lower_bound, allow_neg_eigval=allow_neg_eigval,
            )
        beta = mx.sigmoid(b)
        if allow_neg_eigval:
            beta = beta * 2.0
        if lower_bound is None:
            g = compute_g(A_log, a, dt_bias)
        else:
            g = compute_lower_bound_g(A_log, a, dt_bias, lower_bound)
        if g.ndim != 3 or q.shape[1] < 2:
            from mlx_lm.models.gated_delta import gated_delta_ops

            if state is None:
                B, _, _, Dk = q.shape
                Hv, Dv = v.shape[-2:]
                state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
            return gated_delta_ops(q, k, v, g, beta, state, None)
        return chunked_gated_delta(q, k, v, g, beta, state)

    return gated_delta_update


def fast_gated_delta() -> contextlib.AbstractContextManager[int]:
    """Within the block, mlx-lm models imported so far use the chunked recurrence on CPU.

    Nests (the outermost block restores mlx-lm's function) and checks mlx-lm's signature
    first (:func:`optiq.core.mlx_lm_seam.gated_delta_replaced`).
    """
    return gated_delta_replaced(_fast_update)


__all__ = ["chunked_gated_delta", "fast_gated_delta"]
