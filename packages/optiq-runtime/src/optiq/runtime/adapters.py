"""Per-request LoRA adapters inside one continuous batch.

Every adapter registered at start (``--adapter NAME=DIR``, OptiQ or stock mlx-lm
format, read with :mod:`optiq.train.adapters`) is loaded once. Each adapted linear is
replaced by a :class:`MultiLoRALinear` holding the base layer and every adapter's
factors; a batch row gets ``base(x) + scale * (x @ A) @ B`` of *its* adapter only.

Which row uses which adapter travels with the row's cache: :class:`AdapterTag` is an
extra cache entry (appended after the model's per-layer caches) that merges, filters,
extends and extracts exactly like a cache, so ``BatchGenerator``'s bookkeeping keeps
it aligned with the batch. :class:`AdapterModel` reads the tag before each forward
pass, tells the LoRA layers the row masks, and hands the real caches to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from optiq.core.errors import ConfigError, ModelLoadError


class AdapterTag:
    """Adapter index per batch row (0 = base model). Follows mlx-lm's cache protocol
    for the calls ``BatchGenerator`` makes; holds no arrays."""

    def __init__(self, ids: list[int]):
        self.ids = list(ids)

    # -- cache protocol used by BatchGenerator ---------------------------------
    @property
    def state(self) -> list:
        return []

    @property
    def nbytes(self) -> int:
        return 0

    def empty(self) -> bool:
        return not self.ids

    def merge(self, tags: list["AdapterTag"]) -> "AdapterTag":
        return AdapterTag([i for t in tags for i in t.ids])

    def extend(self, other: "AdapterTag") -> None:
        self.ids.extend(other.ids)

    def filter(self, batch_indices: Any) -> None:
        idx = batch_indices.tolist() if hasattr(batch_indices, "tolist") else batch_indices
        self.ids = [self.ids[i] for i in idx]

    def extract(self, idx: int) -> "AdapterTag":
        return AdapterTag([self.ids[idx]])

    def prepare(self, **kwargs: Any) -> None:
        pass

    def finalize(self) -> None:
        pass

    # Holds no per-token state: trimming (prefix-cache reuse) leaves it as is.
    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return n

    def size(self) -> int:
        return 0


class _Router:
    """Row masks of the forward pass being built: adapter index -> (B, 1, 1) mask, or
    None when every row uses that adapter."""

    def __init__(self) -> None:
        self.active: dict[int, mx.array | None] = {}

    def set_rows(self, ids: list[int]) -> None:
        self.active = {}
        n = len(ids)
        for a in set(ids):
            if a == 0:
                continue
            count = sum(1 for i in ids if i == a)
            if count == n:
                self.active[a] = None
            else:
                self.active[a] = mx.array([1.0 if i == a else 0.0 for i in ids])[:, None, None]


class MultiLoRALinear(nn.Module):
    """A linear layer plus any number of LoRA adapters; each batch row uses one."""

    def __init__(self, base: nn.Module, router: _Router):
        super().__init__()
        self.linear = base
        # Plain attributes (not module children): the factors are not parameters of
        # the served model and must not show up in its parameter tree.
        object.__setattr__(self, "_router", router)
        object.__setattr__(self, "_factors", {})

    def add(self, index: int, a: mx.array, b: mx.array, scale: float) -> None:
        self._factors[index] = (a, b, scale)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        for index, mask in self._router.active.items():
            f = self._factors.get(index)
            if f is None:
                continue
            a, b, scale = f
            z = ((x.astype(a.dtype) @ a) @ b) * scale
            y = y + (z if mask is None else z * mask).astype(y.dtype)
        return y


class AdapterModel:
    """What ``BatchGenerator`` runs when adapters are registered: strips the
    :class:`AdapterTag` from the cache list and routes rows to their adapters."""

    def __init__(self, model: nn.Module, router: _Router):
        self.model = model
        self._router = router

    def __call__(self, inputs: mx.array, cache: Any = None, **kwargs: Any) -> mx.array:
        if cache and isinstance(cache[-1], AdapterTag):
            self._router.set_rows(cache[-1].ids)
            cache = cache[:-1]
        else:
            self._router.set_rows([0] * inputs.shape[0])
        return self.model(inputs, cache=cache, **kwargs)

    @property
    def layers(self) -> Any:
        return self.model.layers

    def make_cache(self) -> list:
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model) + [AdapterTag([0])]


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    index: int
    path: Path
    num_layers: int  # adapted modules


def install_adapters(
    model: nn.Module, adapters: dict[str, Path]
) -> tuple[AdapterModel, dict[str, ServedAdapter]]:
    """Load every adapter, check it fits ``model`` and wire per-row LoRA layers.

    Returns the model ``BatchGenerator`` should run and name -> :class:`ServedAdapter`.
    """
    from optiq.train.adapters import expected_shapes, load_weight_file, module_at, read_spec
    from optiq.train.targets import is_adaptable

    router = _Router()
    wrapped: dict[str, MultiLoRALinear] = {}
    served: dict[str, ServedAdapter] = {}
    dtype = mx.float32
    for index, (name, directory) in enumerate(sorted(adapters.items()), start=1):
        weights = load_weight_file(Path(directory))
        spec = read_spec(Path(directory), weights)
        for m in spec.modules:
            if m.num_experts:
                raise ConfigError(
                    f"adapter '{name}' adapts the expert pool {m.path}: per-request serving "
                    "supports adapters on linear layers only; fuse this one into the model "
                    "(`optiq lora fuse`) and serve the fused model instead"
                )
            layer = wrapped.get(m.path)
            base = layer.linear if layer is not None else module_at(model, m.path)
            if base is None or not is_adaptable(base):
                raise ModelLoadError(
                    f"adapter '{name}' ({directory}) names {m.path}, which is not a linear layer "
                    "of this model (made for another model?)"
                )
            for leaf, shape in expected_shapes(m, base).items():
                w = weights.get(f"{m.path}.{leaf}")
                if w is None or tuple(w.shape) != shape:
                    got = "missing" if w is None else f"shape {tuple(w.shape)}"
                    raise ModelLoadError(
                        f"adapter '{name}' ({directory}): {m.path}.{leaf} is {got}; this model "
                        f"needs {shape}"
                    )
            if layer is None:
                layer = wrapped[m.path] = MultiLoRALinear(base, router)
            a = weights[f"{m.path}.lora_a"].astype(dtype)
            b = weights[f"{m.path}.lora_b"].astype(dtype)
            mx.eval(a, b)
            layer.add(index, a, b, float(m.scale))
        served[name] = ServedAdapter(name, index, Path(directory), len(spec.modules))
    model.update_modules(tree_unflatten(list(wrapped.items())))
    return AdapterModel(model, router), served


def tag_cache(cache: list, adapter: str | None, served: dict[str, ServedAdapter]) -> list:
    """Append the row's adapter tag to a fresh per-request cache list (one without a
    tag: the model's own caches)."""
    index = served[adapter].index if adapter else 0
    return [c for c in cache if not isinstance(c, AdapterTag)] + [AdapterTag([index])]
