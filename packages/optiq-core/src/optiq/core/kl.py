"""KL divergence of a model's next-token distribution from a reference, in numpy fp32.

MLX's CPU ``exp`` is ~10x slower than numpy's vectorized one, and a KL over the vocabulary
is one ``exp`` per logit, so the per-token statistics are computed in numpy.
With reference logits ``r`` (``p = softmax(r)``) and a candidate's logits ``z``,
``KL(p || softmax(z)) = sum p (r - z) + logsumexp(z) - logsumexp(r)``; the reference
enters through ``p``, ``sum p r`` and ``logsumexp(r)``, computed once. (Written this way
the KL of identical logits is exactly zero, not fp32 noise.)
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


def to_numpy_logits(logits: mx.array) -> np.ndarray:
    x = logits.astype(mx.float32) if logits.dtype != mx.float32 else logits
    mx.eval(x)
    a = np.asarray(x)
    return a.reshape(-1, a.shape[-1])


# Rows per block of the vocabulary-wide temporaries: a few MB each (not a fresh
# tokens x vocabulary buffer per call, which costs page faults and peak memory).
ROW_BLOCK = 8


def _blocks(n: int):
    return (slice(a, min(n, a + ROW_BLOCK)) for a in range(0, n, ROW_BLOCK))


def logsumexp(z: np.ndarray) -> np.ndarray:
    out = np.empty(len(z), dtype=np.float64)
    for b in _blocks(len(z)):
        m = z[b].max(axis=-1, keepdims=True)
        e = z[b] - m
        np.exp(e, out=e)
        out[b] = m[:, 0] + np.log(e.sum(axis=-1))
    return out


@dataclass
class RefDist:
    """The reference distribution at some positions: probabilities and ``sum p log p``."""

    p: np.ndarray  # [N, V] fp32
    pr: np.ndarray  # [N] fp64: sum_v p_v r_v
    lse: np.ndarray  # [N] fp64: logsumexp(r)
    logp_target: np.ndarray | None = None  # [N] log p of the next token (perplexity)

    @classmethod
    def from_logits(cls, logits: mx.array | np.ndarray, targets: np.ndarray | None = None) -> "RefDist":
        z = logits if isinstance(logits, np.ndarray) else to_numpy_logits(logits)
        z = z.reshape(-1, z.shape[-1])
        lse = logsumexp(z)
        p = np.empty(z.shape, dtype=np.float32)
        for b in _blocks(len(z)):
            p[b] = (z[b] - lse[b, None]).astype(np.float32)
            np.exp(p[b], out=p[b])
        pr = np.einsum("ij,ij->i", p, z, dtype=np.float64)
        lt = None
        if targets is not None:
            lt = z[np.arange(len(z)), targets.reshape(-1)].astype(np.float64) - lse
        return cls(p=p, pr=pr, lse=lse, logp_target=lt)


def kl_per_token(ref: RefDist, logits: mx.array | np.ndarray) -> np.ndarray:
    """``KL(ref || softmax(logits))`` for each position, fp64 [N]."""
    z = logits if isinstance(logits, np.ndarray) else to_numpy_logits(logits)
    z = z.reshape(-1, z.shape[-1])
    pz = np.einsum("ij,ij->i", ref.p, z, dtype=np.float64)
    return np.maximum((ref.pr - pz) + (logsumexp(z) - ref.lse), 0.0)


def nll_per_token(logits: mx.array | np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` under ``softmax(logits)``, fp64 [N]."""
    z = logits if isinstance(logits, np.ndarray) else to_numpy_logits(logits)
    z = z.reshape(-1, z.shape[-1])
    t = targets.reshape(-1)
    return logsumexp(z) - z[np.arange(len(z)), t].astype(np.float64)


class _RunningLse:
    """``logsumexp`` of each position's logits and its target's logit, over vocabulary slices."""

    def __init__(self, n: int):
        self.m = np.full(n, -np.inf)
        self.s = np.zeros(n)
        self.target = np.zeros(n)

    def add(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fold in a slice ``z`` [N, S]; returns its ``exp(z - max)`` and the old sums' rescale."""
        m_new = np.maximum(self.m, z.max(axis=1))
        rescale = np.exp(self.m - m_new)
        e = np.exp(z - m_new[:, None].astype(np.float32))
        self.s = self.s * rescale + e.sum(axis=1)
        self.m = m_new
        return e, rescale

    @property
    def lse(self) -> np.ndarray:
        return self.m + np.log(self.s)


class SlicedScores:
    """Per-position NLL of a model (and ``KL(ref || model)`` with a reference) from logits
    given one vocabulary slice at a time: never a positions x vocabulary tensor.

    The reference enters through a running ``sum_v exp(r_v - m)(r_v - z_v)``, rescaled as
    the running max ``m`` grows, so ``KL = that / sum exp(r - m) + lse(z) - lse(r)``
    (the module's identity; identical logits still give exactly zero).
    """

    def __init__(self, targets: np.ndarray, with_ref: bool):
        self.targets = np.asarray(targets).reshape(-1)
        n = self.targets.size
        self.z = _RunningLse(n)
        self.r = _RunningLse(n) if with_ref else None
        self.a = np.zeros(n)

    def add(self, s0: int, z: np.ndarray, r: np.ndarray | None = None) -> None:
        """Logits of vocabulary entries ``s0 : s0 + z.shape[1]`` (model ``z``, reference ``r``)."""
        inside = np.nonzero((self.targets >= s0) & (self.targets < s0 + z.shape[1]))[0]
        cols = self.targets[inside] - s0
        self.z.target[inside] = z[inside, cols]
        self.z.add(z)
        if self.r is not None:
            self.r.target[inside] = r[inside, cols]
            e, rescale = self.r.add(r)
            self.a = self.a * rescale + np.einsum("ij,ij->i", e, r - z)

    def nll(self) -> np.ndarray:
        return self.z.lse - self.z.target

    def ref_nll(self) -> np.ndarray:
        return self.r.lse - self.r.target

    def kl(self) -> np.ndarray:
        return np.maximum(self.a / self.r.s + (self.z.lse - self.r.lse), 0.0)
