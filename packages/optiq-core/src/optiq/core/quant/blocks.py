"""A lazily loaded model, run one decoder block at a time through its own ``__call__``.

Real models do not fit in memory in fp32 (a 4B model is 16 GB), so the convert stages
never materialize one: the model is loaded lazily (``mlx_lm.load(lazy=True)``, nothing
read), and each stage brings one decoder block's weights into the model in fp32, runs it
on saved block inputs, and puts the unread lazy arrays back.

Running a block through the model's own forward (not a re-implementation) keeps every
architecture mlx-lm implements working: masks, caches=None and the layer loop are the
model's. Earlier blocks replay their saved outputs (:func:`.hooks.replay_layers`); the
block of interest gets the saved input and raises with its output, so nothing after it
runs. The head works the same way: its input (the final-normed hidden state) is caught
on its way into ``lm_head`` / ``embed_tokens.as_linear``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..architecture import decoder_layers
from ..errors import ModelLoadError
from ..head import Intercepted, catching_input
from .gdn import fast_gated_delta
from .hooks import call_hooks, replay_layers
from .source import WeightSource
from .targets import Target, get_module


@contextlib.contextmanager
def _swap_call(module: nn.Module, call: Callable[..., Any], tag: str) -> Iterator[None]:
    cls = type(module)
    module.__class__ = type(f"{tag}{cls.__name__}", (cls,), {"__call__": call})
    try:
        yield
    finally:
        module.__class__ = cls


@dataclass
class Head:
    """The module producing logits: ``lm_head`` or the tied embedding (``as_linear``)."""

    path: str  # module path
    tied: bool

    @property
    def weight_name(self) -> str:
        return f"{self.path}.weight"


def _outside_leaves(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    inside = {id(m) for layer in decoder_layers(model) for _, m in layer.named_modules()}
    return [p for p, m in model.named_modules() if id(m) not in inside and isinstance(m, kinds)]


def find_head(model: nn.Module) -> Head:
    """The head of any loaded model, float or quantized: an ``lm_head`` outside the decoder
    blocks, else the (tied) input embedding."""
    lm = [p for p in _outside_leaves(model, (nn.Linear, nn.QuantizedLinear)) if p.split(".")[-1] == "lm_head"]
    if lm:
        return Head(lm[0], tied=False)
    emb = _outside_leaves(model, (nn.Embedding, nn.QuantizedEmbedding))
    if not emb:
        raise ModelLoadError("could not find the model's output head (no lm_head, no embedding)")
    return Head(emb[0], tied=True)


def head_rows(module: nn.Module, s0: int, s1: int) -> mx.array:
    """Rows ``s0:s1`` of a head's weight in fp32, dequantized if it is quantized (groups run
    along a row, so a slice of rows dequantizes on its own)."""
    w = module["weight"][s0:s1]
    if "scales" not in module:
        return w.astype(mx.float32)
    biases = module["biases"][s0:s1] if "biases" in module else None
    kw = {"mode": module.mode} if hasattr(module, "mode") else {}
    return mx.dequantize(w, module["scales"][s0:s1].astype(mx.float32),
                         None if biases is None else biases.astype(mx.float32),
                         group_size=module.group_size, bits=module.bits, **kw)


def head_input_of(model: nn.Module, head: Head, tokens: mx.array, **kwargs: Any) -> mx.array:
    """What ``model(tokens, **kwargs)`` feeds its head (caches given in ``kwargs`` advance)."""
    with catching_input(get_module(model, head.path), head.tied):
        try:
            model(tokens, **kwargs)
        except Intercepted as s:
            return s.value
    raise ModelLoadError(f"{type(model).__name__}: the forward pass never reached its output head")


class BlockModel:
    """A lazily loaded model whose blocks are materialized one at a time (see module doc)."""

    def __init__(self, path: Path, model: nn.Module, targets: list[Target]):
        self.model = model
        self.source = WeightSource(path, model)
        self.layers = decoder_layers(model)
        names = {id(m): p for p, m in model.named_modules()}
        self.layer_paths = [names[id(layer)] for layer in self.layers]
        self.embedding = next((t for t in targets if t.kind == "embedding" and t.layer is None), None)
        self.head = self._find_head(targets)
        outside = [
            t.path for t in targets
            if t.layer is None and t.path not in {self.head.path, self.embedding.path if self.embedding else ""}
        ]
        if outside:
            raise ModelLoadError(
                f"layers outside the decoder blocks other than the embedding and head are not supported "
                f"by the streamed convert: {', '.join(outside)} (use --method static)"
            )
        big = {self.head.weight_name} | ({self.embedding.path + ".weight"} if self.embedding else set())
        prefixes = tuple(p + "." for p in self.layer_paths)
        # parameters outside the blocks besides the embedding / head (final norm...): small, kept in fp32
        self.rest_names = [
            k for k, _ in tree_flatten(model.parameters()) if not k.startswith(prefixes) and k not in big
        ]

    @classmethod
    def of(cls, path: Path, model: nn.Module) -> "BlockModel":
        """For running a model as it is (float or already quantized: evaluation), not for
        quantizing it: only its embedding and head are located (:func:`find_head`)."""
        head = find_head(model)
        emb = _outside_leaves(model, (nn.Embedding, nn.QuantizedEmbedding))
        targets = [Target(head.path, "embedding" if head.tied else "linear", head.path.split(".")[-1], None, ())]
        if emb and emb[0] != head.path:
            targets.append(Target(emb[0], "embedding", "embed_tokens", None, ()))
        return cls(path, model, targets)

    def _find_head(self, targets: list[Target]) -> Head:
        lm = [t for t in targets if t.layer is None and t.kind == "linear" and t.path.split(".")[-1] == "lm_head"]
        if lm:
            return Head(lm[0].path, tied=False)
        if self.embedding is None:
            raise ModelLoadError("could not find the model's output head (no lm_head, no embedding)")
        return Head(self.embedding.path, tied=True)

    # ------------------------------------------------------------------ weights
    @contextlib.contextmanager
    def materialized(self, names: list[str], dtype: mx.Dtype | None = mx.float32) -> Iterator[None]:
        """Parameters ``names`` read into the model (floating ones cast to ``dtype``; None: as
        stored; packed quantized weights always as stored), the untouched lazy arrays put
        back on exit (so nothing read stays resident)."""
        fresh = self.source.fresh()
        missing = [n for n in names if n not in fresh]
        if missing:
            raise ModelLoadError(f"weights missing from the checkpoint: {', '.join(missing[:5])}")
        cast = dtype is not None
        arrays = [(n, fresh[n].astype(dtype) if cast and mx.issubdtype(fresh[n].dtype, mx.floating) else fresh[n])
                  for n in names]
        del fresh
        mx.eval([a for _, a in arrays])
        params = dict(tree_flatten(self.model.parameters()))
        originals = [(n, params[n]) for n in names]
        del params
        self.model.update(tree_unflatten(arrays))
        del arrays
        try:
            yield
        finally:
            self.model.update(tree_unflatten(originals))

    def block_names(self, k: int) -> list[str]:
        prefix = self.layer_paths[k] + "."
        return [prefix + n for n, _ in tree_flatten(self.layers[k].parameters())]

    def block(self, k: int) -> contextlib.AbstractContextManager:
        """Block ``k``'s weights in fp32 for the duration of a ``with``."""
        return self.materialized(self.block_names(k))

    def rest(self) -> contextlib.AbstractContextManager:
        """The small parameters outside the blocks (final norm...) in fp32."""
        return self.materialized(self.rest_names)

    # ------------------------------------------------------------------ forward pieces
    def block_output(self, k: int, tokens: mx.array, h: mx.array, hooks: dict | None = None) -> mx.array:
        """Output of block ``k`` given its input ``h`` (differentiable in ``h``)."""
        return block_output(self.model, self.layers, k, tokens, h, hooks)

    def first_input(self, tokens: mx.array, hooks: dict | None = None) -> mx.array:
        """Block 0's input (the embedding output, after any scaling the model applies)."""
        return first_input(self.model, self.layers, tokens, hooks)

    def head_input(self, tokens: mx.array, h: mx.array) -> mx.array:
        """The head's input (final norm of the last block's output ``h``), differentiable in ``h``."""
        with replay_layers(self.layers, [h] * len(self.layers)):
            return head_input_of(self.model, self.head, tokens)

    def logits_from(self, tokens: mx.array, h: mx.array) -> mx.array:
        """The model's own logits from the last block's output ``h`` (head must be materialized)."""
        return logits_from(self.model, self.layers, tokens, h)


# ---------------------------------------------------------------------- forward pieces
# Pieces of the model's own forward over its decoder ``layers``, given saved block inputs
# (used by BlockModel and by the KV sensitivity pass, which runs a loaded model).


def block_output(
    model: nn.Module, layers: list[nn.Module], k: int, tokens: mx.array, h: mx.array,
    hooks: dict | None = None, cache: list | None = None,
) -> mx.array:
    """Output of block ``k`` given its input ``h`` (``cache``: the model's cache list, for
    block ``k``'s own cache; differentiable in ``h``). Nothing after block ``k`` runs."""
    layer = layers[k]
    cls = type(layer)

    def call(self_, x, *args, **kwargs):
        raise Intercepted(cls.__call__(self_, h, *args, **kwargs))

    with replay_layers(layers[:k], [h] * k), _swap_call(layer, call, "Block"):
        return _run(model, tokens, hooks, cache)


def first_input(model: nn.Module, layers: list[nn.Module], tokens: mx.array, hooks: dict | None = None) -> mx.array:
    """Block 0's input (the embedding output, after any scaling the model applies)."""

    def call(self_, x, *args, **kwargs):
        raise Intercepted(x)

    with _swap_call(layers[0], call, "Entry"):
        return _run(model, tokens, hooks)


def logits_from(model: nn.Module, layers: list[nn.Module], tokens: mx.array, h: mx.array) -> mx.array:
    """The model's own logits (final norm, head, anything after it) from the last block's output ``h``."""
    with replay_layers(layers, [h] * len(layers)), fast_gated_delta():
        return model(tokens)


def _run(model: nn.Module, tokens: mx.array, hooks: dict | None, cache: list | None = None) -> mx.array:
    with fast_gated_delta(), call_hooks(hooks or {}):
        try:
            model(tokens) if cache is None else model(tokens, cache=cache)
        except Intercepted as s:
            return s.value
    raise ModelLoadError(f"{type(model).__name__}: the forward pass never reached the expected layer")


# Vocabulary rows :func:`check_head` compares (the head's own forward over the whole
# vocabulary would cast or dequantize the whole table).
CHECK_ROWS = 4096


@contextlib.contextmanager
def _first_rows(module: nn.Module, rows: int) -> Iterator[None]:
    params = tree_flatten(module.parameters())
    module.update(tree_unflatten([(k, v[:rows]) for k, v in params]))
    try:
        yield
    finally:
        module.update(tree_unflatten(params))


def check_head(bm: BlockModel, tokens: mx.array, h_last: mx.array, what: str = "the streamed sensitivity pass",
               fix: str = " (use --method static)") -> None:
    """The streamed head computes ``logits = head_input @ W^T``: check the model does too
    (on the first :data:`CHECK_ROWS` vocabulary rows).

    Models that scale or soft-cap logits after the head would be measured wrongly, so
    they get a clear error instead. The check runs the model's own head on the first
    :data:`CHECK_ROWS` rows of its table in fp32 (the rest of the model is replayed, so the
    tokens only need to be valid rows), never on a vocabulary-sized fp32 copy.
    """
    tokens, h_last = tokens[:1, :8], h_last[:1, :8]
    with bm.materialized([bm.head.weight_name], dtype=None), bm.rest():
        head = get_module(bm.model, bm.head.path)
        xn = bm.head_input(tokens, h_last)
        with _first_rows(head, CHECK_ROWS):
            w = head_rows(head, 0, CHECK_ROWS)
            ours = (xn.reshape(-1, xn.shape[-1]) @ w.T).reshape(-1)
            # token ids only reach the (replayed-over) embedding: kept inside the cut table
            theirs = bm.logits_from(mx.minimum(tokens, CHECK_ROWS - 1), h_last).astype(mx.float32).reshape(-1)
            ok = ours.shape == theirs.shape and bool(mx.allclose(ours, theirs, rtol=1e-4, atol=1e-4).item())
    if not ok:
        raise ModelLoadError(
            f"{type(bm.model).__name__} transforms its logits after the output head (scaling, soft-capping "
            f"or a bias): {what} does not support it{fix}"
        )


def as_numpy_f32(a: mx.array) -> np.ndarray:
    return np.asarray(a.astype(mx.float32))
