"""What serving a model will cost in memory, estimated from its files before loading.

On the CPU, OptiQ computes in fp32 (:mod:`optiq.core.cpu`): every floating-point tensor
(norms, quantization scales and biases, and all weights of an unquantized model) is
held in fp32, twice a bf16 checkpoint's bytes, while packed quantized weights stay
packed and are dequantized one layer (or one vocabulary slice) at a time for prefill.
A server that outgrows memory is killed by the kernel with no message, so the estimate
(the safetensors headers and config.json only, nothing allocated) is compared with the
memory available, or ``--max-memory``, before anything loads; over it, serving stops
with a :class:`optiq.core.errors.MemoryBudgetError` naming the parts and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optiq.core.errors import MemoryBudgetError
from optiq.core.memory import BASE_BYTES, GB, describe_parts, memory_limit

from .config import ServeConfig

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# Live fp32 activations of one prefill step, in units of step x widest projection
# (input, output, the MLP's gate and up, the residual) — a generous round figure.
_ACTIVATION_COPIES = 6


@dataclass
class Footprint:
    """The estimated peak of a server, by part, against the limit it must stay under."""

    parts: dict[str, int]  # bytes
    limit: int
    fp32: bool  # the CPU path: floats held in fp32
    capped: bool  # the limit is the user's --max-memory

    @property
    def peak(self) -> int:
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        held = "in the CPU's fp32 compute path" if self.fp32 else "as stored"
        cap = "--max-memory" if self.capped else "available"
        return (f"weights {self.parts['weights'] / GB:.2f} GB {held}; about {self.peak / GB:.2f} GB "
                f"peak ({describe_parts(self.parts)}); limit {self.limit / GB:.2f} GB {cap}")

    def check(self) -> None:
        """Raise :class:`MemoryBudgetError` (one actionable line) when over the limit."""
        if self.peak <= self.limit:
            return
        tips = ["lower --max-context", "lower --prompt-cache-bytes", "serve a quantized model (optiq convert)"]
        tips.append("raise --max-memory" if self.capped else "free memory")
        raise MemoryBudgetError(f"the model will not fit in memory to serve: {self.describe()}: {', '.join(tips)}")


def _tensors(model_dir: Path) -> dict[str, tuple[str, list[int]]]:
    from optiq.core.model_io import safetensors_header

    out: dict[str, tuple[str, list[int]]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for name, v in safetensors_header(f).items():
            if name != "__metadata__":
                out[name] = (v["dtype"], list(v["shape"]))
    return out


def _quant_bits(config: dict[str, Any], path: str) -> int:
    q = config.get("quantization") or {}
    own = q.get(path)
    return int((own if isinstance(own, dict) else q).get("bits", 4))


def _weights(tensors: dict[str, tuple[str, list[int]]], config: dict[str, Any],
             fp32: bool) -> tuple[int, int, int]:
    """(resident bytes, largest dequantized fp32 layer, widest projection) of the model."""
    resident = largest = widest = 0
    for name, (dtype, shape) in tensors.items():
        n = math.prod(shape)
        path = name.removesuffix(".weight")
        packed = dtype == "U32" and f"{path}.scales" in tensors
        if dtype in _FLOATS and fp32:
            resident += n * 4
        else:
            resident += n * _DTYPE_BYTES.get(dtype, 4)
        if len(shape) >= 2 and name.endswith(".weight"):
            cols = shape[-1] * 32 // _quant_bits(config, path) if packed else shape[-1]
            if packed and fp32:
                largest = max(largest, math.prod(shape[:-1]) * cols * 4)
            widest = max(widest, shape[-2], cols) if "embed" not in name else widest
    return resident, largest, widest


def _cache_bytes(cfg: dict[str, Any], context: int, elem: int) -> int:
    """One request's cache at ``context`` tokens: K and V of every full-attention layer,
    the fixed recurrent state of every linear-attention (Gated DeltaNet) layer."""
    layers = int(cfg.get("num_hidden_layers") or 0)
    kinds = cfg.get("layer_types") or []
    if not kinds and cfg.get("full_attention_interval"):
        every = int(cfg["full_attention_interval"])
        kinds = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
    n_linear = sum(k == "linear_attention" for k in kinds)
    n_full = layers - n_linear
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg.get("hidden_size") or 0) // heads)
    full = n_full * 2 * kv_heads * head_dim * context * elem
    hv, dk, dv = (int(cfg.get(k) or 0) for k in
                  ("linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"))
    hk = int(cfg.get("linear_num_key_heads") or 0)
    conv = (int(cfg.get("linear_conv_kernel_dim") or 4) - 1) * (2 * hk * dk + hv * dv)
    return full + n_linear * (hv * dv * dk + conv) * 4


def estimate(model_dir: Path, config: dict[str, Any], serve: ServeConfig, *, cpu: bool) -> Footprint:
    """The server's peak for ``model_dir`` (its ``config.json`` as ``config``) under ``serve``.

    Parts: the weights as the compute path holds them; the largest layer dequantized to
    fp32 for a prefill (the vocabulary-sized table is dequantized in slices of at most
    :data:`optiq.core.cpu.DEQUANT_SLICE_BYTES`); one prefill step's activations; one
    request's cache at the full context (fp32 on the CPU: an upper bound, a KV config
    stores less); the prefix cache's budget; the runtime itself.
    """
    from optiq.core.cpu import DEQUANT_SLICE_BYTES
    from optiq.core.model_io import text_config

    from .modelinfo import DEFAULT_CONTEXT_LENGTH
    from .prefix_cache import default_max_bytes

    cfg = text_config(config)
    resident, largest, widest = _weights(_tensors(model_dir), config, fp32=cpu)
    context = int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH)
    if serve.max_context is not None:
        context = min(context, serve.max_context)
    step = serve.prefill_step_size
    heads = int(cfg.get("num_attention_heads") or 1)
    limit = memory_limit(serve.max_memory_gb)
    budget = serve.prompt_cache_budget()
    parts = {
        "weights": resident,
        # MLX's dequantize peaks at twice its output
        "largest dequantized layer": 2 * min(largest, DEQUANT_SLICE_BYTES),
        "prefill activations": step * widest * 4 * _ACTIVATION_COPIES + step * step * heads * 4,
        f"cache per request at {context} tokens": _cache_bytes(cfg, context, 4 if cpu else 2),
        "prompt cache": default_max_bytes() if budget is None else budget,
        "runtime": BASE_BYTES,
    }
    return Footprint(parts=parts, limit=limit, fp32=cpu, capped=serve.max_memory_gb is not None)
