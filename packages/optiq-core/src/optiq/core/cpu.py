"""OptiQ's CPU layer path: fp32 compute, dequantize + GEMM for multi-row inputs.

On the CPU, MLX computes half precision slowly and its quantized matmul is slow for
more than a few rows (prefill, calibration, training), while ``dequantize`` + an fp32
BLAS GEMM is ~20x faster there. Single-row decode keeps the packed weights, which is
what quantization is for. The swapped layers subclass MLX's quantized layers, so
``isinstance`` checks, saving and LoRA wrapping keep working.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

# Inputs with at least this many rows are dequantized and multiplied with a GEMM
# (crossover measured on a 2-core x86 machine, 1024x1024 4-bit: qmm costs ~0.75 ms
# per row, dequantize + GEMM ~3.3 ms flat + ~0.07 ms per row).
DEQUANT_MIN_ROWS = 6


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def exp(x: mx.array) -> mx.array:
    """``e ** x``, by the fastest exact route for the device.

    MLX's CPU ``exp`` (its own polynomial) runs ~3x slower than its ``power`` (libm
    ``pow``), which is as accurate (measured: ~6e-7 vs ~9e-7 max relative error, fp32).
    Used in OptiQ's own hot paths: softmaxes over a vocabulary or a long context, decays.
    """
    if x.dtype == mx.float32 and on_cpu():
        return mx.power(mx.array(math.e, dtype=mx.float32), x)
    return mx.exp(x)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax in the input's precision (fp32 on the CPU path) using :func:`exp`."""
    e = exp(x - mx.stop_gradient(x.max(axis=axis, keepdims=True)))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Log-softmax using :func:`exp` (``x - max - log(sum(exp(x - max)))``)."""
    z = x - mx.stop_gradient(x.max(axis=axis, keepdims=True))
    return z - mx.log(exp(z).sum(axis=axis, keepdims=True))


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.ndim else 1


class CPUQuantizedLinear(nn.QuantizedLinear):
    """QuantizedLinear that dequantizes for multi-row inputs."""

    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) < DEQUANT_MIN_ROWS:
            return super().__call__(x)
        w = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        ).astype(x.dtype)
        y = x @ w.T
        if "bias" in self:
            y = y + self["bias"]
        return y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """QuantizedEmbedding whose ``as_linear`` (tied lm_head) dequantizes for many rows."""

    def as_linear(self, x: mx.array) -> mx.array:
        if _rows(x) < DEQUANT_MIN_ROWS:
            return super().as_linear(x)
        w = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        ).astype(x.dtype)
        return x @ w.T


def _switch_classes():
    try:
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    except ImportError:  # pragma: no cover - older mlx-lm
        return None

    class CPUQuantizedSwitchLinear(QuantizedSwitchLinear):
        """MoE expert pool: dequantize the pool and use gather_mm for many rows."""

        def __call__(self, x, indices, sorted_indices=False):
            if _rows(x) < DEQUANT_MIN_ROWS:
                return super().__call__(x, indices, sorted_indices=sorted_indices)
            w = mx.dequantize(
                self["weight"],
                self["scales"],
                self.get("biases"),
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
            ).astype(x.dtype)
            y = mx.gather_mm(
                x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
            )
            if "bias" in self:
                y = y + mx.expand_dims(self["bias"][indices], -2)
            return y

    return QuantizedSwitchLinear, CPUQuantizedSwitchLinear


def cast_floats(model: nn.Module, dtype: mx.Dtype = mx.float32) -> None:
    """Cast every floating-point parameter (not packed weights) to ``dtype``."""

    def cast(p):
        return p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p

    model.update(tree_map(cast, model.parameters()))


def swap_quantized_layers(model: nn.Module) -> int:
    """Replace MLX quantized layers by their CPU-path subclasses, in place."""
    swaps = [(nn.QuantizedLinear, CPUQuantizedLinear), (nn.QuantizedEmbedding, CPUQuantizedEmbedding)]
    switch = _switch_classes()
    if switch:
        swaps.append(switch)
    n = 0
    for _, module in model.named_modules():
        for base, fast in swaps:
            if type(module) is base:
                module.__class__ = fast
                n += 1
    return n


def prepare_for_cpu(model: nn.Module, force: bool = False) -> nn.Module:
    """Apply the CPU path when MLX's default device is the CPU (or ``force``)."""
    if not (force or on_cpu()):
        return model
    cast_floats(model, mx.float32)
    swap_quantized_layers(model)
    return model


def parameter_count(model: nn.Module) -> int:
    """Number of weights, counting packed quantized weights at their logical size."""
    total = 0
    for name, p in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")) and p.dtype != mx.uint32:
            continue
        total += p.size
    return total
