"""OptiQ's CPU layer path: fp32 compute, dequantize + GEMM for multi-row inputs.

On the CPU, MLX computes half precision slowly and its quantized matmul is slow for
more than a few rows (prefill, calibration, training), while ``dequantize`` + an fp32
BLAS GEMM is ~20x faster there. Single-row decode keeps the packed weights, which is
what quantization is for: with ``optiq-kernels`` installed (:func:`kernels`), through
its fused CPU kernel (~10x MLX's quantized matmul for one row), else MLX's. The swapped
layers subclass MLX's quantized layers, so ``isinstance`` checks, saving and LoRA
wrapping keep working.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

# Inputs with at least this many rows are dequantized and multiplied with a GEMM
# (crossover measured on a 2-core x86 machine, 1024x1024 4-bit: qmm costs ~0.75 ms
# per row, dequantize + GEMM ~3.3 ms flat + ~0.07 ms per row).
DEQUANT_MIN_ROWS = 6


log = logging.getLogger(__name__)

# Widths and group sizes optiq-kernels reads (MLX's affine mode).
KERNEL_BITS = (2, 3, 4, 5, 6, 8)
KERNEL_GROUP_SIZES = (32, 64, 128)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


_PURE_MLX = [0]  # > 0 inside pure_mlx()


@contextmanager
def pure_mlx():
    """Run without ``optiq.kernels`` inside this block (benchmarks and tests compare both)."""
    _PURE_MLX[0] += 1
    try:
        yield
    finally:
        _PURE_MLX[0] -= 1


def kernels() -> Any:
    """``optiq.kernels`` when it is installed and loads, else None (pure-MLX fallback).

    ``OPTIQ_KERNELS=0`` in the environment turns the kernels off for the whole process.
    """
    return None if _PURE_MLX[0] else _load_kernels()


@lru_cache(maxsize=None)
def _load_kernels() -> Any:
    if os.environ.get("OPTIQ_KERNELS", "1") == "0":
        return None
    # optiq-kernels is an optional extra (optiq-core[kernels]): only its absence is quiet.
    try:
        import optiq.kernels as k
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "optiq.kernels":
            log.debug("optiq.kernels is not installed, using pure MLX: %s", e)
        else:  # installed but unusable (not built, built for another MLX): say so
            log.warning("optiq.kernels did not load, falling back to pure MLX (slower on the CPU): %s", e)
        return None
    return k


def compute_summary() -> dict[str, Any]:
    """Where OptiQ computes in this process: device, BLAS, kernels (for ``optiq info``)."""
    from .blas import loaded_openblas

    k = kernels()
    cpu = on_cpu()
    return {
        "device": "cpu" if cpu else str(mx.default_device()),
        "mlx": mx.__version__,
        "openblas": loaded_openblas() if cpu else None,
        "optiq_kernels": ({"threads": k.threads()} if k is not None else None) if cpu else None,
    }


def describe_compute(summary: dict[str, Any]) -> str:
    """One line for :func:`compute_summary`."""
    if summary["device"] != "cpu":
        return f"{summary['device']} (MLX {summary['mlx']}): MLX's own kernels"
    blas = f"OpenBLAS {summary['openblas']}" if summary["openblas"] else "MLX's reference BLAS (no OpenBLAS found)"
    k = summary["optiq_kernels"]
    kern = f"optiq-kernels ({k['threads']} threads)" if k else "no optiq-kernels (pure-MLX decode: slower)"
    return f"CPU, fp32 (MLX {summary['mlx']}); {blas}; {kern}"


def _kernels_for(layer: nn.Module, x: mx.array) -> Any:
    """``optiq.kernels`` if it is loaded and can read this quantized layer's format, else None."""
    k = kernels()
    if (
        k is None
        or not on_cpu()
        or getattr(layer, "mode", "affine") != "affine"
        or getattr(layer, "global_scale", None) is not None
        or layer.bits not in KERNEL_BITS
        or layer.group_size not in KERNEL_GROUP_SIZES
        or "biases" not in layer
        or not mx.issubdtype(x.dtype, mx.floating)
    ):
        return None
    return k


def _kernel_matmul(layer: nn.Module, x: mx.array) -> mx.array | None:
    """``x @ dequantize(W).T`` of a quantized layer through optiq-kernels, or None when
    the kernels are unavailable or cannot read this layer's format."""
    k = _kernels_for(layer, x)
    if k is None:
        return None
    w = layer["weight"]
    y = k.quantized_matmul(
        x.reshape(-1, x.shape[-1]), w, layer["scales"], layer["biases"], bits=layer.bits, group_size=layer.group_size
    )
    return y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype)


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


def _dequantized(layer: nn.Module, after: mx.array) -> mx.array:
    """The layer's weight dequantized to ``after``'s dtype, computed only once ``after`` is.

    Without the dependency MLX may schedule every layer's dequantize (their inputs are
    all ready) before the first product runs, holding all of them in fp32 at once.
    """
    w, scales, biases = mx.depends([layer["weight"], layer["scales"], layer.get("biases", layer["scales"])], [after])
    return mx.dequantize(
        w, scales, biases if "biases" in layer else None,
        group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
    ).astype(after.dtype)


def dequantized_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """``x @ W^T`` for a quantized layer: dequantize + GEMM, with a backward pass that
    dequantizes again instead of keeping the fp32 ``W`` from the forward pass.

    A training step through N blocks would otherwise hold N blocks of fp32 weights until
    the backward pass reaches them (1.1 GB at 0.8B); this way one is alive at a time.
    Differentiable in ``x`` only: the packed weights are frozen (gradients to them are
    zero; OptiQ trains adapters beside them, never the packed weights).
    """

    @mx.custom_function
    def matmul(x):
        return x @ _dequantized(layer, x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        return (cotangent @ _dequantized(layer, cotangent),)

    return matmul(x)


class CPUQuantizedLinear(nn.QuantizedLinear):
    """QuantizedLinear that dequantizes for multi-row inputs (optiq-kernels for a few rows)."""

    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) < DEQUANT_MIN_ROWS:
            y = _kernel_matmul(self, x)
            if y is None:
                return super().__call__(x)
            return y + self["bias"] if "bias" in self else y
        y = dequantized_matmul(self, x)
        if "bias" in self:
            y = y + self["bias"]
        return y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """QuantizedEmbedding whose ``as_linear`` (tied lm_head) dequantizes for many rows."""

    def as_linear(self, x: mx.array) -> mx.array:
        if _rows(x) < DEQUANT_MIN_ROWS:
            y = _kernel_matmul(self, x)
            return super().as_linear(x) if y is None else y
        w = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        ).astype(x.dtype)
        return x @ w.T


def _kernel_gather_matmul(layer: nn.Module, x: mx.array, indices: mx.array) -> mx.array | None:
    """mlx's ``gather_qmm(x, W, rhs_indices=indices, transpose=True)`` through optiq-kernels
    (x [..., rows, K] broadcast against indices [...]), or None when it cannot."""
    k = _kernels_for(layer, x)
    if k is None:
        return None
    batch = mx.broadcast_shapes(x.shape[:-2], indices.shape)
    rows, K = x.shape[-2:]
    T = math.prod(batch)
    xb = mx.broadcast_to(x, (*batch, rows, K)).reshape(T, rows, K)
    y = k.gather_quantized_matmul(
        xb, layer["weight"], layer["scales"], layer["biases"], mx.broadcast_to(indices, batch).reshape(T),
        bits=layer.bits, group_size=layer.group_size,
    )
    return y.reshape(*batch, rows, -1).astype(x.dtype)


def _switch_classes() -> tuple[type, type]:
    from .mlx_lm_seam import switch_linear_class

    QuantizedSwitchLinear = switch_linear_class()  # its __call__ signature checked

    class CPUQuantizedSwitchLinear(QuantizedSwitchLinear):
        """MoE expert pool: dequantize the pool and use gather_mm when the experts get many
        rows on average; otherwise gather the packed experts (optiq-kernels, else MLX)."""

        def __call__(self, x, indices, sorted_indices=False):
            # (row, expert) products: dequantizing the whole pool pays off only when each
            # expert gets DEQUANT_MIN_ROWS of them on average (prefill), not when decoding.
            pairs = math.prod(mx.broadcast_shapes(x.shape[:-2], indices.shape)) * x.shape[-2]
            if pairs < DEQUANT_MIN_ROWS * self.num_experts:
                y = _kernel_gather_matmul(self, x, indices)
                if y is None:
                    return super().__call__(x, indices, sorted_indices=sorted_indices)
                return y + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else y
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
    swaps.append(_switch_classes())
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
