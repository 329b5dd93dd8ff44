"""Perplexity and KL at real sizes: one decoder block resident at a time, logits one
vocabulary slice at a time.

A whole-model eval of a 0.8B model held both models in fp32 and a batch's full logits
(8 x 256 tokens x 248,320 vocabulary is 2 GB per model, several such temporaries):
15 GB for 1.5 GB of weights. Here each batch of windows runs through each model block
by block (:class:`.quant.blocks.BlockModel`: a block's weights read and cast to fp32
for the duration of its call, packed quantized weights kept packed), and the head's
logits are made one vocabulary slice at a time and folded into per-position statistics
(:class:`.kl.SlicedScores`) before the next slice. What stays resident is the lazy
model skeletons, one block, the two heads as stored and a few ``tokens x slice`` tiles.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import DataError
from .kl import SlicedScores
from .quant.blocks import CHECK_ROWS, BlockModel, check_head, head_rows
from .quant.progress import Progress
from .quant.targets import get_module

# Logits per vocabulary tile (tokens x slice rows): 64 MB in fp32.
TILE_ELEMENTS = 1 << 24
# Tokens per batch of windows in the streamed eval: every batch reads each block once,
# so larger batches spread that cost; activations grow with it (~0.3 GB at the 0.8B shape).
BATCH_TOKENS = 4096


def score_heads(
    head: nn.Module, xn: mx.array, targets: np.ndarray, ref: tuple[nn.Module, mx.array] | None = None
) -> SlicedScores:
    """Statistics of ``logits = xn @ W^T`` of ``head`` at positions ``xn`` [..., H] with
    next tokens ``targets``, and of a reference ``(head, xn)``, one vocabulary slice at a time."""
    xn = xn.reshape(-1, xn.shape[-1]).astype(mx.float32)
    V = int(head["weight"].shape[0])
    if ref is not None:
        ref_head, xr = ref
        xr = xr.reshape(-1, xr.shape[-1]).astype(mx.float32)
        if int(ref_head["weight"].shape[0]) != V:
            raise DataError(f"the model's head has {V} rows, the reference's {ref_head['weight'].shape[0]}: "
                            "KL needs the same vocabulary")
    step = max(8, TILE_ELEMENTS // max(int(xn.shape[0]), 1))
    scores = SlicedScores(targets, ref is not None)

    def tiles(s0: int) -> list[mx.array]:
        s1 = min(V, s0 + step)
        out = [xn @ head_rows(head, s0, s1).T]
        if ref is not None:
            out.append(xr @ head_rows(ref_head, s0, s1).T)
        mx.async_eval(out)  # the next slice's GEMMs run while numpy folds in this one
        return out

    starts = list(range(0, V, step))
    nxt = tiles(0)
    for i, s0 in enumerate(starts):
        cur = nxt
        if i + 1 < len(starts):
            nxt = tiles(starts[i + 1])
        mx.eval(cur)
        scores.add(s0, *(np.asarray(t) for t in cur))
    return scores


def logits_match(xn: mx.array, head: nn.Module, logits: mx.array) -> bool:
    """Whether a model's own ``logits`` (first :data:`CHECK_ROWS` columns or fewer) equal
    ``xn @ W^T``, the form the sliced head computes."""
    rows = min(CHECK_ROWS, int(logits.shape[-1]))
    ours = xn.reshape(-1, xn.shape[-1]).astype(mx.float32) @ head_rows(head, 0, rows).T
    theirs = logits[..., :rows].astype(mx.float32).reshape(ours.shape)
    return bool(mx.allclose(ours, theirs, rtol=1e-4, atol=1e-4).item())


def open_blocks(path: str | Path) -> tuple[BlockModel, Any]:
    """A model loaded lazily (nothing read) for block-by-block runs, and its tokenizer."""
    from .cpu import on_cpu, swap_quantized_layers
    from .model_io import load_model

    lm = load_model(path, fast_cpu=False, lazy=True)
    if on_cpu():  # dequantize + GEMM for the many rows of a batch (see optiq.core.cpu)
        swap_quantized_layers(lm.model)
    return BlockModel.of(lm.path, lm.model), lm


def last_hidden(bm: BlockModel, x: mx.array, on_block: Callable[[int], None] | None = None) -> mx.array:
    """The last block's output for tokens ``x`` [B, T], one block's weights resident at a time
    (``on_block(k)`` after block ``k``)."""
    emb = [bm.embedding.path + ".weight"] if bm.embedding is not None else []
    with bm.materialized(emb, dtype=None), bm.rest():  # the table as stored: no fp32 copy of it
        h = bm.first_input(x).astype(mx.float32)
        mx.eval(h)
    for k in range(len(bm.layers)):
        with bm.block(k):
            h = bm.block_output(k, x, h)
            mx.eval(h)
        if on_block is not None:
            on_block(k)
    return h


def streamed_scores(
    model: BlockModel,
    windows: np.ndarray,
    reference: BlockModel | None = None,
    *,
    batch_size: int | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per-token ``(nll, reference nll, KL(reference || model))`` on ``windows`` [n, T + 1]
    (the last two None without a reference), in window order."""
    T = windows.shape[1] - 1
    bs = batch_size or max(1, BATCH_TOKENS // T)
    nll, ref_nll, kl = [], [], []
    prog = Progress("eval", len(windows), log, unit="window")
    for s in range(0, len(windows), bs):
        b = windows[s : s + bs]
        x = mx.array(b[:, :-1])
        models = [model] + ([reference] if reference is not None else [])
        # progress in windows, a batch's share per block of each model and for the head
        share = len(b) / (sum(len(bm.layers) for bm in models) + 1)
        hs = []
        for name, bm in zip(("model", "reference"), models):
            L = len(bm.layers)
            hs.append(last_hidden(bm, x, lambda k: prog.step(f"({name} block {k + 1} of {L})", n=share)))
        if s == 0:
            for bm, h in zip(models, hs):
                check_head(bm, x, h, what="the streamed eval", fix="")
        with contextlib.ExitStack() as stack:
            heads = []
            for bm, h in zip(models, hs):  # each head as stored, small parameters in fp32
                stack.enter_context(bm.materialized([bm.head.weight_name], dtype=None))
                stack.enter_context(bm.rest())
                xn = bm.head_input(x, h)
                mx.eval(xn)
                heads.append((get_module(bm.model, bm.head.path), xn))
            sc = score_heads(*heads[0], b[:, 1:], heads[1] if len(heads) > 1 else None)
        nll.append(sc.nll())
        if reference is not None:
            ref_nll.append(sc.ref_nll())
            kl.append(sc.kl())
        prog.step("(head)", n=share)
    cat = np.concatenate
    return cat(nll), (cat(ref_nll) if ref_nll else None), (cat(kl) if kl else None)
