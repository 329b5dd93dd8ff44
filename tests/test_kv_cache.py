"""The mixed-precision KV cache: layer detection, exactness at 8 bits, the Hadamard
rotation, BatchGenerator batches (merge/extend/filter/extract), prompt-cache files."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.models.cache import load_prompt_cache as mlx_load_prompt_cache
from mlx_lm.models.cache import save_prompt_cache as mlx_save_prompt_cache
from optiq.core.errors import ConfigError
from optiq.core.kv import (
    BatchMixedKVCache,
    MixedKVCache,
    apply_kv_config,
    install_attention,
    kv_layout,
    load_prompt_cache,
    make_kv_cache,
    make_simulated_kv_cache,
    quant,
    remove_kv_config,
    save_prompt_cache,
    uniform_kv_config,
    uninstall_attention,
)
from optiq.core.kv.attention import unpacked_scores
from optiq.core.kv.config import KVConfig
from optiq.core.kv.layers import require_kv_layers
from optiq.core.mlx_lm_seam import model_classes
from optiq.core.model_io import load_model


@pytest.fixture(scope="module")
def tiny(bundled_model_dir):
    lm = load_model(bundled_model_dir)
    yield lm
    remove_kv_config(lm.model)


@pytest.fixture(scope="module")
def prompts(tiny) -> list[list[int]]:
    text = (tiny.path / "heldout.txt").read_text() if (tiny.path / "heldout.txt").exists() else "hello world " * 200
    ids = tiny.tokenizer.encode(text)
    return [ids[i * 97 : i * 97 + n] for i, n in enumerate((41, 7, 90, 23))]


def build(config: dict, seed: int = 0):
    model_cls, args_cls = model_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    mx.eval(model.parameters())
    return model


def tiny_llama(**kw):
    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=3, intermediate_size=128,
               num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-5, vocab_size=128)
    cfg.update(kw)
    return build(cfg)


def greedy(model, prompt, cache, n=24):
    toks, logits = [], []
    y = mx.array(prompt)
    for tok, logprobs in generate_step(y, model, max_tokens=n, prompt_cache=cache):
        toks.append(int(tok))
        logits.append(logprobs)
    return toks, mx.stack(logits)


def feed(model, cache, tokens: list[int]) -> mx.array:
    """Logits of feeding ``tokens`` one at a time (decode steps)."""
    cache = cache if cache is not None else make_prompt_cache(model)
    return mx.concatenate([model(mx.array([[t]]), cache=cache)[0] for t in tokens])


# ------------------------------------------------------------------ which layers


def test_layout_of_the_hybrid_bundled_model(tiny):
    layout = kv_layout(tiny.model)
    assert layout.model_type == "qwen3_5" and layout.num_layers == 8
    assert layout.indices == [3, 7]  # full attention every 4th layer
    assert {s.index for s in layout.skipped} == {0, 1, 2, 4, 5, 6}
    assert {s.cache for s in layout.skipped} == {"ArraysCache"}
    assert all("full precision" in s.reason for s in layout.skipped)
    assert all(k.k_head_dim == 64 and k.v_head_dim == 64 for k in layout.kv_layers)


def test_layout_of_a_dense_model_with_a_sliding_layer():
    model = tiny_llama(layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=8)
    caches = model.make_cache()
    assert isinstance(caches[1], RotatingKVCache)
    layout = kv_layout(model)
    assert layout.indices == [0, 2]
    assert [(s.index, s.cache) for s in layout.skipped] == [(1, "RotatingKVCache")]
    assert layout.kv_layers[0].n_kv_heads == 1 and layout.kv_layers[0].k_head_dim == 32
    assert kv_layout(tiny_llama()).indices == [0, 1, 2]


def test_model_without_kv_layers_is_refused():
    mamba = build(dict(model_type="mamba", vocab_size=64, hidden_size=32, intermediate_size=64, state_size=8,
                       num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=4))
    layout = kv_layout(mamba)
    assert layout.kv_layers == () and {s.cache for s in layout.skipped} == {"ArraysCache"}
    with pytest.raises(ConfigError, match="no layer with a per-token KV cache"):
        require_kv_layers(layout)


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_8bit_config_matches_full_precision_kv(tiny, prompts, rotation):
    model = tiny.model
    layout = kv_layout(model)
    cfg8 = uniform_kv_config(layout, 8, rotation=rotation)
    for p in prompts:
        ref_toks, ref_logp = greedy(model, p, None, n=20)
        toks, logp = greedy(model, p, make_kv_cache(model, cfg8), n=20)
        n = next((i for i, (a, b) in enumerate(zip(ref_toks, toks)) if a != b), len(toks))
        # identical greedy tokens, except after a near-tie of the full-precision model itself
        if n < len(toks):
            top2 = mx.sort(ref_logp[n])[-2:].tolist()
            assert top2[1] - top2[0] < 0.01, f"diverged at step {n} with a clear margin"
        assert mx.abs(logp[:n] - ref_logp[:n]).max().item() < 0.1
    # 4-bit K/V moves the distribution measurably more than 8-bit does (same token path)
    p = prompts[0]
    exact = feed(model, make_kv_cache(model, uniform_kv_config(layout, 8, rotation=rotation)), p)
    ref = feed(model, None, p)
    four = feed(model, make_kv_cache(model, uniform_kv_config(layout, 4, rotation=rotation)), p)
    assert mx.abs(four - ref).max().item() > 2 * mx.abs(exact - ref).max().item()


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_packed_decode_attention_equals_dequantized_path(tiny, prompts, rotation):
    model = tiny.model
    cfg = KVConfig(model=kv_layout(model), group_size=64, layers={3: (8, 3), 7: (4, 6)}, rotation=rotation)
    prompt, steps = prompts[0], prompts[1]
    try:
        uninstall_attention(model)
        slow_cache = make_kv_cache(model, cfg, fast_attention=False)
        model(mx.array(prompt)[None], cache=slow_cache)
        slow = feed(model, slow_cache, steps)
        assert install_attention(model) >= 1
        cache = make_kv_cache(model, cfg)
        assert cache[3].rotation == rotation
        model(mx.array(prompt)[None], cache=cache)
        fast = feed(model, cache, steps[:4])
        # the patched attention has read these caches: decode steps skip the dequantization
        assert cache[3]._packed_epoch >= 0
        uninstall_attention(model)  # ... until the patch is removed: then real K/V again
        rest = feed(model, cache, steps[4:])
    finally:
        install_attention(model)
    assert mx.allclose(slow[:4], fast, atol=1e-4).item()
    assert mx.allclose(slow[4:], rest, atol=1e-4).item()


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
@pytest.mark.parametrize(("head_dim", "group_size"), [(128, 64), (64, 32)])
def test_packed_attention_equals_sdpa_on_dequantized_kv(rotation, head_dim, group_size):
    """GQA decode over a filled cache, with a head_dim holding several groups."""
    from optiq.core.kv.attention import _STOCK_SDPA, quantized_attention

    mx.random.seed(3)
    cache = MixedKVCache(4, 8, group_size, rotation)
    k, v = mx.random.normal((1, 2, 37, head_dim)), mx.random.normal((1, 2, 37, head_dim))
    cache.update_and_fetch(k, v)
    q = mx.random.normal((1, 4, 1, head_dim))
    dk, dv = cache._dequantized(37)
    ref = _STOCK_SDPA(q, dk, dv, cache=None, scale=head_dim**-0.5, mask=None)
    out = quantized_attention(q, cache, head_dim**-0.5, None)
    assert mx.allclose(out, ref, atol=1e-4).item()


# ------------------------------------------------------------------ rotation


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("block", [32, 64])
def test_hadamard_is_symmetric_and_orthogonal(dim, block):
    r = quant.hadamard(dim, block)
    assert r.shape == (dim, dim) and r.dtype == mx.float32
    assert mx.array_equal(r, r.T).item()
    assert mx.allclose(r @ r, mx.eye(dim), atol=1e-6).item()
    # block-diagonal: nothing mixes channels of different quantization groups
    assert mx.all(r[:block, block:] == 0).item()
    assert mx.allclose(mx.abs(r[:block, :block]), mx.array(block**-0.5)).item()
    x = mx.random.normal((3, dim))
    assert mx.allclose(quant.rotate(quant.rotate(x, "hadamard", block), "hadamard", block), x, atol=1e-5).item()
    assert quant.rotate(x, "none", block) is x


def test_check_rotation():
    assert quant.check_rotation("hadamard") == "hadamard"
    with pytest.raises(ConfigError, match="KV rotation 'rot' is not supported: use one of none, hadamard"):
        quant.check_rotation("rot")
    with pytest.raises(ConfigError, match="rotation"):
        MixedKVCache(4, 4, 64, "rot")


def test_rotation_shrinks_4bit_error_of_outlier_channels():
    """One channel 20x larger stretches its whole group's scale; rotated, it is spread out."""
    mx.random.seed(0)
    k = mx.random.normal((1, 2, 64, 64)) * mx.where(mx.arange(64) == 5, 20.0, 1.0)
    err, nbytes = {}, {}
    for rotation in ("none", "hadamard"):
        c = MixedKVCache(4, 4, 32, rotation)
        c.update_and_fetch(k, k)
        err[rotation] = mx.square(c._dequantized(64)[0] - k).mean().item()
        nbytes[rotation] = c.stored_nbytes()
        # the simulator (sensitivity pass, eval) stores exactly like the cache
        assert err[rotation] == pytest.approx(mx.square(quant.fake_quantize(k, 4, 32, rotation) - k).mean().item())
    assert err["hadamard"] < 0.5 * err["none"]
    assert nbytes["hadamard"] == nbytes["none"]  # the rotation stores nothing


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("head_dim", "group_size"), [(64, 64), (128, 64), (64, 32)])
def test_unpacked_key_scores_equal_quantized_matmul(bits, head_dim, group_size):
    mx.random.seed(bits)
    k = mx.random.normal((2, 3, 40, head_dim))
    q = mx.random.normal((2, 3, 4, head_dim))
    w, s, b = quant.quantize(k, bits, group_size)
    ref = mx.quantized_matmul(q, w, s, b, transpose=True, group_size=group_size, bits=bits)
    assert mx.allclose(unpacked_scores(q, w, s, b, bits, group_size), ref, atol=1e-4).item()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compiled_decode_attention_follows_growing_lengths(bits):
    """The shapeless-compiled decode kernels are traced once per format: every later
    context length must still give the uncompiled result (shape and values)."""
    from optiq.core.kv import attention

    mx.random.seed(bits)
    for length in (7, 40, 300, 41):
        k, v = mx.random.normal((1, 2, length, 64)), mx.random.normal((1, 2, length, 64))
        q = mx.random.normal((1, 2, 3, 64))
        kw, ks, kb = quant.quantize(k, bits, 64)
        vw, vs, vb = quant.quantize(v, 4, 64)
        scores = attention._key_scores(q, kw, ks, kb, bits, 64)
        assert scores.shape == (1, 2, 3, length)
        assert mx.allclose(scores, unpacked_scores(q, kw, ks, kb, bits, 64), atol=1e-5).item()
        out = attention._softmax_values(4, 64, scores, vw, vs, vb)  # compiled exp + value product
        probs = mx.softmax(scores, axis=-1, precise=True)
        ref = mx.quantized_matmul(probs, vw, vs, vb, transpose=False, group_size=64, bits=4)
        assert out.shape == (1, 2, 3, 64) and mx.allclose(out, ref, atol=1e-6).item()


def test_simulated_cache_scores_like_token_by_token_decoding(tiny, prompts):
    """One teacher-forced forward with SimulatedKVCache == decoding through MixedKVCache."""
    model = tiny.model
    cfg = KVConfig(model=kv_layout(model), group_size=64, layers={3: (4, 8), 7: (3, 4)})
    tokens = prompts[0][:24]
    sim = model(mx.array(tokens)[None], cache=make_simulated_kv_cache(model, cfg))[0]
    cache = make_kv_cache(model, cfg)
    steps = mx.concatenate([model(mx.array([[t]]), cache=cache)[0] for t in tokens])
    exact = model(mx.array(tokens)[None])[0]
    assert mx.allclose(sim, steps, atol=2e-3).item()
    assert mx.abs(sim - exact).max().item() > 10 * mx.abs(sim - steps).max().item()
    # a prefill chunk attends to its own K/V at full precision (like mlx-lm's kv_bits)
    chunk = model(mx.array(tokens)[None], cache=make_kv_cache(model, cfg))[0]
    assert mx.allclose(chunk, exact, atol=1e-4).item()


def test_kv_cache_factory_for_evaluation(tiny, prompts, tmp_path):
    from optiq.core.kv import kv_cache_factory, save_kv_config

    model = tiny.model
    cfg = KVConfig(model=kv_layout(model), group_size=64, layers={3: (4, 8), 7: (3, 4)})
    path = save_kv_config(cfg, tmp_path / "kv_config.json")
    make_cache = kv_cache_factory(path)
    x = mx.array(prompts[2])[None]
    a = model(x, cache=make_cache(model))
    b = model(x, cache=make_simulated_kv_cache(model, cfg))
    assert mx.array_equal(a, b).item()
    with pytest.raises(ConfigError, match="different model"):
        make_cache(tiny_llama())


def test_dense_model_generation_8bit():
    model = tiny_llama()
    layout = kv_layout(model)
    ref, _ = greedy(model, list(range(3, 40)), None, n=16)
    out, _ = greedy(model, list(range(3, 40)), make_kv_cache(model, uniform_kv_config(layout, 8, group_size=32)), n=16)
    assert out == ref


def test_wrong_config_for_model(tiny):
    llama = tiny_llama()
    cfg = uniform_kv_config(kv_layout(tiny.model), 4)
    with pytest.raises(ConfigError, match="different model"):
        apply_kv_config(llama, cfg)
    with pytest.raises(ConfigError, match="8-layer model; this model has 3"):
        make_kv_cache(llama, cfg)


# ------------------------------------------------------------------ batching


def _filled(k_bits, v_bits, length, seed, rotation="hadamard"):
    c = MixedKVCache(k_bits, v_bits, 64, rotation)
    if length:
        mx.random.seed(seed)
        c.update_and_fetch(mx.random.normal((1, 2, length, 64)), mx.random.normal((1, 2, length, 64)))
    return c


def _same(a: MixedKVCache, b: MixedKVCache) -> bool:
    if a.empty() or b.empty():
        return a.empty() and b.empty() and a.offset == b.offset == 0
    (ak, av), (bk, bv) = a.quantized_state(), b.quantized_state()
    return a.offset == b.offset and all(mx.array_equal(x, y).item() for x, y in zip((*ak, *av), (*bk, *bv)))


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_merge_extend_filter_extract_round_trip(rotation):
    singles = [_filled(8, 4, n, i, rotation) for i, n in enumerate((5, 0, 300, 17))]
    batch = MixedKVCache.merge(singles[:2])
    assert isinstance(batch, BatchMixedKVCache) and batch.left_padding.tolist() == [0, 5]
    assert batch.rotation == rotation and batch.extract(0).rotation == rotation
    other = MixedKVCache.merge(singles[2:])
    batch.extend(other)
    assert batch.left_padding.tolist() == [295, 300, 0, 283] and batch.size() == 300
    for i, s in enumerate(singles):
        assert _same(batch.extract(i), s)
    batch.filter([0, 3])  # drops the longest row: shared left padding is trimmed
    assert batch.size() == 17 and batch.left_padding.tolist() == [12, 0]
    assert _same(batch.extract(0), singles[0]) and _same(batch.extract(1), singles[3])
    mx.random.seed(9)
    k, v = mx.random.normal((2, 2, 1, 64)), mx.random.normal((2, 2, 1, 64))
    batch.update_and_fetch(k, v)
    singles[3].update_and_fetch(k[1:], v[1:])
    assert _same(batch.extract(1), singles[3])


def test_merge_refuses_mixed_formats_and_converts_fp_caches():
    with pytest.raises(ConfigError, match="different formats"):
        MixedKVCache.merge([_filled(8, 4, 3, 0), _filled(4, 4, 3, 1)])
    with pytest.raises(ConfigError, match=r"different formats \(k_bits, v_bits, group_size, rotation\)"):
        MixedKVCache.merge([_filled(8, 4, 3, 0, "hadamard"), _filled(8, 4, 3, 1, "none")])
    batch = MixedKVCache.merge([_filled(8, 4, 3, 0, "none")])
    with pytest.raises(ConfigError, match="different formats"):
        batch.extend(MixedKVCache.merge([_filled(8, 4, 3, 1, "hadamard")]))
    fp = KVCache()
    mx.random.seed(1)
    k, v = mx.random.normal((1, 2, 6, 64)), mx.random.normal((1, 2, 6, 64))
    fp.update_and_fetch(k, v)
    batch = MixedKVCache.merge([_filled(8, 8, 3, 0), fp])
    row = batch.extract(1)
    assert row.offset == 6
    assert mx.allclose(row._dequantized(6)[0], k, atol=0.05).item()
    with pytest.raises(ConfigError, match="cannot batch a ArraysCache"):
        MixedKVCache.merge([_filled(8, 8, 3, 0), ArraysCache(2)])


def test_batch_generator_matches_single_stream(tiny, prompts):
    model = tiny.model
    layout = kv_layout(model)
    cfg = KVConfig(model=layout, group_size=64, layers={3: (8, 4), 7: (4, 8)})
    max_tokens = [12, 5, 9, 10]
    ref = [greedy(model, p, make_kv_cache(model, cfg), n=m)[0] for p, m in zip(prompts, max_tokens)]
    apply_kv_config(model, cfg)
    try:
        gen = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=2)
        uids = gen.insert(prompts[:3], max_tokens=max_tokens[:3])
        out = {u: [] for u in uids}
        seen_batch_cache = False
        removed = None
        for step in range(200):
            if step == 3:  # joins a running batch: extend
                uids += gen.insert([prompts[3]], max_tokens=[max_tokens[3]])
                out[uids[-1]] = []
            responses = gen.next_generated()
            caches = gen._generation_batch.prompt_cache
            if caches:
                assert isinstance(caches[3], BatchMixedKVCache) and isinstance(caches[0], ArraysCache)
                seen_batch_cache = True
            for r in responses:
                out[r.uid].append(r.token)
            if removed is None and len(out[uids[0]]) == 6:  # take request 0 out mid-stream
                removed = gen.remove([uids[0]], return_prompt_caches=True)[uids[0]]
            if step > 3 and not responses and len(gen._generation_batch) == 0 and not gen._unprocessed_sequences:
                break
        gen.close()
    finally:
        remove_kv_config(model)
    assert seen_batch_cache
    assert out[uids[0]] == ref[0][:6]
    for u, r in zip(uids[1:], ref[1:]):
        assert out[u] == r  # filter() ran when shorter requests finished
    # the extracted cache continues exactly like the uninterrupted single stream
    cache, tokens = removed
    assert isinstance(cache[3], MixedKVCache) and isinstance(cache[0], ArraysCache)
    n_done = cache[3].offset - len(prompts[0])  # generated tokens already inside the cache
    assert 5 <= n_done <= 6 and tokens[-n_done:] == ref[0][:n_done]
    cont, _ = greedy(model, [ref[0][n_done]], cache, n=4)
    assert cont == ref[0][n_done + 1 : n_done + 5]


def test_apply_kv_config_makes_every_cache_mixed(tiny):
    model = tiny.model
    cfg = uniform_kv_config(kv_layout(model), 6, 4)
    apply_kv_config(model, cfg)
    try:
        cache = make_prompt_cache(model)
        assert [type(c).__name__ for c in cache].count("MixedKVCache") == 2
        assert (cache[3].k_bits, cache[3].v_bits) == (6, 4)
    finally:
        remove_kv_config(model)
    assert type(make_prompt_cache(model)[3]) is KVCache


# ------------------------------------------------------------------ prompt-cache files


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_prompt_cache_save_load_round_trip(tiny, prompts, tmp_path, rotation):
    model = tiny.model
    cfg = KVConfig(model=kv_layout(model), group_size=64, layers={3: (8, 4), 7: (5, 3)}, rotation=rotation)
    cache = make_kv_cache(model, cfg)
    model(mx.array(prompts[2])[None], cache=cache)
    mx.eval([c.state for c in cache])
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache, {"note": "kv"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "kv"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert (loaded[7].k_bits, loaded[7].v_bits, loaded[7].offset) == (5, 3, len(prompts[2]))
    assert loaded[7].rotation == rotation
    assert _same(loaded[3], cache[3])
    stock = mlx_load_prompt_cache(path)  # stock mlx-lm resolves our class names too
    nxt = mx.array([[prompts[2][-1]]])
    a, b, c = (model(nxt, cache=x) for x in (cache, loaded, stock))
    assert mx.array_equal(a, b).item() and mx.array_equal(a, c).item()
    empty = make_kv_cache(model, cfg)
    save_prompt_cache(path, empty)
    assert load_prompt_cache(path)[3].empty()


def _without_rotation(cls):
    """A class saving ``cls``'s state as before rotations existed (same name, so it loads as ``cls``)."""
    return type(cls.__name__, (cls,), {"state": property(lambda self: cls.state.fget(self)[:-1])})


def test_prompt_cache_saved_before_rotations_loads_unrotated(tmp_path):
    """Old files carry no rotation: their K/V were stored as is."""
    mx.random.seed(4)
    k, v = mx.random.normal((1, 2, 9, 64)), mx.random.normal((1, 2, 9, 64))
    single = _without_rotation(MixedKVCache)(8, 4, 64, "none")
    batch = _without_rotation(BatchMixedKVCache)([0], 8, 4, 64, "none")
    for c in (single, batch):
        c.update_and_fetch(k, v)
    path = str(tmp_path / "old.safetensors")
    mlx_save_prompt_cache(path, [single, batch])
    loaded = load_prompt_cache(path)
    assert [type(c) for c in loaded] == [MixedKVCache, BatchMixedKVCache]
    assert all(c.rotation == "none" for c in loaded)
    assert mx.array_equal(loaded[0]._dequantized(9)[0], single._dequantized(9)[0]).item()
    assert mx.array_equal(loaded[1]._dequantized(9)[1], batch._dequantized(9)[1]).item()
