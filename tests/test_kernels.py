"""optiq-kernels: the fused CPU decode attention over packed K/V codes, against the
same math on dequantized fp32 K/V, and wired into OptiQ's decode attention."""

from __future__ import annotations

import mlx.core as mx
import pytest
from optiq.core.kv import MixedKVCache
from optiq.core import cpu
from optiq.core.cpu import kernels as cpu_kernels
from optiq.core.cpu import pure_mlx
from optiq.core.kv.attention import quantized_attention

kernels = pytest.importorskip("optiq.kernels", reason="optiq-kernels is not built on this platform")


def reference(q, kq, vq, k_bits, v_bits, group_size, mask=None):
    f32 = mx.float32
    k = mx.dequantize(kq[0], kq[1].astype(f32), kq[2].astype(f32), group_size=group_size, bits=k_bits)
    v = mx.dequantize(vq[0], vq[1].astype(f32), vq[2].astype(f32), group_size=group_size, bits=v_bits)
    scores = q @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = scores + mask
    return mx.softmax(scores, axis=-1, precise=True) @ v


def packed(shape, bits, group_size, dtype=mx.float16, seed=0):
    x = mx.random.normal(shape, key=mx.random.key(seed))
    return mx.quantize(x.astype(dtype), group_size=group_size, bits=bits)


@pytest.mark.parametrize(
    ("k_bits", "v_bits", "group_size", "L", "B", "H", "R", "D"),
    [
        (4, 4, 64, 3000, 1, 1, 2, 64),  # several 1024-position slices, merged
        (8, 8, 64, 700, 2, 2, 1, 64),
        (2, 2, 32, 1500, 1, 1, 4, 64),
        (3, 3, 64, 1100, 1, 1, 2, 64),  # 3/5/6 bits: codes straddle bytes
        (5, 6, 32, 2100, 1, 2, 3, 128),
        (6, 5, 128, 300, 1, 1, 1, 128),
        (4, 8, 64, 2049, 3, 1, 2, 64),
        (4, 4, 64, 1, 1, 1, 1, 64),  # a single cached position
    ],
)
def test_kernel_equals_dequantized_attention(k_bits, v_bits, group_size, L, B, H, R, D):
    kq = packed((B, H, L, D), k_bits, group_size, seed=1)
    vq = packed((B, H, L, D), v_bits, group_size, seed=2)
    q = 0.2 * mx.random.normal((B, H, R, D), key=mx.random.key(3))
    mask = mx.where(mx.random.uniform(shape=(B, 1, R, L), key=mx.random.key(4)) < 0.1, -mx.inf, 0.0)
    for m in (None, mask):
        ref = reference(q, kq, vq, k_bits, v_bits, group_size, m)
        out = kernels.quantized_decode_attention(q, kq, vq, k_bits=k_bits, v_bits=v_bits, group_size=group_size, mask=m)
        assert out.dtype == mx.float32 and out.shape == (B, H, R, D)
        assert mx.abs(out - ref).max().item() < 5e-6


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_kernel_reads_other_scale_dtypes_and_strided_slices(dtype):
    """A cache hands out slices of a larger buffer: the kernel reads them in place."""
    kq, vq = packed((1, 2, 4096, 64), 4, 64, dtype, seed=5), packed((1, 2, 4096, 64), 8, 64, dtype, seed=6)
    kq, vq = (tuple(x[..., :2500, :] for x in t) for t in (kq, vq))
    q = mx.random.normal((1, 2, 2, 64), key=mx.random.key(7)) * 0.2
    ref = reference(q, kq, vq, 4, 8, 64)
    out = kernels.quantized_decode_attention(q, kq, vq, k_bits=4, v_bits=8, group_size=64)
    assert mx.abs(out - ref).max().item() < 5e-6


def test_fully_masked_rows_give_zeros_not_nans():
    kq, vq = packed((1, 1, 2000, 64), 4, 64), packed((1, 1, 2000, 64), 4, 64, seed=1)
    q = mx.random.normal((1, 1, 2, 64), key=mx.random.key(2))
    mask = mx.concatenate([mx.full((1, 1, 1, 2000), -mx.inf), mx.zeros((1, 1, 1, 2000))], axis=2)
    mask[..., 1, :1500] = -mx.inf  # row 1: only the last slice is visible
    out = kernels.quantized_decode_attention(q, kq, vq, k_bits=4, v_bits=4, group_size=64, mask=mask)
    assert mx.all(out[0, 0, 0] == 0).item()
    ref = reference(q[..., 1:, :], tuple(x[..., 1500:, :] for x in kq), tuple(x[..., 1500:, :] for x in vq), 4, 4, 64)
    assert mx.abs(out[..., 1:, :] - ref).max().item() < 5e-6


def test_kernel_refuses_what_it_cannot_read():
    kq, vq = packed((1, 1, 16, 64), 4, 64), packed((1, 1, 16, 64), 4, 64)
    q = mx.zeros((1, 1, 1, 64))
    with pytest.raises(ValueError, match="bits must be one of"):
        kernels.quantized_decode_attention(q, kq, vq, k_bits=7, v_bits=4, group_size=64)
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        kernels.quantized_decode_attention(q, kq, vq, k_bits=4, v_bits=4, group_size=16)
    with pytest.raises(ValueError, match="key codes do not match"):
        kernels.quantized_decode_attention(mx.zeros((1, 1, 1, 128)), kq, vq, k_bits=4, v_bits=4, group_size=64)
    with pytest.raises(ValueError, match="uint32"):
        kernels.quantized_decode_attention(q, (kq[0].astype(mx.int32), *kq[1:]), vq, k_bits=4, v_bits=4, group_size=64)
    with pytest.raises(ValueError, match="scales/biases do not match"):
        kernels.quantized_decode_attention(q, kq, vq, k_bits=4, v_bits=4, group_size=32)


def test_kernel_is_built_for_the_installed_mlx():
    assert kernels.BUILT_AGAINST_MLX == mx.__version__.split(".dev")[0]
    assert kernels.threads() >= 1


@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_decode_attention_uses_the_kernel_and_matches_pure_mlx(rotation):
    """GQA decode with a left-padding style boolean mask, through OptiQ's attention."""
    assert cpu_kernels() is kernels
    cache = MixedKVCache(4, 8, 64, rotation)
    k, v = (mx.random.normal((2, 2, 1500, 128), key=mx.random.key(s)) for s in (8, 9))
    cache.update_and_fetch(k, v)
    q = mx.random.normal((2, 4, 1, 128), key=mx.random.key(10))
    mask = mx.arange(1500)[None, None, None, :] >= mx.array([0, 700])[:, None, None, None]  # [B, 1, 1, L]
    for m in (None, mask):
        fast = quantized_attention(q, cache, 128**-0.5, m)
        with pure_mlx():
            assert cpu_kernels() is None
            slow = quantized_attention(q, cache, 128**-0.5, m)
        assert mx.allclose(fast, slow, atol=1e-5).item()


def test_unusable_kernels_fall_back_to_pure_mlx_with_a_warning(monkeypatch, caplog):
    import builtins
    import sys

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "optiq.kernels":
            raise ImportError("optiq-kernels was built against MLX 0.0.0")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "optiq.kernels")
    monkeypatch.setattr(builtins, "__import__", broken)
    cpu._load_kernels.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert cpu.kernels() is None
        assert "built against MLX 0.0.0" in caplog.text
        from optiq.core.kv.attention import _STOCK_SDPA

        cache = MixedKVCache(4, 4, 64)
        cache.update_and_fetch(*(mx.random.normal((1, 1, 40, 64), key=mx.random.key(s)) for s in (0, 1)))
        q = mx.random.normal((1, 2, 1, 64), key=mx.random.key(2))
        out = quantized_attention(q, cache, 0.125, None)  # the pure-MLX path
        ref = _STOCK_SDPA(q, *cache._dequantized(40), cache=None, scale=0.125, mask=None)
        assert mx.allclose(out, ref, atol=1e-4).item()
    finally:
        cpu._load_kernels.cache_clear()


# ------------------------------------------------------------------ quantized matmul (decode-time linears)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_matmul_equals_dequantized_gemm(bits, group_size):
    w_full = 0.05 * mx.random.normal((200, 384), key=mx.random.key(bits))
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        w, s, b = mx.quantize(w_full.astype(dtype), group_size=group_size, bits=bits)
        dense = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
        for rows in (1, 2, 3, 5):
            x = mx.random.normal((rows, 384), key=mx.random.key(rows))
            y = kernels.quantized_matmul(x, w, s, b, bits=bits, group_size=group_size)
            assert y.dtype == mx.float32 and y.shape == (rows, 200)
            assert mx.abs(y - x @ dense.T).max().item() < 1e-4


def test_quantized_matmul_gradient_wrt_x():
    w, s, b = mx.quantize(mx.random.normal((96, 128), key=mx.random.key(0)), group_size=64, bits=4)
    x = mx.random.normal((2, 128), key=mx.random.key(1))
    g = mx.grad(lambda x: (kernels.quantized_matmul(x, w, s, b, bits=4, group_size=64) ** 2).sum())(x)
    ref = mx.grad(lambda x: (mx.quantized_matmul(x, w, s, b, transpose=True) ** 2).sum())(x)
    assert mx.allclose(g, ref, rtol=1e-4, atol=1e-3).item()


def test_quantized_matmul_refuses_what_it_cannot_read():
    w, s, b = mx.quantize(mx.zeros((64, 128)), group_size=64, bits=4)
    with pytest.raises(ValueError, match="x's last dimension"):
        kernels.quantized_matmul(mx.zeros((1, 64)), w, s, b, bits=4, group_size=64)
    with pytest.raises(ValueError, match="scales/biases do not match"):
        kernels.quantized_matmul(mx.zeros((1, 128)), w, s, b, bits=4, group_size=32)
    with pytest.raises(ValueError, match="bits must be one of"):
        kernels.quantized_matmul(mx.zeros((1, 128)), w, s, b, bits=1, group_size=64)


def test_cpu_quantized_layers_use_the_kernel_for_few_rows():
    from mlx import nn

    from optiq.core.cpu import CPUQuantizedEmbedding, CPUQuantizedLinear, DEQUANT_MIN_ROWS

    linear = nn.Linear(256, 96, bias=True)
    q = nn.QuantizedLinear.from_linear(linear, group_size=64, bits=5)
    q.__class__ = CPUQuantizedLinear
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(120, 256), group_size=32, bits=4)
    emb.__class__ = CPUQuantizedEmbedding
    for rows in (1, 3, DEQUANT_MIN_ROWS):  # the last goes through dequantize + GEMM
        x = mx.random.normal((1, rows, 256), key=mx.random.key(rows))
        fast, fast_emb = q(x), emb.as_linear(x)
        with pure_mlx():
            slow, slow_emb = q(x), emb.as_linear(x)
        assert fast.shape == slow.shape == (1, rows, 96) and fast_emb.shape == (1, rows, 120)
        assert mx.allclose(fast, slow, atol=1e-4).item()
        assert mx.allclose(fast_emb, slow_emb, atol=1e-4).item()


def test_kernel_rows_window_forward_and_gradient(monkeypatch):
    """Between DEQUANT_MIN_ROWS and KERNEL_DEQUANT_MIN_ROWS rows a layer the kernels read
    goes through them (no dequantized weight in the forward pass) and its gradient in x
    through one dequantize + GEMM; from KERNEL_DEQUANT_MIN_ROWS on, dequantize + GEMM."""
    from mlx import nn

    from optiq.core import cpu

    q = nn.QuantizedLinear.from_linear(nn.Linear(256, 96, bias=False), group_size=64, bits=4)
    q.__class__ = cpu.CPUQuantizedLinear
    calls = []
    real = cpu.dequantize_rows
    monkeypatch.setattr(cpu, "dequantize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    for rows, forward_dequantizes in ((cpu.DEQUANT_MIN_ROWS, 0), (cpu.KERNEL_DEQUANT_MIN_ROWS - 1, 0),
                                      (cpu.KERNEL_DEQUANT_MIN_ROWS, 1)):
        x = mx.random.normal((rows, 256), key=mx.random.key(rows))
        calls.clear()
        y = q(x)
        mx.eval(y)
        assert len(calls) == forward_dequantizes
        w = mx.dequantize(q["weight"], q["scales"], q["biases"], group_size=64, bits=4)
        assert mx.allclose(y, x @ w.T, atol=1e-4).item()
        g = mx.grad(lambda x: (q(x) ** 2).sum())(x)
        assert mx.allclose(g, mx.grad(lambda x: ((x @ w.T) ** 2).sum())(x), atol=1e-3).item()


@pytest.mark.slow
def test_bundled_quant_decodes_the_same_with_and_without_kernels():
    from mlx_lm.generate import generate_step

    from optiq.core.model_io import load_model

    lm = load_model("bundled-quant")
    prompt = mx.array(lm.tokenizer.encode("The cynic is"))

    def greedy():
        out = []
        for (tok, logprobs), _ in zip(generate_step(prompt, lm.model, max_tokens=12), range(12)):
            out.append((int(tok), logprobs))
        return out

    fast = greedy()
    with pure_mlx():
        slow = greedy()
    assert [t for t, _ in fast] == [t for t, _ in slow]
    assert max(mx.abs(a - b).max().item() for (_, a), (_, b) in zip(fast, slow)) < 1e-3


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gather_quantized_matmul_equals_gather_qmm(bits):
    w, s, b = mx.quantize(0.05 * mx.random.normal((6, 96, 256), key=mx.random.key(0)), group_size=64, bits=bits)
    x = mx.random.normal((5, 2, 256), key=mx.random.key(1))
    idx = mx.array([0, 5, 2, 2, 3], dtype=mx.uint32)
    y = kernels.gather_quantized_matmul(x, w, s, b, idx, bits=bits, group_size=64)
    ref = mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=bits)
    assert y.shape == ref.shape == (5, 2, 96)
    assert mx.abs(y - ref).max().item() < 1e-4
    g = mx.grad(lambda x: (kernels.gather_quantized_matmul(x, w, s, b, idx, bits=bits, group_size=64) ** 2).sum())(x)
    g_ref = mx.grad(lambda x: (mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, bits=bits) ** 2).sum())(x)
    assert mx.allclose(g, g_ref, rtol=1e-4, atol=1e-3).item()
    bad = kernels.gather_quantized_matmul(x, w, s, b, mx.array([0, 9, 1, 1, 1], dtype=mx.uint32), bits=bits, group_size=64)
    assert mx.isnan(bad[1]).all().item() and not mx.isnan(bad[0]).any().item()


def test_moe_expert_pools_gather_packed_experts_when_decoding(tmp_path, monkeypatch):
    """The tiny MoE's SwitchGLU: decode (few rows per expert) through the kernel, prefill
    through the dequantized pool; both equal MLX's gather_qmm path."""
    from mlx_lm.utils import quantize_model

    from optiq.core.cpu import prepare_for_cpu
    from optiq.core.model_io import load_model
    from optiq.core.tiny_models import make_tiny_moe

    lm = load_model(make_tiny_moe(tmp_path / "moe", dtype=mx.float32))
    quantize_model(lm.model, {}, group_size=64, bits=4)
    prepare_for_cpu(lm.model, force=True)
    calls = []
    real = kernels.gather_quantized_matmul
    monkeypatch.setattr(kernels, "gather_quantized_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    for n, via_kernel in ((1, True), (40, False)):  # decode-sized and prefill-sized inputs
        calls.clear()
        ids = mx.array(list(range(3, 3 + n)))[None]
        fast = lm.model(ids)
        assert bool(calls) == via_kernel
        with pure_mlx():
            slow = lm.model(ids)
        assert mx.abs(fast - slow).max().item() < 1e-3


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_kernel_rotates_queries_and_output_for_hadamard_caches(group_size):
    from optiq.core.kv.quant import hadamard

    r = hadamard(128, group_size)
    k, v = (mx.random.normal((1, 2, 700, 128), key=mx.random.key(s)) for s in (11, 12))
    kq, vq = (mx.quantize((x @ r).astype(mx.float16), group_size=group_size, bits=4) for x in (k, v))
    q = 0.1 * mx.random.normal((1, 2, 3, 128), key=mx.random.key(13))
    f32 = mx.float32
    kd, vd = (mx.dequantize(w, s.astype(f32), b.astype(f32), group_size=group_size, bits=4) @ r for w, s, b in (kq, vq))
    ref = mx.softmax(q @ kd.swapaxes(-1, -2), axis=-1, precise=True) @ vd
    out = kernels.quantized_decode_attention(q, kq, vq, k_bits=4, v_bits=4, group_size=group_size, hadamard=True)
    assert mx.abs(out - ref).max().item() < 5e-6
