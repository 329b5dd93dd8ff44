"""Temporary per-instance behaviour changes for MLX modules.

MLX modules have no forward hooks. Swapping an instance's ``__class__`` for a subclass
with a different ``__call__`` changes one instance only, keeps ``isinstance`` checks and
parameters intact, and is undone by restoring the class.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import mlx.nn as nn

def _subclass(cls: type, tag: str, attrs: dict[str, Any]) -> type:
    return type(f"{tag}{cls.__name__}", (cls,), attrs)


@contextlib.contextmanager
def call_hooks(
    modules: dict[int, tuple[nn.Module, Callable[..., None]]],
) -> Iterator[None]:
    """Call ``fn(module, args, kwargs, output)`` after each call of the given modules.

    ``modules`` maps ``id(module)`` to ``(module, fn)``. A non-None return value of
    ``fn`` replaces the module's output (used to inject probes).
    """
    originals = []
    for _, (mod, fn) in modules.items():
        cls = type(mod)

        def __call__(self, *args, __cls=cls, __fn=fn, **kwargs):
            out = __cls.__call__(self, *args, **kwargs)
            res = __fn(self, args, kwargs, out)
            return out if res is None else res

        attrs: dict[str, Any] = {"__call__": __call__}
        if isinstance(mod, nn.Embedding):  # tied heads call as_linear

            def as_linear(self, x, __cls=cls, __fn=fn):
                out = __cls.as_linear(self, x)
                res = __fn(self, (x,), {"as_linear": True}, out)
                return out if res is None else res

            attrs["as_linear"] = as_linear
        mod.__class__ = _subclass(cls, "Hooked", attrs)
        originals.append((mod, cls))
    try:
        yield
    finally:
        for mod, cls in originals:
            mod.__class__ = cls


@contextlib.contextmanager
def replay_layers(layers: list[nn.Module], outputs: list[Any]) -> Iterator[None]:
    """Make ``layers[j]`` return ``outputs[j]`` without computing (for a partial forward).

    The model still runs its own loop, masks and head, so any architecture works as long
    as a decoder layer's output is the next layer's input; callers verify that once.
    """
    originals = []
    for layer, out in zip(layers, outputs):
        cls = type(layer)

        def __call__(self, *args, __out=out, **kwargs):
            return __out

        layer.__class__ = _subclass(cls, "Replay", {"__call__": __call__})
        originals.append((layer, cls))
    try:
        yield
    finally:
        for layer, cls in originals:
            layer.__class__ = cls
