"""Per-request samplers and logits processors for mlx-lm's ``BatchGenerator``.

Requests with the same unseeded settings share one sampler object, so
``BatchGenerator`` samples them in one batched call; seeded requests get their own
sampler with a private PRNG key sequence (reproducible, independent of other traffic).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    categorical_sampling,
    make_logits_processors,
)

from .types import Sampling

Sampler = Callable[[mx.array], mx.array]

# Tokens the repetition/presence/frequency penalties look back over (prompt included).
PENALTY_CONTEXT = 64


def _filters(s: Sampling, vocab_size: int) -> list[Callable[[mx.array], mx.array]]:
    fs: list[Callable[[mx.array], mx.array]] = []
    if 0.0 < s.top_p < 1.0:
        fs.append(lambda x: apply_top_p(x, s.top_p))
    if s.min_p > 0.0:
        fs.append(lambda x: apply_min_p(x, s.min_p))
    if 0 < s.top_k < vocab_size:
        fs.append(lambda x: apply_top_k(x, s.top_k))
    return fs


@lru_cache(maxsize=256)
def _shared_sampler(s: Sampling, vocab_size: int) -> Sampler:
    filters = _filters(s, vocab_size)

    def sample(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return categorical_sampling(logprobs, s.temperature)

    return sample


def _seeded_sampler(s: Sampling, vocab_size: int) -> Sampler:
    filters = _filters(s, vocab_size)
    step = [0]

    def sample(logprobs: mx.array) -> mx.array:
        # A fresh key per step derived from (seed, step): no lazily growing key chain.
        key = mx.random.key(hash((s.seed, step[0])) & 0xFFFF_FFFF_FFFF_FFFF)
        step[0] += 1
        for f in filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * (1.0 / s.temperature), key=key)

    return sample


def make_sampler(s: Sampling, vocab_size: int) -> Sampler | None:
    """``None`` means greedy (BatchGenerator's batched fallback)."""
    if s.greedy:
        return None
    if s.seed is not None:
        return _seeded_sampler(s, vocab_size)
    return _shared_sampler(s, vocab_size)


def make_processors(s: Sampling) -> list:
    return make_logits_processors(
        repetition_penalty=s.repetition_penalty
        if s.repetition_penalty not in (None, 1.0)
        else None,
        repetition_context_size=PENALTY_CONTEXT,
        presence_penalty=s.presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=s.frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT,
    )
