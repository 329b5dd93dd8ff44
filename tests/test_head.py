"""Chunked cross-entropy over the output head: same loss and gradient as full logits."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from optiq.core.head import chunked_cross_entropy, cross_entropy_no_grad, find_head, head_input, is_plain_head
from optiq.core.cpu import prepare_for_cpu
from optiq.core.model_io import bundled_quant_path, load_model
from optiq.core.tiny_models import build_model, tiny_config


@pytest.fixture(scope="module", params=["float", "quant", "tied-quant"])
def model(request, bundled_model_dir):
    if request.param == "tied-quant":  # the tied embedding as the head, 4-bit packed
        m = build_model(tiny_config(tie_word_embeddings=True))
        nn.quantize(m, group_size=64, bits=4)
        return prepare_for_cpu(m, force=True)
    return load_model(bundled_model_dir if request.param == "float" else bundled_quant_path()).model


def _full_loss(model, tokens, targets):
    logits = model(tokens).astype(mx.float32)
    return nn.losses.cross_entropy(logits, targets).sum()


def test_chunked_matches_full_logits(model, request):
    head = find_head(model)
    assert head is not None and head.tied == request.node.callspec.params["model"].startswith("tied")
    tokens = mx.array([[1, 20, 300, 1500, 50, 6, 70, 800, 9, 10]])
    targets = mx.array([[20, 300, 1500, 50, 6, 70, 800, 9, 10, 11]])
    assert is_plain_head(model, head, tokens[:, :4])

    def chunked(x):
        h = head_input(model, head, tokens)
        h = h + x  # a differentiable input to compare gradients at the head's input
        return chunked_cross_entropy(h.reshape(-1, h.shape[-1]), head, targets.reshape(-1), budget=1 << 16).sum()

    def full(x):
        h = head_input(model, head, tokens) + x
        w = head.rows(0, head.vocab)
        return nn.losses.cross_entropy(h @ w.T, targets).sum()

    x0 = mx.zeros((1, 10, head.rows(0, 1).shape[-1]))
    l1, g1 = mx.value_and_grad(chunked)(x0)
    l2, g2 = mx.value_and_grad(full)(x0)
    assert abs(l1.item() - _full_loss(model, tokens, targets).item()) < 1e-3 * abs(l2.item())
    assert abs(l1.item() - l2.item()) < 1e-4 * abs(l2.item())
    assert mx.abs(g2).max().item() > 0
    assert mx.allclose(g1, g2, atol=1e-5, rtol=1e-4).item()
    h = head_input(model, head, tokens)
    nog = cross_entropy_no_grad(h.reshape(-1, h.shape[-1]), head, targets.reshape(-1), budget=1 << 16)
    assert abs(nog.sum().item() - l2.item()) < 1e-4 * abs(l2.item())
