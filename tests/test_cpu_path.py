"""OptiQ's CPU layer path computes the same as MLX's quantized layers."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.utils import quantize_model

from optiq.core import cpu
from optiq.core.model_io import load_model


@pytest.mark.parametrize("rows", [1, cpu.DEQUANT_MIN_ROWS, 64])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_quantized_linear_matches_mlx(rows, bits):
    mx.random.seed(bits)
    q = nn.QuantizedLinear.from_linear(nn.Linear(128, 96, bias=True), 64, bits)
    q.bias = mx.random.normal((96,))
    x = mx.random.normal((2, rows, 128)) if rows > 1 else mx.random.normal((1, 128))
    ref = q(x)
    q.__class__ = cpu.CPUQuantizedLinear
    out = q(x)
    assert out.shape == ref.shape
    assert mx.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_dequantized_matmul_gradient_and_memory():
    """Same gradient in x as autodiff through dequantize + matmul, without keeping every
    layer's fp32 weight from the forward pass to the backward one."""
    mx.random.seed(0)
    layers = [nn.QuantizedLinear.from_linear(nn.Linear(512, 512), 64, 4) for _ in range(16)]
    x0 = mx.random.normal((16, 512))
    mx.eval([lay.parameters() for lay in layers], x0)

    def plain(x):
        for lay in layers:
            w = mx.dequantize(lay["weight"], lay["scales"], lay["biases"], group_size=64, bits=4)
            x = mx.tanh(x @ w.T)
        return x.sum()

    def ours(x):
        for lay in layers:
            x = mx.tanh(cpu.dequantized_matmul(lay, x))
        return x.sum()

    peaks = []
    for f in (plain, ours):
        mx.eval(x0)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        loss, g = mx.value_and_grad(f)(x0)
        mx.eval(loss, g)
        peaks.append(mx.get_peak_memory() - base)
        if f is plain:
            ref = (loss, g)
    assert abs(loss.item() - ref[0].item()) < 1e-3
    assert mx.allclose(g, ref[1], atol=1e-4, rtol=1e-4)
    w_bytes = 512 * 512 * 4
    assert peaks[0] > 14 * w_bytes  # autodiff keeps all sixteen fp32 weights
    assert peaks[1] < 7 * w_bytes  # ours: a few at a time, however many layers


def test_quantized_embedding_as_linear_matches():
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(256, 128), 64, 4)
    x = mx.random.normal((1, 32, 128))
    ref = emb.as_linear(x)
    emb.__class__ = cpu.CPUQuantizedEmbedding
    assert mx.allclose(emb.as_linear(x), ref, atol=1e-4)
    assert mx.array_equal(emb(mx.array([[1, 2, 3]])), nn.QuantizedEmbedding.__call__(emb, mx.array([[1, 2, 3]])))


def test_prepare_for_cpu_on_quantized_bundled_model():
    """Whole model: fp32 + swapped layers give the logits of fp32 + MLX's qmm."""
    ref = load_model(None, fast_cpu=False).model
    cpu.cast_floats(ref)
    quantize_model(ref, {}, group_size=64, bits=4)
    fast = load_model(None, fast_cpu=False).model
    cpu.cast_floats(fast)
    quantize_model(fast, {}, group_size=64, bits=4)
    n = cpu.swap_quantized_layers(fast)
    assert n > 0
    assert all(type(m) is not nn.QuantizedLinear for _, m in fast.named_modules())
    ids = mx.array([[(i * 31) % 500 + 3 for i in range(48)]])
    a, b = ref(ids), fast(ids)
    assert b.dtype == mx.float32
    assert mx.allclose(a, b, atol=1e-3, rtol=1e-3)


def test_load_model_applies_cpu_path():
    loaded = load_model(None)
    dtypes = {p.dtype for _, p in __import__("mlx.utils").utils.tree_flatten(loaded.model.parameters())}
    assert dtypes == {mx.float32}


def test_moe_switch_layers_match(tiny_moe_dir):
    ref = load_model(tiny_moe_dir, fast_cpu=False).model
    cpu.cast_floats(ref)
    quantize_model(ref, {}, group_size=64, bits=4)
    fast = load_model(tiny_moe_dir, fast_cpu=False).model
    cpu.cast_floats(fast)
    quantize_model(fast, {}, group_size=64, bits=4)
    cpu.swap_quantized_layers(fast)
    names = {type(m).__name__ for _, m in fast.named_modules()}
    assert "CPUQuantizedSwitchLinear" in names
    ids = mx.array([[(i * 17) % 500 + 3 for i in range(24)]])
    assert mx.allclose(ref(ids), fast(ids), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preload is Linux-only")
def test_openblas_switch():
    code = "import optiq.core, optiq.core.blas as b; print(b.loaded_openblas())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "OPTIQ_OPENBLAS": "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.strip()
    assert off == "None"
    from optiq.core.blas import find_openblas

    assert on == str(find_openblas())


@pytest.mark.parametrize("missing, warns", [
    ("optiq.kernels", False),  # the optional extra is not installed: pure MLX, quietly
    ("optiq.kernels._ext", True),  # installed but its extension was never built: say so
])
def test_only_absent_kernels_fall_back_quietly(monkeypatch, caplog, missing, warns):
    import builtins

    real_import = builtins.__import__

    def absent(name, globals=None, locals=None, fromlist=(), level=0):
        full = name if level == 0 else f"optiq.kernels.{fromlist[0]}" if fromlist else name
        if full == missing:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(name, globals, locals, fromlist, level)

    for mod in ("optiq.kernels", "optiq.kernels._ext"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.setattr(builtins, "__import__", absent)
    cpu._load_kernels.cache_clear()
    try:
        with caplog.at_level("DEBUG", logger=cpu.log.name):
            assert cpu.kernels() is None
        levels = {r.levelname for r in caplog.records if missing in r.getMessage()}
        assert levels == ({"WARNING"} if warns else {"DEBUG"})
    finally:
        cpu._load_kernels.cache_clear()


def test_sliced_dequantized_matmul_equals_whole(monkeypatch):
    mx.random.seed(0)
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(1000, 128), group_size=64, bits=4)
    emb.__class__ = cpu.CPUQuantizedEmbedding
    cpu.cast_floats(emb)
    x = mx.random.normal((2, 7, 128))
    whole = emb.as_linear(x)
    monkeypatch.setattr(cpu, "DEQUANT_SLICE_BYTES", 300 * 128 * 4)  # 4 slices, the last short
    with cpu.dequantize_in_slices():
        sliced = emb.as_linear(x)
    assert sliced.shape == whole.shape == (2, 7, 1000)
    assert mx.allclose(sliced, whole, rtol=1e-5, atol=1e-5).item()  # GEMM blocking differs by width


@pytest.mark.parametrize("padding,bias", [(0, False), (2, True)])
def test_depthwise_conv_equals_mlx_conv1d(padding, bias):
    """The CPU path's shifted multiply-adds compute what MLX's conv1d does (1 and many tokens)."""
    mx.random.seed(1)
    conv = nn.Conv1d(48, 48, 4, groups=48, padding=padding, bias=bias)
    if bias:
        conv.bias = mx.random.normal((48,))
    fast = nn.Conv1d(48, 48, 4, groups=48, padding=padding, bias=bias)
    fast.update(conv.parameters())
    assert cpu.swap_depthwise_convs(fast) == 1 and isinstance(fast, cpu.CPUDepthwiseConv1d)
    for steps in (4, 37):
        x = mx.random.normal((2, steps, 48))
        assert mx.allclose(fast(x), conv(x), rtol=1e-5, atol=1e-5).item()
    # not depthwise: left to MLX
    assert cpu.swap_depthwise_convs(nn.Conv1d(8, 16, 3)) == 0
