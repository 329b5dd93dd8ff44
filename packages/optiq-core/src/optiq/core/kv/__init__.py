"""Mixed-precision KV cache: sensitivity pass, bit allocation, config file and cache.

Runtime API (what ``optiq serve`` / ``optiq eval`` use)::

    from optiq.core.kv import load_kv_config, make_kv_cache, apply_kv_config

    cfg = load_kv_config("out/kv_config.json", model)   # validated against the model
    cache = make_kv_cache(model, cfg)                   # one stream: pass as prompt_cache=
    apply_kv_config(model, cfg)                         # or: every cache mlx-lm builds for
                                                        # this model (generate_step,
                                                        # BatchGenerator, ...) is mixed
    logits = model(tokens, cache=make_simulated_kv_cache(model, cfg))
                                                        # teacher-forced scoring as if decoded
                                                        # through the cache (perplexity, KL)
    make_cache = kv_cache_factory("out/kv_config.json")  # the same, as evaluate's make_cache=
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx import nn
from mlx_lm.models.cache import KVCache, save_prompt_cache

from ..affine import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .attention import install_attention, mixed_attention, uninstall_attention
from .cache import BatchMixedKVCache, MixedKVCache
from .config import KVConfig, check_matches_model, load_kv_config, save_kv_config, uniform_kv_config
from .layers import KVLayout, configured_cache, kv_layout
from .quant import bits_per_element
from .simulate import SimulatedKVCache, make_simulated_kv_cache

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "BatchMixedKVCache",
    "KVConfig",
    "KVLayout",
    "MixedKVCache",
    "SimulatedKVCache",
    "apply_kv_config",
    "bits_per_element",
    "install_attention",
    "kv_cache_factory",
    "kv_layout",
    "load_kv_config",
    "load_prompt_cache",
    "make_kv_cache",
    "make_simulated_kv_cache",
    "mixed_attention",
    "remove_kv_config",
    "save_kv_config",
    "save_prompt_cache",
    "uniform_kv_config",
    "uninstall_attention",
]


def make_kv_cache(model: nn.Module, config: KVConfig, fast_attention: bool = True) -> list[Any]:
    """The model's cache list with every configured layer's ``KVCache`` replaced by a
    :class:`MixedKVCache` at that layer's (k_bits, v_bits) and the config's rotation. Other layers (e.g. Gated
    DeltaNet ``ArraysCache``) are left as mlx-lm builds them.

    ``fast_attention`` routes decode-step attention over the packed codes (see
    :mod:`optiq.core.kv.attention`); without it attention reads dequantized K/V.
    """
    cache = configured_cache(model, config, MixedKVCache)
    if fast_attention:
        install_attention(model)
    return cache


def apply_kv_config(model: nn.Module, config: KVConfig, validate: bool = True, fast_attention: bool = True) -> nn.Module:
    """Make ``model.make_cache()`` (used by every mlx-lm generation path, including
    ``BatchGenerator``) return mixed-precision caches for ``config``. Reversible with
    :func:`remove_kv_config`."""
    if validate:
        check_matches_model(config, kv_layout(model))
    if getattr(model, "_optiq_base_make_cache", None) is None:
        original = getattr(model, "make_cache", None)
        if original is None:
            n = len(model.layers)
            original = lambda: [KVCache() for _ in range(n)]
        model._optiq_base_make_cache = original
    model._optiq_kv_config = config
    model.make_cache = lambda: make_kv_cache(model, config, fast_attention=fast_attention)
    if fast_attention:
        install_attention(model)
    return model


def remove_kv_config(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_kv_config`: the model builds its stock caches again."""
    if getattr(model, "_optiq_base_make_cache", None) is not None:
        for name in ("make_cache", "_optiq_base_make_cache", "_optiq_kv_config"):
            if name in model.__dict__:
                delattr(model, name)
    return model


def kv_cache_factory(config: str | Path | KVConfig, *, simulate: bool = True) -> Callable[[nn.Module], list[Any]]:
    """A ``make_cache(model) -> list`` callable for evaluation code.

    The config (a path, or an already-loaded :class:`KVConfig`) is schema-checked now and
    checked against the model on first use. ``simulate=True`` (default) gives
    :func:`make_simulated_kv_cache` caches: teacher-forced scoring then sees exactly what
    token-by-token decoding through the mixed cache sees, whatever the chunking.
    ``simulate=False`` gives the real :func:`make_kv_cache` caches.
    """
    cfg = config if isinstance(config, KVConfig) else load_kv_config(config)
    checked: set[int] = set()

    def make_cache(model: nn.Module) -> list[Any]:
        if id(model) not in checked:
            check_matches_model(cfg, kv_layout(model))
            checked.add(id(model))
        return make_simulated_kv_cache(model, cfg) if simulate else make_kv_cache(model, cfg)

    return make_cache


def applied_kv_config(model: nn.Module) -> KVConfig | None:
    """The config :func:`apply_kv_config` attached to ``model``, if any."""
    return getattr(model, "_optiq_kv_config", None)


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """Like mlx-lm's ``load_prompt_cache``, but also restores OptiQ mixed caches.

    (``save_prompt_cache`` is mlx-lm's own: our caches keep their bits in ``state``.)
    """
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.models import cache as mlx_cache

    arrays, meta = mx.load(file_name, return_metadata=True)
    metadata, classes, scalars = tree_unflatten(list(meta.items()))
    for pos, kind in scalars[1:]:
        a = arrays[pos]
        if kind == "scalar":
            arrays[pos] = a.item()
        elif kind == "string":
            arrays[pos] = "".join(chr(i) for i in a.tolist())
        elif kind == "none":
            arrays[pos] = None
        else:
            raise ValueError(f"unknown prompt-cache scalar type {kind}")
    states = tree_unflatten(list(arrays.items()))
    ours = {"MixedKVCache": MixedKVCache, "BatchMixedKVCache": BatchMixedKVCache}
    cache = [
        (ours.get(c) or getattr(mlx_cache, c)).from_state(state) for c, state in zip(classes, states)
    ]
    return (cache, metadata) if return_metadata else cache
