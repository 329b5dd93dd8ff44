"""The output head without vocabulary-sized tensors: its input, and a chunked cross-entropy.

At a 248,320-token vocabulary one token's fp32 logits are 1 MB and a dequantized tied
embedding is 1 GB, so a training step that materializes ``logits = h @ W^T`` (and keeps
it, and the fp32 weight, for the backward pass) spends most of its memory there.
:func:`chunked_cross_entropy` walks the vocabulary in slices instead, dequantizing one
slice of the head at a time, with an online log-sum-exp; the same pass accumulates the
softmax-weighted head rows, so the gradient at the head input comes out of it too:

    d ce_t / d h_t = sum_v p_tv W_v - W_{y_t}

and the backward pass is one multiply (no second pass over the vocabulary, nothing
vocabulary-sized kept). The head input itself is caught on its way into ``lm_head`` /
``embed_tokens.as_linear`` (:func:`head_input`), so the model's own forward runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn

from .architecture import decoder_layers
from .cpu import dequantize_rows, exp

# Temporaries of one vocabulary slice (its logits tile, their exponentials, its fp32 rows).
SLICE_BUDGET = 64 << 20


class Intercepted(Exception):
    """Raised inside a forward pass to hand one intermediate value out of it."""

    def __init__(self, value: mx.array):
        super().__init__("intercepted")
        self.value = value


@dataclass
class OutputHead:
    """The module producing logits: ``lm_head`` or the tied embedding (``as_linear``)."""

    path: str
    module: nn.Module
    tied: bool

    @property
    def vocab(self) -> int:
        return int(self.module["weight"].shape[0])

    def rows(self, start: int, stop: int, after: mx.array | None = None) -> mx.array:
        """Rows ``start:stop`` of the head's weight in fp32 (dequantized if packed),
        computed only once ``after`` is (so slices are not all scheduled at once)."""
        return dequantize_rows(self.module, slice(start, stop), mx.float32, after)

    def gather(self, ids: mx.array) -> mx.array:
        """The fp32 rows of token ``ids`` [N]."""
        return dequantize_rows(self.module, ids, mx.float32, ids)

    def bias(self) -> mx.array | None:
        return self.module["bias"].astype(mx.float32) if "bias" in self.module else None


def find_head(model: nn.Module) -> OutputHead | None:
    """``lm_head`` outside the decoder blocks, else the embedding it is tied to; None if neither."""
    inside = {id(m) for layer in decoder_layers(model) for _, m in layer.named_modules()}
    heads, embeddings = [], []
    for path, m in model.named_modules():
        if id(m) in inside:
            continue
        if path.split(".")[-1] == "lm_head" and isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            heads.append((path, m))
        elif isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            embeddings.append((path, m))
    if len(heads) == 1:
        return OutputHead(*heads[0], tied=False)
    if not heads and len(embeddings) == 1:
        return OutputHead(*embeddings[0], tied=True)
    return None


@contextlib.contextmanager
def catching_input(module: nn.Module, tied: bool) -> Iterator[None]:
    """Inside, calling the head ``module`` (``as_linear`` if ``tied``) raises
    :class:`Intercepted` with its input."""

    def stop(self_, x, *a, **kw):
        raise Intercepted(x)

    cls = type(module)
    attrs: dict[str, Any] = {"as_linear" if tied else "__call__": stop}
    module.__class__ = type(f"HeadIn{cls.__name__}", (cls,), attrs)
    try:
        yield
    finally:
        module.__class__ = cls


def head_input(model: nn.Module, head: OutputHead, *args, **kwargs) -> mx.array:
    """The head's input for ``model(*args, **kwargs)`` (differentiable): nothing after it runs."""
    with catching_input(head.module, head.tied):
        try:
            model(*args, **kwargs)
        except Intercepted as s:
            return s.value
    raise RuntimeError(f"{type(model).__name__}: the forward pass never reached its output head {head.path}")


def is_plain_head(model: nn.Module, head: OutputHead, tokens: mx.array, rows: int = 512) -> bool:
    """Whether the model's logits are exactly ``head_input @ W^T (+ b)`` (no scaling or
    soft-capping after the head), checked on ``tokens`` [1, few] and the first ``rows``
    vocabulary entries (never a vocabulary-sized weight)."""
    rows = min(rows, head.vocab)
    h = head_input(model, head, tokens).astype(mx.float32)
    ours = h @ head.rows(0, rows).T
    if (b := head.bias()) is not None:
        ours = ours + b[:rows]
    theirs = model(tokens)[..., :rows].astype(mx.float32)
    return bool(mx.allclose(ours, theirs, rtol=1e-3, atol=1e-3).item())


def _slices(n_tokens: int, head: OutputHead, budget: int) -> list[tuple[int, int]]:
    hidden = int(head.rows(0, 1).shape[-1])
    per_row = 4 * (3 * n_tokens + 2 * hidden)
    step = min(head.vocab, max(8, budget // per_row))
    return [(s, min(s + step, head.vocab)) for s in range(0, head.vocab, step)]


def _pass(h: mx.array, head: OutputHead, targets: mx.array, budget: int, grad: bool):
    """One pass over the vocabulary: cross-entropy per row, and (``grad``) its gradient."""
    n = h.shape[0]
    bias = head.bias()
    m = mx.full((n,), -float("inf"), dtype=mx.float32)
    s = mx.zeros((n,), dtype=mx.float32)
    acc = mx.zeros(h.shape, dtype=mx.float32) if grad else None
    for v0, v1 in _slices(n, head, budget):
        w = head.rows(v0, v1, after=m)  # after the previous slice: one slice alive at a time
        z = h @ w.T
        if bias is not None:
            z = z + bias[v0:v1]
        m_new = mx.maximum(m, z.max(axis=1))
        e = exp(z - m_new[:, None])
        r = exp(m - m_new)
        s = s * r + e.sum(axis=1)
        if grad:
            acc = acc * r[:, None] + e @ w
        m = m_new
    w_t = head.gather(targets)
    z_t = (h * w_t).sum(axis=1) + (bias[targets] if bias is not None else 0.0)
    ce = m + mx.log(s) - z_t
    return ce, (acc / s[:, None] - w_t if grad else None)


def chunked_cross_entropy(h: mx.array, head: OutputHead, targets: mx.array,
                          budget: int = SLICE_BUDGET) -> mx.array:
    """``cross_entropy(h @ W^T, targets)`` per row of ``h`` [N, H], in fp32, never holding
    more than one vocabulary slice (``budget`` bytes of temporaries).

    Differentiable in ``h`` only (the head's weights are frozen in every OptiQ use): the
    gradient is computed in the forward pass (see module doc), so ``mx.grad`` costs no
    second pass over the vocabulary.
    """
    h = h.astype(mx.float32)

    @mx.custom_function
    def ce(x):
        return _pass(x, head, targets, budget, grad=True)

    @ce.vjp
    def ce_vjp(primals, cotangents, outputs):
        return (cotangents[0][:, None] * outputs[1],)

    return ce(h)[0]


def cross_entropy_no_grad(h: mx.array, head: OutputHead, targets: mx.array,
                          budget: int = SLICE_BUDGET) -> mx.array:
    """:func:`chunked_cross_entropy` without its gradient (evaluation: half the work)."""
    return _pass(mx.stop_gradient(h.astype(mx.float32)), head, targets, budget, grad=False)[0]
