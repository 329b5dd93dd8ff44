"""Which layers of a model carry a per-token KV cache, and their K/V shapes.

Read from the model's own cache objects (``make_prompt_cache``) and one probe token,
never from the model's name: in Qwen3.5's hybrid stack only the full-attention layers
get a ``KVCache``; Gated DeltaNet layers get an ``ArraysCache`` holding a fixed-size
recurrent state, which stays in full precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models.cache import ArraysCache, KVCache

from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import KVConfig


@dataclass(frozen=True)
class KVLayer:
    """A layer whose cache stores keys and values for every token."""

    index: int
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int

    @property
    def k_elements(self) -> int:
        """K elements stored per token (all KV heads)."""
        return self.n_kv_heads * self.k_head_dim

    @property
    def v_elements(self) -> int:
        return self.n_kv_heads * self.v_head_dim


@dataclass(frozen=True)
class SkippedLayer:
    index: int
    cache: str
    reason: str


@dataclass(frozen=True)
class KVLayout:
    """The KV-relevant shape of a model; also its identity in ``kv_config.json``."""

    model_type: str
    num_layers: int
    vocab_size: int
    kv_layers: tuple[KVLayer, ...]
    skipped: tuple[SkippedLayer, ...]

    @property
    def indices(self) -> list[int]:
        return [layer.index for layer in self.kv_layers]

    def layer(self, index: int) -> KVLayer:
        for layer in self.kv_layers:
            if layer.index == index:
                return layer
        raise KeyError(index)

    def fp16_bytes_per_token(self) -> int:
        """KV bytes per token if every K/V element were stored in fp16 (the memory reference)."""
        return sum(2 * (layer.k_elements + layer.v_elements) for layer in self.kv_layers)

    def describe(self) -> str:
        kv = ", ".join(str(i) for i in self.indices) or "none"
        return f"{self.model_type}, {self.num_layers} layers, KV layers [{kv}], vocab {self.vocab_size}"


def base_cache(model: nn.Module) -> list[Any]:
    """The cache list mlx-lm would build, ignoring any OptiQ KV config applied to ``model``."""
    original = getattr(model, "_optiq_base_make_cache", None)
    if original is not None:
        return original()
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def configured_cache(model: nn.Module, config: "KVConfig", make: Callable[..., Any]) -> list[Any]:
    """:func:`base_cache` with every configured layer's ``KVCache`` replaced by
    ``make(k_bits, v_bits, group_size, rotation=...)``; other layers stay as mlx-lm builds them."""
    cache = base_cache(model)
    if len(cache) != config.model.num_layers:
        raise ConfigError(
            f"kv config was made for a {config.model.num_layers}-layer model; this model has {len(cache)} layers"
        )
    for idx, (kb, vb) in config.layers.items():
        if not isinstance(cache[idx], KVCache):
            raise ConfigError(f"kv config sets bits for layer {idx}, which has no KV cache ({type(cache[idx]).__name__})")
        cache[idx] = make(kb, vb, config.group_size, rotation=config.rotation)
    return cache


def _skip_reason(cache: Any) -> str:
    if isinstance(cache, ArraysCache):
        return "fixed-size recurrent state (linear attention / SSM): kept in full precision"
    name = type(cache).__name__
    if hasattr(cache, "keys"):
        return f"{name} (sliding-window or chunked KV) is not supported by the mixed cache: kept as is"
    return f"{name} holds no per-token keys/values: kept as is"


def model_type(model: nn.Module) -> str:
    mt = getattr(model, "model_type", None)
    if mt is None and hasattr(model, "args"):
        mt = getattr(model.args, "model_type", None)
    return str(mt or type(model).__module__.rsplit(".", 1)[-1])


def kv_layout(model: nn.Module) -> KVLayout:
    """Classify every layer's cache and measure K/V shapes with a one-token forward pass."""
    caches = base_cache(model)
    kv_idx = [i for i, c in enumerate(caches) if isinstance(c, KVCache)]
    skipped = tuple(
        SkippedLayer(i, type(c).__name__, _skip_reason(c))
        for i, c in enumerate(caches)
        if i not in kv_idx
    )
    logits = model(mx.array([[0]]), cache=caches)
    mx.eval(logits, [caches[i].state for i in kv_idx])
    layers = tuple(
        KVLayer(
            index=i,
            n_kv_heads=int(caches[i].keys.shape[1]),
            k_head_dim=int(caches[i].keys.shape[-1]),
            v_head_dim=int(caches[i].values.shape[-1]),
        )
        for i in kv_idx
    )
    return KVLayout(
        model_type=model_type(model),
        num_layers=len(caches),
        vocab_size=int(logits.shape[-1]),
        kv_layers=layers,
        skipped=skipped,
    )


def require_kv_layers(layout: KVLayout) -> None:
    """Raise a clear error for models with nothing to configure."""
    if not layout.kv_layers:
        kinds = sorted({s.cache for s in layout.skipped})
        raise ConfigError(
            f"this model ({layout.model_type}) has no layer with a per-token KV cache "
            f"(its caches are: {', '.join(kinds) or 'none'}), so there is no KV cache to quantize"
        )
