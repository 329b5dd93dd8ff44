"""What a loaded model is made of: decoder layers, their kinds, caches and quantization.

Everything is read from module structure and cache objects, never from model names, so
it works for any architecture mlx-lm implements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# Attribute names of the token mixer in mlx-lm decoder layers, most specific first.
MIXER_KINDS = (
    ("linear_attn", "linear_attention"),
    ("mamba", "ssm"),
    ("mixer", "ssm"),
    ("self_attn", "full_attention"),
    ("attention", "full_attention"),
    ("attn", "full_attention"),
)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks in order (mlx-lm models expose ``.layers``)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} exposes no .layers")
    return list(layers)


def layer_kind(layer: nn.Module) -> str:
    """``linear_attention`` (e.g. Gated DeltaNet), ``full_attention``, ``ssm`` or ``other``."""
    if getattr(layer, "is_linear", None) is True:
        return "linear_attention"
    for attr, kind in MIXER_KINDS:
        if attr in layer:
            return kind
    return "other"


def make_cache(model: nn.Module) -> list[Any]:
    """The per-layer cache objects mlx-lm would use for this model."""
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def is_quantizable(module: nn.Module) -> bool:
    """Leaves mlx-lm's ``quantize_model`` can convert (Linear, Embedding, SwitchLinear...)."""
    return hasattr(module, "to_quantized")


def quantizable_leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every quantizable leaf, in model order."""
    return [(p, m) for p, m in model.named_modules() if is_quantizable(m)][::-1]


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of leaves that are already quantized (they carry ``scales``)."""
    return [(p, m) for p, m in model.named_modules() if "scales" in m and hasattr(m, "bits")][::-1]


def logical_size(module: nn.Module) -> int:
    """Number of weights a (possibly quantized) leaf represents, scales excluded."""
    if "scales" in module and hasattr(module, "bits"):
        w = module["weight"]
        return w.size * 32 // module.bits + (module["bias"].size if "bias" in module else 0)
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def parameter_count(model: nn.Module) -> int:
    """Logical parameter count: packed quantized weights count as unpacked weights."""
    total = 0
    quantized = {p for p, _ in quantized_modules(model)}
    for path, m in quantized_modules(model):
        total += logical_size(m)
    for name, p in tree_flatten(model.parameters()):
        owner = name.rsplit(".", 1)[0]
        if owner in quantized:
            continue
        total += p.size
    return total


@dataclass(frozen=True)
class LayerInfo:
    index: int
    kind: str
    cache: str
    params: int
    bits: tuple[int, ...]  # distinct bit widths of quantized leaves in this layer (empty: float)


def describe_layers(model: nn.Module) -> list[LayerInfo]:
    """One :class:`LayerInfo` per decoder layer."""
    caches = make_cache(model)
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        bits = sorted({m.bits for _, m in quantized_modules(layer)})
        out.append(
            LayerInfo(
                index=i,
                kind=layer_kind(layer),
                cache=type(caches[i]).__name__ if i < len(caches) else "-",
                params=parameter_count(layer),
                bits=tuple(bits),
            )
        )
    return out


def weight_dtype(model: nn.Module) -> str:
    """The dominant floating dtype of the model's parameters."""
    counts: dict[str, int] = {}
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            key = str(p.dtype).replace("mlx.core.", "")
            counts[key] = counts.get(key, 0) + p.size
    return max(counts, key=counts.get) if counts else "unknown"
