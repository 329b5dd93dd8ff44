"""The KL shared by weight sensitivities, KV sensitivities and evaluation."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from optiq.core.kl import RefDist, kl_per_token, nll_per_token


def _log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def test_kl_matches_float64_definition():
    rng = np.random.default_rng(0)
    r = rng.normal(scale=3.0, size=(2, 5, 300)).astype(np.float32)
    z = r + rng.normal(scale=0.5, size=r.shape).astype(np.float32)
    lr, lz = _log_softmax64(r.reshape(-1, 300)), _log_softmax64(z.reshape(-1, 300))
    want = (np.exp(lr) * (lr - lz)).sum(-1)
    got = kl_per_token(RefDist.from_logits(mx.array(r)), mx.array(z))
    assert got.shape == (10,) and got.dtype == np.float64
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(got, kl_per_token(RefDist.from_logits(r), z))  # numpy and MLX inputs alike


def test_kl_of_identical_logits_is_exactly_zero():
    r = np.random.default_rng(1).normal(size=(7, 50)).astype(np.float32)
    assert np.array_equal(kl_per_token(RefDist.from_logits(r), r), np.zeros(7))


def test_nll_and_reference_log_prob_of_targets():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6, 40)).astype(np.float32)
    t = rng.integers(0, 40, size=6)
    want = -_log_softmax64(z)[np.arange(6), t]
    assert np.allclose(nll_per_token(z, t), want, rtol=1e-6)
    assert np.allclose(-RefDist.from_logits(z, t).logp_target, want, rtol=1e-6)
