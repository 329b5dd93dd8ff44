"""Round every leaf at its chosen width and write the model, one block at a time.

For each decoder block: its fp32 weights come into the lazily loaded model
(:class:`.blocks.BlockModel`), its leaves' input Hessians are recorded by replaying the
block on its saved inputs (GPTQ / activation-aware clip need them; ``rtn`` and static
converts skip it), its leaves are rounded (:func:`.sensitivity.quantize_targets`, leaves
sharing an input in one GPTQ sweep), and every tensor of the block goes straight to its
planned place in the output shards (:class:`.shards.ShardWriter`). The vocabulary-sized
embedding / head is read as stored and rounded in row chunks (rows round independently
given the Hessian), so no fp32 copy of it exists.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .blocks import BlockModel
from .formats import pack
from .progress import Progress
from .rounding import quantize_weight
from .sensitivity import Reference, ReferenceRecorder, _finish_hessians, hessian_for_rounding, quantize_targets
from .shards import ShardWriter, TensorSpec
from .source import chunks_along_first_axis
from .states import BoundaryStates
from .targets import Target, get_module


def output_specs(
    bm: BlockModel, active: list[Target], bits: dict[str, int], out_dtype: mx.Dtype, dtypes: dict[str, mx.Dtype],
) -> list[TensorSpec]:
    """Every tensor of the written model, in ``mlx_lm.save_model``'s order (from shapes only)."""
    quant = {t.path: t for t in active}
    specs: list[TensorSpec] = []
    for name, arr in tree_flatten(bm.model.parameters()):
        mod, leaf = name.rsplit(".", 1)
        shape = tuple(int(d) for d in arr.shape)
        if leaf == "weight" and mod in quant:
            b, g = bits[mod], quant[mod].group_size
            specs.append(TensorSpec(name, mx.uint32, shape[:-1] + (shape[-1] * b // 32,)))
            specs.append(TensorSpec(f"{mod}.scales", out_dtype, shape[:-1] + (shape[-1] // g,)))
            specs.append(TensorSpec(f"{mod}.biases", out_dtype, shape[:-1] + (shape[-1] // g,)))
        else:
            specs.append(TensorSpec(name, dtypes[name], shape))
    return specs


def _write_quantized(writer: ShardWriter, path: str, q, row: int = 0, last: bool = True) -> None:
    writer.write_rows(f"{path}.weight", pack(q.codes, q.bits), row, last)
    writer.write_rows(f"{path}.scales", q.scales, row, last)
    writer.write_rows(f"{path}.biases", q.biases, row, last)


def _block_reference(
    bm: BlockModel, k: int, targets: list[Target], states: BoundaryStates, batches: list[mx.array],
) -> Reference:
    """The leaves' input Hessians of block ``k`` over the calibration batches."""
    rec = ReferenceRecorder(bm.model, targets)
    hooks = {}
    for t in targets:
        mod = get_module(bm.model, t.path)
        hooks[id(mod)] = (mod, rec._leaf_hook(t))
    for b, x in enumerate(batches):
        rec.begin_batch()
        out = bm.block_output(k, x, states.get(k, b), hooks)
        mx.eval(out, [v[0] for v in rec.store.values() if isinstance(v[0], mx.array)])
        rec.batch_inputs.clear()
    return _reference(*_finish_hessians(rec.store, rec.shared))


def _reference(hessians: dict[str, np.ndarray], key: dict[str, str]) -> Reference:
    return Reference(
        batches=[], dists=[], layer_outputs=[], hessians=hessians, hessian_key=key,
        token_counts=np.zeros(1), start_layer={},
    )


def _head_hessian(bm: BlockModel, states: BoundaryStates, batches: list[mx.array]) -> np.ndarray:
    """``E[x x^T]`` of the head's input (as the reference pass accumulates it)."""
    total, count = None, 0
    L = len(bm.layers)
    with bm.rest():
        for b, x in enumerate(batches):
            xn = bm.head_input(x, states.get(L, b)).astype(mx.float32)
            x2 = xn.reshape(-1, xn.shape[-1])
            h = x2.T @ x2
            total = h if total is None else total + h
            count += x2.shape[0]
            mx.eval(total)
    return np.asarray(total).astype(np.float64) / max(count, 1)


def _write_big_leaf(
    bm: BlockModel, writer: ShardWriter, t: Target, b: int, out_dtype: mx.Dtype, rounding: str,
    hessian: np.ndarray | None,
) -> None:
    """A vocabulary-sized leaf: read as stored, rounded and written in row chunks."""
    fresh = bm.source.fresh()
    w = fresh.pop(f"{t.path}.weight")
    del fresh
    mx.eval(w)
    chunks = list(chunks_along_first_axis(tuple(w.shape)))
    for i, sl in enumerate(chunks):
        rows = np.asarray(w[sl].astype(mx.float32))
        q = quantize_weight(rows, (b,), t.group_size, out_dtype, rounding, hessian)[b]
        _write_quantized(writer, t.path, q, sl.start, last=i == len(chunks) - 1)
    del w


def round_and_write(
    bm: BlockModel,
    writer: ShardWriter,
    active: list[Target],
    bits: dict[str, int],
    out_dtype: mx.Dtype,
    rounding: str,
    dtypes: dict[str, mx.Dtype],
    states: BoundaryStates | None = None,
    batches: list[mx.array] | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Quantize and write every tensor (see module doc). ``states``/``batches``: saved
    block inputs for Hessians; without them (static), rounding uses no calibration data."""
    use_h = rounding != "rtn" and states is not None and batches is not None
    quant = {t.path: t for t in active}
    L = len(bm.layers)
    prog = Progress("write", L, log)
    for k in range(L):
        targets = [t for t in active if t.layer == k]
        # MLX keeps freed buffers cached: returned here, they do not sit resident under
        # the numpy temporaries (GPTQ's inverses) of the rounding that follows
        mx.clear_cache()
        with bm.block(k):
            ref = _block_reference(bm, k, targets, states, batches) if use_h and targets else None
            mx.clear_cache()
            chosen = quantize_targets(bm.model, targets, {t.path: (bits[t.path],) for t in targets}, out_dtype, rounding, ref)
            for p, qs in chosen.items():
                _write_quantized(writer, p, qs[bits[p]])
            del chosen
            prefix = bm.layer_paths[k] + "."
            for name, arr in tree_flatten(bm.layers[k].parameters()):
                full = prefix + name
                mod, leaf = full.rsplit(".", 1)
                if not (leaf == "weight" and mod in quant):
                    writer.write(full, arr.astype(dtypes[full]))
        prog.step()
    mx.clear_cache()
    head_h = _head_hessian(bm, states, batches) if use_h else None
    big = [(bm.embedding.path, head_h if bm.head.tied else None)] if bm.embedding is not None else []
    if not bm.head.tied:
        big.append((bm.head.path, head_h))
    for path, h in big:
        name = f"{path}.weight"
        if path in quant:
            t = quant[path]
            ht = hessian_for_rounding(t, _reference({path: h}, {path: path})) if h is not None else None
            _write_big_leaf(bm, writer, t, bits[path], out_dtype, rounding, ht)
        else:
            fresh = bm.source.fresh()
            writer.write(name, fresh.pop(name).astype(dtypes[name]))
            del fresh
    with bm.rest():
        params = dict(tree_flatten(bm.model.parameters()))
        for name in bm.rest_names:
            writer.write(name, params[name].astype(dtypes[name]))
        del params
