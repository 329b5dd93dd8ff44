"""The KV sensitivity pass (block-by-block replay, token-chunked logits) against the
direct computation it replaces: one whole forward per variant with full logits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from optiq.core.cpu import prepare_for_cpu
from optiq.core.kl import RefDist, kl_per_token
from optiq.core.kv import replay
from optiq.core.kv.allocate import allocate_kv_bits
from optiq.core.kv.layers import base_cache, kv_layout
from optiq.core.kv.pipeline import _fast_prefill, calibration_tokens
from optiq.core.kv.sensitivity import KVSensitivity, measure_kv_sensitivity, variant_kls
from optiq.core.kv.simulate import SimulatedKVCache
from optiq.core.model_io import load_model

# The per-token KL is a difference of O(10) terms computed from fp32 logits, so its mean
# carries fp32 noise of ~1e-8 nats/token whatever the path: the direct computation itself
# moves by that much (up to 3% at 8 bits, 1e-3 at 4 bits) when only its batching changes.
ATOL, RTOL = 3e-8, 3e-3


def direct_kls(model, sequences, variants, group_size=64, rotation="hadamard") -> np.ndarray:
    """The old pass: per sequence, every variant a row of one forward through the whole model."""
    n = sequences.shape[0]
    totals = np.zeros(len(variants))
    for s in range(n):
        tokens = sequences[s : s + 1]
        ref = RefDist.from_logits(model(tokens, cache=base_cache(model))[0])
        cache = base_cache(model)
        for i in {i for v in variants for i in v}:
            cache[i] = SimulatedKVCache(group_size=group_size, rows=[v.get(i, (None, None)) for v in variants],
                                        rotation=rotation)
        logits = model(mx.repeat(tokens, len(variants), axis=0), cache=cache)
        for r in range(len(variants)):
            totals[r] += float(kl_per_token(ref, logits[r]).mean()) / n
    return totals


def single_tensor_variants(layout, bits=(4, 8)):
    return [{i: ((b, None) if t == "k" else (None, b))} for i in layout.indices for t in "kv" for b in bits]


@pytest.fixture(scope="module")
def setup(bundled_model_dir):
    lm = load_model(bundled_model_dir)
    layout = kv_layout(lm.model)
    seqs, _ = calibration_tokens(lm.tokenizer, None, bundled_model_dir, 2, 128)
    return lm, layout, seqs


def test_replay_matches_direct_and_chooses_the_same_config(setup):
    lm, layout, seqs = setup
    variants = single_tensor_variants(layout)
    whole = [{i: (4, 4) for i in layout.indices}, {i: (8, 8) for i in layout.indices}]
    with _fast_prefill():
        want = direct_kls(lm.model, seqs, variants + whole)
        got = variant_kls(lm.model, seqs, variants + whole + [whole[0], {3: (None, None)}], 64, layout.vocab_size)
        sens = measure_kv_sensitivity(lm.model, seqs, layout, (4, 8), 64)
    np.testing.assert_allclose(got[: len(want)], want, rtol=RTOL, atol=ATOL)
    assert got[len(want)] == got[len(variants)]  # a repeated variant is run once
    assert got[-1] == 0.0  # quantizing nothing: the reference itself
    assert all(k > 0 for k in got[:-1])

    # the allocation from the new pass equals the one from the direct KLs, at every budget
    direct = KVSensitivity(
        kl={i: {"k": {}, "v": {}} for i in layout.indices}, candidate_bits=(4, 8), group_size=64,
        seq_len=128, n_samples=2, seconds=0.0)
    for v, kl in zip(variants, want):
        (i, (kb, vb)), = v.items()
        direct.kl[i]["k" if kb else "v"][kb or vb] = float(kl)
    for target in (4.5, 5.5, 6.5, 7.5, 8.5):
        assert allocate_kv_bits(sens, layout, target).bits == allocate_kv_bits(direct, layout, target).bits, target


def test_chunked_spilled_and_quantized_paths(setup, bundled_model_dir, monkeypatch):
    """Row chunks of one, logits in uneven token chunks, states on disk, a 4-bit model
    (dequantized-once blocks and tied head): still the direct computation's KLs."""
    lm, layout, seqs = setup
    model = load_model(bundled_model_dir).model
    nn.quantize(model, group_size=64, bits=4)
    prepare_for_cpu(model, force=True)
    monkeypatch.setattr(replay, "ACTIVATION_BUDGET_BYTES", 1)  # one row per block call
    monkeypatch.setattr(replay, "LOGITS_BUDGET_BYTES", layout.vocab_size * 4 * 48)  # 48, 48, 32 tokens
    monkeypatch.setattr(replay, "STATES_IN_MEMORY_BYTES", 0)  # spill to .npy
    calls = []
    real = replay.keep_dequantized
    monkeypatch.setattr(replay, "keep_dequantized", lambda mods: calls.append(mods) or real(mods))
    variants = single_tensor_variants(layout, bits=(4,)) + [{3: (8, 4), 7: (4, 8)}]
    lines = []
    with _fast_prefill():
        want = direct_kls(model, seqs, variants)
        got = variant_kls(model, seqs, variants, 64, layout.vocab_size, log=lines.append)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert len(calls) == layout.num_layers + 1  # each block once, and the head
    head = calls[-1][0]  # the bundled model's (untied) lm_head, 4-bit
    assert head is model.language_model.lm_head and isinstance(head, nn.QuantizedLinear)
    # progress: one line per block, then per sequence
    assert lines[0].startswith("sensitivity: block 1 of 8") and "sensitivity: block 4 of 8 (8 rows, 3 variant" in lines[3]
    assert lines[-1].startswith("sensitivity logits: sequence 2 of 2")
