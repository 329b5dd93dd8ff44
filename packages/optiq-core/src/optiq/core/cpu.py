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
# optiq-kernels' packed matmul reads 4-8x fewer bytes than a dequantized fp32 weight and
# stays faster than dequantize + GEMM up to ~128 rows (measured on a 2-core x86 machine,
# 4-bit group 64, 1024x3584 and 3584x1024: equal at ~128 rows, 1.6x faster at 64). Layers
# the kernels read use them below this many rows: batched decode and short prefills.
KERNEL_DEQUANT_MIN_ROWS = 96
# Inside dequantize_in_slices(), a weight larger than this in fp32 (the vocabulary-sized
# embedding / tied head: 1 GB at 248,320 x 1,024) is dequantized and multiplied in slices
# of output rows of at most this size: no whole vocabulary-sized fp32 table in memory.
DEQUANT_SLICE_BYTES = 64 << 20


log = logging.getLogger(__name__)

# Widths and group sizes optiq-kernels reads (MLX's affine mode).
KERNEL_BITS = (2, 3, 4, 5, 6, 8)
KERNEL_GROUP_SIZES = (32, 64, 128)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


_PURE_MLX = [0]  # > 0 inside pure_mlx()
_SLICED = [0]  # > 0 inside dequantize_in_slices()


@contextmanager
def _raised(counter: list[int]):
    counter[0] += 1
    try:
        yield
    finally:
        counter[0] -= 1


def pure_mlx():
    """Run without ``optiq.kernels`` inside this block (benchmarks and tests compare both)."""
    return _raised(_PURE_MLX)


def dequantize_in_slices():
    """Inside this block, a many-row matmul with a quantized weight over
    :data:`DEQUANT_SLICE_BYTES` in fp32 dequantizes it slice by slice, each evaluated
    before the next, so memory holds one slice (inference: the server's engine thread).
    Off by default: an evaluation mid-graph is not allowed under ``mx.compile``."""
    return _raised(_SLICED)


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
    the kernels are unavailable or cannot read this layer's format.

    The gradient with respect to ``x`` (LoRA on a frozen quantized base) is
    ``g @ dequantize(W)``: the kernels' own vjp uses MLX's quantized matmul, fast for a
    few rows only, so inputs of :data:`DEQUANT_MIN_ROWS` rows or more get a dequantize +
    GEMM backward instead."""
    k = _kernels_for(layer, x)
    if k is None:
        return None
    w = layer["weight"]

    def forward(x):
        y = k.quantized_matmul(
            x.reshape(-1, x.shape[-1]), w, layer["scales"], layer["biases"], bits=layer.bits, group_size=layer.group_size
        )
        return y.reshape(*x.shape[:-1], w.shape[0]).astype(x.dtype)

    if _rows(x) < DEQUANT_MIN_ROWS:
        return forward(x)
    matmul = mx.custom_function(forward)

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        return (cotangent @ dequantize_rows(layer, slice(None), cotangent.dtype, after=cotangent),)

    return matmul(x)


def _use_kernels(layer: nn.Module, x: mx.array) -> bool:
    """Whether a call of ``layer`` on ``x`` goes through the packed weights (few rows)
    rather than dequantize + GEMM: :data:`DEQUANT_MIN_ROWS` for MLX's own quantized
    matmul, :data:`KERNEL_DEQUANT_MIN_ROWS` where optiq-kernels read the layer; never
    while :func:`keep_dequantized` holds the dense weight."""
    rows = _rows(x)
    if rows < DEQUANT_MIN_ROWS:
        return True
    if rows >= KERNEL_DEQUANT_MIN_ROWS or id(layer) in _DENSE:
        return False
    return _kernels_for(layer, x) is not None


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


def dequantize_rows(layer: nn.Module, rows: slice | mx.array, dtype: mx.Dtype,
                    after: mx.array | None = None) -> mx.array:
    """Rows ``rows`` (a slice or token ids) of the layer's weight as ``dtype``, dequantized
    if the layer is packed; with ``after``, computed only once ``after`` is (else MLX may
    schedule every layer's dequantize -- their inputs are all ready -- before the first
    product runs, holding all of them in fp32 at once)."""
    names = [n for n in ("weight", "scales", "biases") if n in layer]
    parts = [layer[n][rows] for n in names]
    if after is not None:
        parts = mx.depends(parts, [after])
    p = dict(zip(names, parts))
    if "scales" not in p:
        return p["weight"].astype(dtype)
    return mx.dequantize(
        p["weight"], p["scales"], p.get("biases"),
        group_size=layer.group_size, bits=layer.bits, mode=getattr(layer, "mode", "affine"),
    ).astype(dtype)


def dequantized_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """``x @ W^T`` for a quantized layer and many rows: dequantize + GEMM in ``x``'s precision.

    - Inside :func:`keep_dequantized`: the held dense weight.
    - Inside :func:`dequantize_in_slices` (inference on the engine thread): over slices of
      W's output rows of at most :data:`DEQUANT_SLICE_BYTES` each, evaluated one after the
      other (MLX's ``dequantize`` peaks at twice its output: ~2 slices live at once).
    - Otherwise with a backward pass that dequantizes again instead of keeping the fp32
      ``W`` from the forward pass: a training step through N blocks would hold N blocks of
      fp32 weights until the backward pass reaches them (1.1 GB at 0.8B); this way one is
      alive at a time. Differentiable in ``x`` only: the packed weights are frozen (OptiQ
      trains adapters beside them, never the packed weights).
    """
    held = _DENSE.get(id(layer))
    if held is not None:
        return x @ held.astype(x.dtype).T
    out = layer["weight"].shape[0]
    cols = layer["weight"].shape[1] * 32 // layer.bits
    step = max(1, DEQUANT_SLICE_BYTES // (cols * x.dtype.size))
    if _SLICED[0] and out > step:
        ys = []
        for a in range(0, out, step):
            ys.append(x @ dequantize_rows(layer, slice(a, a + step), x.dtype).T)
            if len(ys) > 1:  # keep the graph from dequantizing every slice before the first GEMM
                mx.eval(ys[-2])
        return mx.concatenate(ys, axis=-1)

    @mx.custom_function
    def matmul(x):
        return x @ dequantize_rows(layer, slice(None), x.dtype, after=x).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        return (cotangent @ dequantize_rows(layer, slice(None), cotangent.dtype, after=cotangent),)

    return matmul(x)


# id(layer) -> its dequantized weight, while a ``keep_dequantized`` block holds it.
_DENSE: dict[int, mx.array] = {}


def dequantized_weight(layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    """A quantized layer's weight as ``dtype`` (the one :func:`keep_dequantized` holds, if any)."""
    w = _DENSE.get(id(layer))
    return dequantize_rows(layer, slice(None), dtype) if w is None else w.astype(dtype)


@contextmanager
def keep_dequantized(modules: list[nn.Module], dtype: mx.Dtype = mx.float32):
    """Dequantize the quantized layers among ``modules`` (and their children) once for the
    ``with`` block, instead of once per multi-row call: for a pass that calls the same
    layer many times (e.g. a vocabulary-sized head over token chunks). Results are
    unchanged; the dense weights take ``4 x parameters`` bytes (fp32) meanwhile."""
    held = []
    for module in modules:
        for _, m in module.named_modules():
            if isinstance(m, (CPUQuantizedLinear, CPUQuantizedEmbedding)) and id(m) not in _DENSE:
                w = dequantized_weight(m, dtype)
                mx.eval(w)
                _DENSE[id(m)] = w
                held.append(id(m))
    try:
        yield
    finally:
        for i in held:
            _DENSE.pop(i, None)


class CPUQuantizedLinear(nn.QuantizedLinear):
    """QuantizedLinear that dequantizes for multi-row inputs (optiq-kernels for a few rows)."""

    def __call__(self, x: mx.array) -> mx.array:
        if _use_kernels(self, x):
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
        if _use_kernels(self, x):
            y = _kernel_matmul(self, x)
            return super().as_linear(x) if y is None else y
        return dequantized_matmul(self, x)


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
            w = dequantized_weight(self, x.dtype)
            y = mx.gather_mm(
                x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
            )
            if "bias" in self:
                y = y + mx.expand_dims(self["bias"][indices], -2)
            return y

    return QuantizedSwitchLinear, CPUQuantizedSwitchLinear


class CPUDepthwiseConv1d(nn.Conv1d):
    """Depthwise ``Conv1d`` (one filter per channel: Gated DeltaNet's 4-tap conv) as
    ``kernel_size`` shifted multiply-adds. MLX's CPU ``conv1d`` is slow for it: measured
    at the 0.8B Qwen3.5 width (6,144 channels, 4 taps), 2.3 ms vs 0.35 ms for one decode
    token and 293 ms vs 65 ms for 512 prefill tokens; equal to fp32 rounding."""

    def __call__(self, x: mx.array) -> mx.array:
        w = self["weight"]  # [channels, kernel, 1]
        if self.padding:
            x = mx.pad(x, [(0, 0), (self.padding, self.padding), (0, 0)])
        k = w.shape[1]
        t = x.shape[1] - k + 1
        y = x[:, :t] * w[:, 0, 0]
        for i in range(1, k):
            y = y + x[:, i:i + t] * w[:, i, 0]
        return y + self["bias"] if "bias" in self else y


def _is_depthwise(module: nn.Module) -> bool:
    w = module["weight"]
    return (module.groups == w.shape[0] and w.shape[-1] == 1 and module.stride == 1
            and module.dilation == 1)


def swap_depthwise_convs(model: nn.Module) -> int:
    """Replace depthwise ``nn.Conv1d`` layers by :class:`CPUDepthwiseConv1d`, in place."""
    n = 0
    for _, module in model.named_modules():
        if type(module) is nn.Conv1d and _is_depthwise(module):
            module.__class__ = CPUDepthwiseConv1d
            n += 1
    return n


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
    swap_depthwise_convs(model)
    return model


def parameter_count(model: nn.Module) -> int:
    """Number of weights, counting packed quantized weights at their logical size."""
    total = 0
    for name, p in tree_flatten(model.parameters()):
        if name.endswith((".scales", ".biases")) and p.dtype != mx.uint32:
            continue
        total += p.size
    return total
