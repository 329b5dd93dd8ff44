"""Unit tests of optiq convert's building blocks (no model needed)."""

from __future__ import annotations

import itertools
import json
import random

import mlx.core as mx
import numpy as np
import pytest

from optiq.core.errors import ConfigError, DataError
from optiq.core.quant.allocate import Option, allocate, check_target
from optiq.core.calibration import BUNDLED_CALIBRATION, load_records
from optiq.core.quant.formats import fitting_group_size, pack, unpack
from optiq.core.quant.gdn import chunked_gated_delta
from optiq.core.quant.rounding import quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_mlx_layout(bits):
    w = mx.random.normal((3, 4, 128), key=mx.random.key(bits))
    q, s, b = mx.quantize(w, group_size=64, bits=bits)
    codes = unpack(np.array(q), bits, 128)
    assert np.array_equal(pack(codes, bits), np.array(q))
    deq = codes.astype(np.float32) * np.repeat(np.array(s), 64, -1) + np.repeat(np.array(b), 64, -1)
    ref = np.array(mx.dequantize(q, s, b, group_size=64, bits=bits))
    assert np.allclose(deq, ref, atol=1e-6)


def test_fitting_group_size():
    assert fitting_group_size(128, 64) == 64
    assert fitting_group_size(96, 64) == 32
    assert fitting_group_size(100, 64) is None


def _problem(seed=0, out=64, n=256):
    rng = np.random.default_rng(seed)
    mix = np.eye(n) + 0.1 * rng.normal(size=(n, n))  # correlated features, like real activations
    x = (rng.normal(size=(2048, n)) @ mix) * np.exp(rng.normal(size=n))
    h = (x.T @ x / len(x)).astype(np.float64)
    w = (rng.standard_t(4, size=(out, n)) * 0.05).astype(np.float32)
    return w, h


def _out_err(w, q, h):
    d = (w - q.dequantize()).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d))


def test_rounding_methods_improve_output_error():
    w, h = _problem()
    errs = {}
    for method in ("rtn", "clip", "gptq"):
        res = quantize_weight(w, [3, 4], 64, mx.bfloat16, method, h)
        errs[method] = {b: _out_err(w, q, h) for b, q in res.items()}
    for b in (3, 4):
        assert errs["clip"][b] < errs["rtn"][b]
        assert errs["gptq"][b] < 0.8 * errs["clip"][b]
    assert errs["gptq"][4] < errs["gptq"][3]


def test_rtn_equals_mlx_quantize_and_scales_are_dtype_exact():
    w, h = _problem(1)
    q = quantize_weight(w, [4], 64, mx.bfloat16, "rtn")[4]
    wq, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=64, bits=4)
    f32 = mx.float32  # dequantize with fp32 scales: exact, like OptiQ's CPU path
    ref = np.array(mx.dequantize(wq, s.astype(f32), b.astype(f32), group_size=64, bits=4))
    assert np.allclose(q.dequantize(), ref, atol=1e-6)
    g = quantize_weight(w, [4], 64, mx.bfloat16, "gptq", h)[4]
    for arr in (g.scales, g.biases):
        back = np.array(mx.array(arr).astype(mx.bfloat16).astype(mx.float32))
        assert np.array_equal(back, arr)
    assert g.codes.max() <= 15


def test_expert_pool_rounding_uses_per_expert_hessians():
    w, h = _problem(2, out=32, n=128)
    w3 = np.stack([w, w * 0.5])
    h3 = np.stack([h, np.zeros_like(h)])  # expert 1 saw no tokens: falls back to clip
    res = quantize_weight(w3, [4], 64, mx.bfloat16, "gptq", h3)[4]
    assert res.codes.shape == w3.shape and res.scales.shape == (2, 32, 2)


@pytest.mark.parametrize("gates", ["moderate", "tiny"])
def test_chunked_gated_delta_matches_stepwise_values_and_grads(gates):
    """Also with trained-like tiny gates (decays flushed to zero instead of denormals)."""
    from mlx_lm.models.gated_delta import gated_delta_ops, normalize_qk

    mx.random.seed(0)
    B, T, Hk, Hv, D = 2, 77, 1, 2, 16
    q = mx.random.normal((B, T, Hk, D))
    k = mx.random.normal((B, T, Hk, D))
    v = mx.random.normal((B, T, Hv, D))
    q, k = normalize_qk(q, k, inv_scale=D**-0.5, eps=1e-6)
    if gates == "moderate":
        g = mx.random.uniform(0.3, 1.0, (B, T, Hv))
    else:  # log-uniform over 1e-16 .. 0.5, median ~1e-8: most in-chunk decays underflow
        g = mx.exp(mx.random.uniform(-37.0, -0.7, (B, T, Hv)))
    beta = mx.random.uniform(shape=(B, T, Hv))
    s0 = mx.random.normal((B, Hv, D, D)) * 0.1
    y1, s1 = gated_delta_ops(q, k, v, g, beta, s0)
    y2, s2 = chunked_gated_delta(q, k, v, g, beta, s0, chunk=16)
    assert mx.allclose(y1, y2, atol=1e-5).item() and mx.allclose(s1, s2, atol=1e-5).item()
    c = mx.random.normal(y1.shape)
    # Gradients w.r.t. the log-gate, as models produce gates (g = exp(-softplus(..)...)).
    lg = mx.log(g)

    def grads(fn):
        loss = lambda kk, bb, ll: (fn(q, kk, v, mx.exp(ll), bb, s0)[0] * c).sum()
        return mx.grad(loss, argnums=(0, 1, 2))(k, beta, lg)

    g1 = grads(gated_delta_ops)
    g2 = grads(lambda *a: chunked_gated_delta(*a, chunk=16))
    for a, b in zip(g1, g2):
        assert mx.all(mx.isfinite(b)).item()
        assert mx.allclose(a, b, atol=1e-4).item()


def test_allocation_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        opts = {}
        for i in range(rng.randint(1, 5)):
            n = rng.randint(1, 8) * 64
            kls = sorted((rng.random() for _ in range(4)), reverse=True)
            opts[f"l{i}"] = [Option(b, n * b, k) for b, k in zip((2, 3, 4, 8), kls)]
        lo = sum(min(o.cost for o in v) for v in opts.values())
        hi = sum(max(o.cost for o in v) for v in opts.values())
        budget = rng.randint(lo, hi)
        a = allocate(opts, budget, resolution=50_000)
        best = min(
            sum(o.kl for o in combo)
            for combo in itertools.product(*opts.values())
            if sum(o.cost for o in combo) <= budget
        )
        assert a.cost <= budget and a.predicted_kl == pytest.approx(best, abs=1e-12)


def test_allocation_reports_infeasible_budget():
    opts = {"a": [Option(4, 400, 1.0), Option(8, 800, 0.1)]}
    a = allocate(opts, 100)
    assert not a.feasible and a.bits == {"a": 4}


def test_target_checks():
    check_target(4.5, (4, 8), "weights")
    with pytest.raises(ConfigError, match="below the smallest"):
        check_target(3.9, (4, 8), "weights")
    with pytest.raises(ConfigError, match="above the largest"):
        check_target(8.5, (4, 8), "weights")
    with pytest.raises(ConfigError):
        check_target(4.5, (4, 8), "bogus")


def test_bundled_calibration_covers_prose_chat_code_tools():
    recs = load_records(BUNDLED_CALIBRATION)
    chats = [r for r in recs if "messages" in r]
    texts = [r["text"] for r in recs if "text" in r]
    assert len(recs) >= 80 and len(chats) >= 30 and len(texts) >= 20
    flat = json.dumps(recs)
    assert "<think>" in flat and "<tool_call>" in flat and '"role": "tool"' in flat
    assert any("def " in t for t in texts) and any("SELECT" in t for t in texts)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json}\n", "not valid JSON"),
        ('{"foo": 1}\n', "needs a string 'text'"),
        ('{"messages": []}\n', "non-empty list"),
        ('[1, 2]\n', "JSON object"),
        ("", "no records"),
    ],
)
def test_calibration_file_errors(tmp_path, content, match):
    p = tmp_path / "c.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_records(p)


def test_calibration_missing_and_binary_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="cannot read"):
        load_records(p)


def test_calibration_renders_chats_with_the_model_template(bundled_model_dir, tmp_path):
    from mlx_lm.utils import load

    from optiq.core.calibration import build_calibration, render_record

    _, tok = load(str(bundled_model_dir), lazy=True)
    chat = {"messages": [{"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]}
    text = render_record(chat, tok)
    assert text.startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>") and "<think>\nadd\n</think>" in text
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"text": "plain words " * 40}, chat] * 3))
    cal = build_calibration(tok, p, n_sequences=50, seq_len=32)
    assert cal.tokens.shape[1] == 32 and 1 <= cal.tokens.shape[0] < 50 and cal.source == str(p)
    assert tok.eos_token_id in cal.tokens  # records are joined with EOS
    assert build_calibration(tok, None, n_sequences=8, seq_len=256).tokens.shape == (8, 256)
    assert build_calibration(tok, None, n_sequences=10_000, seq_len=256).tokens.shape[0] >= 32


REJECTS_TOOL_TURNS = ("{% for m in messages %}{% if m.role == 'tool' %}"
                      "{{ raise_exception('tool turns are not supported') }}{% endif %}{{ m.content }}{% endfor %}")


def test_calibration_chat_the_template_cannot_render_is_an_error(bundled_model_dir, tmp_path):
    """No silent "role: content" rendering: the measurement would see another format."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_lm.utils import load

    from optiq.core.calibration import build_calibration

    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"text": "plain words " * 40},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]},
    ]))
    _, tok = load(str(bundled_model_dir), lazy=True)
    tok._tokenizer.chat_template = REJECTS_TOOL_TURNS
    with pytest.raises(DataError, match=r"c\.jsonl: chat record 2: the model's chat template rejected "
                                        r"this conversation \(TemplateError: tool turns are not supported\)"):
        build_calibration(tok, p, n_sequences=4, seq_len=32)
    tok._tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"chat record 2: 'messages' records need a chat template.*\{\"text\""):
        build_calibration(TokenizerWrapper(tok._tokenizer), p, n_sequences=4, seq_len=32)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_rtn_error_is_mlx_lm_convert_rounding_minus_weight(bits):
    """The fisher estimate's fake-quant (in MLX) equals what ``rtn`` rounding writes."""
    from optiq.core.quant.fisher import rtn_error

    w = np.random.default_rng(bits).normal(size=(16, 128)).astype(np.float32)
    want = quantize_weight(w, [bits], 64, mx.bfloat16, "rtn")[bits].dequantize() - w
    got = np.array(rtn_error(mx.array(w), bits, 64, mx.bfloat16))
    assert got.dtype == np.float32
    assert np.allclose(got, want, atol=1e-6)
    assert np.abs(got).max() > 0


def test_reference_and_estimate_equals_separate_passes(bundled_model_dir):
    """One forward+backward gives the same reference and estimates as the two-pass path."""
    from optiq.core.cpu import cast_floats
    from optiq.core.model_io import load_model
    from optiq.core.calibration import build_calibration
    from optiq.core.quant.fisher import fisher_sensitivities, reference_and_estimate
    from optiq.core.quant.sensitivity import capture_reference
    from optiq.core.quant.targets import find_targets

    lm = load_model(bundled_model_dir, fast_cpu=False)
    cast_floats(lm.model, mx.float32)
    tokens = build_calibration(lm.tokenizer, None, 2, 32).tokens
    active = [t for t in find_targets(lm.model, 64) if t.quantizable]
    ref1 = capture_reference(lm.model, tokens, active, batch_size=1, check_replay=False)
    est1 = fisher_sensitivities(lm.model, ref1, active, (4, 8), mx.bfloat16, "rtn", n_probes=1)
    ref2, est2 = reference_and_estimate(lm.model, tokens, active, (4, 8), mx.bfloat16, batch_size=1)

    assert ref2.hessian_key == ref1.hessian_key and ref2.start_layer == ref1.start_layer
    assert set(ref2.hessians) == set(ref1.hessians)
    for k, h in ref1.hessians.items():
        assert np.allclose(ref2.hessians[k], h, rtol=1e-5, atol=1e-7)
    for d1, d2 in zip(ref1.dists, ref2.dists):
        assert np.allclose(d1.p, d2.p, atol=1e-6)
    for o1, o2 in zip(ref1.layer_outputs, ref2.layer_outputs):
        assert all(np.allclose(np.array(a), np.array(b), atol=1e-5) for a, b in zip(o1, o2))
    assert set(est2) == {t.path for t in active}
    for p, r in est1.items():
        assert set(r.kl) == set(est2[p].kl) == {4, 8} and est2[p].measured == []
        assert est2[p].kl[4] > 0 and est2[p].kl[8] <= est2[p].kl[4]
        assert est2[p].kl[4] == pytest.approx(r.kl[4], rel=1e-3, abs=1e-12)  # same seed, same probes


@pytest.mark.parametrize("method", ["clip", "rtn"])
def test_chunked_rounding_equals_one_call(monkeypatch, method):
    """Static convert rounds big weights chunk by chunk along axis 0: same codes and scales."""
    import mlx.core as mx

    from optiq.core.quant import source
    from optiq.core.quant.rounding import quantize_in_chunks

    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 128)).astype(np.float32)
    monkeypatch.setattr(source, "CHUNK_ELEMENTS", 128 * 2 * 5)  # 5 rows per chunk at two widths
    assert len(list(source.chunks_along_first_axis(w.shape, 2))) == 8
    whole = quantize_weight(w, (3, 4), 64, mx.bfloat16, method, None)
    chunked = quantize_in_chunks(w, (3, 4), 64, mx.bfloat16, method)
    for b in (3, 4):
        np.testing.assert_array_equal(whole[b].codes, chunked[b].codes)
        np.testing.assert_array_equal(whole[b].scales, chunked[b].scales)
        np.testing.assert_array_equal(whole[b].biases, chunked[b].biases)


def test_weight_source_matches_the_loaded_model():
    """Fresh lazy weights (what static convert reads) equal what mlx_lm.load gives."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from optiq.core.model_io import bundled_model_path, load_model
    from optiq.core.quant.source import WeightSource

    lm = load_model(None, fast_cpu=False, lazy=True)
    fresh = WeightSource(bundled_model_path(), lm.model).fresh()
    params = dict(tree_flatten(lm.model.parameters()))
    assert set(fresh) == set(params)
    name = next(k for k in params if k.endswith("mlp.down_proj.weight"))
    np.testing.assert_array_equal(np.asarray(fresh[name].astype(mx.float32)), np.asarray(params[name].astype(mx.float32)))


def test_static_prior_sample_spreads_whole_groups_over_rows_and_columns():
    """Large leaves' priors are measured on whole groups from evenly spaced rows, every
    column group equally often, none twice; small leaves are measured whole."""
    import mlx.core as mx

    from optiq.core.quant.static import sampled_groups

    w = mx.arange(40 * 256, dtype=mx.float32).reshape(40, 256)  # 4 groups of 64 per row
    np.testing.assert_array_equal(sampled_groups(w, 64, limit=40 * 256), np.asarray(w))
    for k in (10, 80):  # fewer groups than rows, and more (two per row)
        s = np.asarray(sampled_groups(w, 64, limit=k * 64))
        assert s.shape == (k, 64)
        start = s[:, 0].astype(int)
        row, col = start // 256, (start % 256) // 64
        assert np.all(start % 64 == 0)  # whole groups, unchanged
        np.testing.assert_array_equal(s, np.asarray(w).reshape(-1, 64)[start // 64])
        assert row[0] == 0 and row[-1] >= 40 - -(-40 // k) and np.all(np.diff(row) >= 0)  # evenly spaced
        assert len(set(zip(row, col))) == k
        assert np.bincount(col, minlength=4).min() >= k // 4 - 1
    pool = mx.arange(4 * 8 * 64, dtype=mx.float32).reshape(4, 8, 64)  # expert pools: rows of all experts
    assert sampled_groups(pool, 64, limit=8 * 64).shape == (8, 64)