"""The quantizable leaves of a model and how each may be quantized.

Everything comes from module structure (``to_quantized``), the model's own
``quant_predicate`` and weight shapes, so it works for any mlx-lm architecture.
Leaves that cannot be quantized are kept with a reason, so they can be reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import mlx.nn as nn

from ..architecture import decoder_layers
from .formats import fitting_group_size

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


@dataclass
class Target:
    """One quantizable leaf (Linear, Embedding, expert pool) of a model."""

    path: str
    kind: str  # "linear" | "embedding" | "experts"
    role: str  # path inside its decoder layer, e.g. "mlp.down_proj", or "lm_head"
    layer: int | None  # decoder layer index; None for embeddings / head
    shape: tuple[int, ...]
    group_size: int | None = None  # None: cannot be quantized
    pinned: dict[str, Any] | None = None  # bits/group_size the model itself requires
    skip_reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def in_dim(self) -> int:
        return self.shape[-1]

    @property
    def quantizable(self) -> bool:
        return self.skip_reason is None


def leaf_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if module["weight"].ndim == 3:
        return "experts"
    return "linear"


def _layer_index_map(model: nn.Module) -> dict[int, int]:
    out = {}
    try:
        layers = decoder_layers(model)
    except TypeError:
        return out
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        for _, m in layer.named_modules():
            out[id(m)] = i
    return out


def find_targets(model: nn.Module, group_size: int) -> list[Target]:
    """Every leaf with ``to_quantized``, in model order, with its constraints."""
    layer_of = _layer_index_map(model)
    predicate = getattr(model, "quant_predicate", None)
    targets = []
    leaves = [(p, m) for p, m in model.named_modules() if hasattr(m, "to_quantized")][::-1]
    for path, module in leaves:
        if "weight" not in module:
            continue
        w = module["weight"]
        m = _LAYER_RE.search(path)
        role = m.group(2) if m else path.rsplit(".", 1)[-1]
        t = Target(
            path=path,
            kind=leaf_kind(module),
            role=role,
            layer=layer_of.get(id(module)),
            shape=tuple(w.shape),
        )
        choice = predicate(path, module) if predicate is not None else True
        if choice is False:
            t.skip_reason = "excluded by the model's quant_predicate"
        elif isinstance(choice, dict):
            t.pinned = {"bits": int(choice.get("bits", 8)), "group_size": int(choice.get("group_size", 64))}
            if t.in_dim % t.pinned["group_size"] != 0:
                g = fitting_group_size(t.in_dim, t.pinned["group_size"])
                if g is None:
                    t.skip_reason = f"input dim {t.in_dim} not divisible by any MLX group size"
                else:
                    t.pinned["group_size"] = g
            t.group_size = t.pinned["group_size"]
            t.notes.append(f"pinned to {t.pinned['bits']} bits by the model's quant_predicate")
        if t.skip_reason is None and t.group_size is None:
            g = fitting_group_size(t.in_dim, group_size)
            if g is None:
                t.skip_reason = (
                    f"input dim {t.in_dim} is not divisible by 32, 64 or 128 "
                    "(MLX group sizes): kept in full precision"
                )
            else:
                if g != group_size:
                    t.notes.append(
                        f"input dim {t.in_dim} not divisible by {group_size}: group size {g}"
                    )
                t.group_size = g
        targets.append(t)
    return targets


def get_module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        mod = mod[int(part)] if isinstance(mod, list) else getattr(mod, part)
    return mod
