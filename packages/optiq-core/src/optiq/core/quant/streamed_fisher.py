"""The Fisher sensitivity estimate (:mod:`.fisher`), streamed block by block.

Same estimate, same probes, bounded memory (equal to the whole-model
:func:`.fisher.reference_and_estimate` to fp32 rounding; tests/test_convert_stream.py):

1. **forward**: block inputs ``h_0..h_L`` for every calibration batch, one block's fp32
   weights resident at a time (:class:`.blocks.BlockModel`, :class:`.states.BoundaryStates`).
2. **head**, in vocabulary slices (never a ``tokens x vocab`` tensor): pass 1 computes each
   position's log-sum-exp and ``sum_v sqrt(p_v) e_v`` online; pass 2 the probe cotangent
   ``c = sqrt(p) e - p sum(sqrt(p) e)`` slice by slice, its gradient ``c W`` at the head
   input, and the head's own projections ``c . (dW_b x)`` from each slice's RTN errors.
3. **backward**, blocks in reverse: each block's forward is recomputed from its saved input
   with zero probes on its leaves and differentiated (``mx.vjp``) against the gradient
   arriving at its output -- block-level checkpointing. The leaves' projections use that
   block's RTN errors only; the gradient at the block input goes on to the block before.
4. **embedding**: the gradient at block 0's input gives the embedding's own projections
   (rows of the calibration tokens only); with tied embeddings they add to the head use's
   before squaring (both move the same logits).
"""

from __future__ import annotations

import time
from typing import Callable

import mlx.core as mx
import numpy as np

from ..cpu import exp
from .blocks import BlockModel, check_head
from .fisher import ErrorBank, _monotone, _project, _use, _widths, rtn_error
from .progress import Progress
from .sensitivity import LeafSensitivity
from .states import BoundaryStates
from .targets import Target, get_module

# Rows of a Rademacher draw generated at once (bounded temporaries; equal to one draw).
DRAW_ROWS = 256


class Probes:
    """Rademacher signs per (batch, probe), drawn in the whole-model estimator's order and
    stored one bit each (a 248k vocabulary x 2,048 tokens is 64 MB, not 2 GB of fp32)."""

    def __init__(self, batch_tokens: list[int], n_probes: int, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.packed: dict[tuple[int, int], np.ndarray] = {}
        for b, n in enumerate(batch_tokens):
            for p in range(n_probes):
                rows = [
                    np.packbits(rng.integers(0, 2, size=(min(DRAW_ROWS, n - r), vocab), dtype=np.int8).view(np.uint8), axis=1)
                    for r in range(0, n, DRAW_ROWS)
                ]
                self.packed[b, p] = np.concatenate(rows)

    def bits(self, b: int, p: int, s0: int, s1: int) -> mx.array:
        """The draw for vocabulary columns ``s0:s1`` (``s0`` a multiple of 8) as 0/1 uint8;
        ``e = 2 * bits - 1`` (:func:`_sign`) is formed inside the fused head kernels."""
        return mx.array(np.unpackbits(self.packed[b, p][:, s0 // 8 : (s1 + 7) // 8], axis=1)[:, : s1 - s0])


def _sign(bits: mx.array) -> mx.array:
    return bits.astype(mx.float32) * 2 - 1


# The head's per-slice elementwise work, each fused into one pass over the
# ``tokens x slice`` logits (unfused, these passes cost more than the slice's GEMMs).
@mx.compile
def _lse_step(z: mx.array, m: mx.array, s1: mx.array) -> tuple[mx.array, mx.array]:
    """Online log-sum-exp: new running max and rescaled sum of ``exp(z - max)``."""
    m_new = mx.maximum(m, z.max(axis=1))
    return m_new, s1 * exp(m - m_new) + exp(z - m_new[:, None]).sum(axis=1)


@mx.compile
def _half_step(z: mx.array, m: mx.array, m_new: mx.array, a: mx.array, bits: mx.array) -> mx.array:
    """Online ``sum_v exp((z_v - max) / 2) e_v``."""
    return a * exp((m - m_new) * 0.5) + (exp((z - m_new[:, None]) * 0.5) * _sign(bits)).sum(axis=1)


@mx.compile
def _cotangent(z: mx.array, lse: mx.array, bits: mx.array, ssum: mx.array) -> mx.array:
    """The probe cotangent ``sqrt(p) e - p sum(sqrt(p) e)`` of one slice."""
    pz = exp(z - lse[:, None])
    return mx.sqrt(pz) * _sign(bits) - pz * ssum[:, None]


@mx.compile
def _rowdot(d: mx.array, xn: mx.array) -> mx.array:
    """``d [N, widths, H] . xn [N, H]`` per token and width."""
    return (d * xn[:, None, :]).sum(-1)


def vocab_slice_rows(n_tokens: int, hidden: int, n_widths: int, budget: int) -> int:
    """Vocabulary rows per head slice so one slice's temporaries fit ``budget`` bytes:
    a few ``tokens x rows`` fp32 tiles, the slice's weights and its errors at every width."""
    per_row = 4 * (6 * n_tokens + hidden * (3 + 3 * n_widths))
    return max(8, (budget // per_row) // 8 * 8)


class _Accumulator:
    """``sum_t (g_t . dW_b x_t)^2`` per leaf and width (tied uses add before squaring)."""

    def __init__(self, active: list[Target], bits: tuple[int, ...]):
        self.widths = {t.path: _widths(t, bits) for t in active}
        self.sums = {t.path: np.zeros(len(self.widths[t.path])) for t in active}
        self.n_tokens = 0
        self.n_probes = 1

    def add(self, path: str, proj: np.ndarray) -> None:
        self.sums[path] += (proj.astype(np.float64) ** 2).sum(0)

    def results(self) -> dict[str, LeafSensitivity]:
        n = max(self.n_tokens * self.n_probes, 1)
        return {
            p: LeafSensitivity(p, _monotone({b: 0.5 * float(v) / n for b, v in zip(self.widths[p], s)}), [])
            for p, s in self.sums.items()
        }


def forward_states(bm: BlockModel, batches: list[mx.array], spill: bool, log: Callable[[str], None] | None) -> BoundaryStates:
    """Stage 1: every block's input for every batch (one block resident at a time)."""
    n = len(bm.layers)
    emb = [bm.embedding.path + ".weight"] if bm.embedding is not None else []
    # the table as stored (bf16 rows are exact in fp32): no vocabulary-sized fp32 copy
    with bm.materialized(emb, dtype=None), bm.rest():
        h0 = [bm.first_input(x).astype(mx.float32) for x in batches]
        mx.eval(h0)
    states = BoundaryStates(n + 1, [tuple(x.shape) for x in batches], int(h0[0].shape[-1]), spill=spill)
    for b, h in enumerate(h0):
        states.put(0, b, h)
    del h0
    prog = Progress("forward", n, log)
    for k in range(n):
        with bm.block(k):
            for b, x in enumerate(batches):
                h = bm.block_output(k, x, states.get(k, b))
                mx.eval(h)
                states.put(k + 1, b, h)
        prog.step()
    return states


def _head_errors(w: mx.array, t: Target | None, widths: tuple[int, ...], out_dtype: mx.Dtype) -> mx.array | None:
    if t is None:
        return None
    return mx.stack([rtn_error(w, b, t.group_size, out_dtype) for b in widths]).astype(mx.float16)


def head_stage(
    bm: BlockModel,
    batches: list[mx.array],
    states: BoundaryStates,
    probes: Probes,
    n_probes: int,
    head_target: Target | None,
    emb_target: Target | None,
    bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    acc: _Accumulator,
    tile_budget: int,
    log: Callable[[str], None] | None,
) -> tuple[dict[tuple[int, int], mx.array], dict[tuple[int, int], np.ndarray], dict[int, mx.array] | None]:
    """Stage 2 (see module doc): ``(gradient at the last block's output per (batch, probe),
    tied head projections per (batch, probe) to add to the embedding's, embedding row errors)``."""
    L = len(bm.layers)
    name = bm.head.weight_name
    fresh = bm.source.fresh()
    w_store = fresh.pop(name)  # as stored (bf16): slices are cast to fp32 one at a time
    del fresh
    mx.eval(w_store)
    V = int(w_store.shape[0])
    widths = _widths(head_target, bits) if head_target is not None else ()
    tied_ids = None
    if bm.head.tied and emb_target is not None:
        ids = np.unique(np.concatenate([np.asarray(x).reshape(-1) for x in batches]))
        tied_ids = ids
    with bm.rest():
        xs = []
        for b, x in enumerate(batches):
            xn = bm.head_input(x, states.get(L, b))
            xs.append(xn.reshape(-1, xn.shape[-1]))
        mx.eval(xs)
    n_tok = max(int(x.shape[0]) for x in xs)
    step = min(V, vocab_slice_rows(n_tok, int(xs[0].shape[-1]), max(len(widths), 1), tile_budget))
    slices = [(s, min(s + step, V)) for s in range(0, V, step)]

    # pass 1: online log-sum-exp and A = sum_v exp((z_v - m) / 2) e_v per position
    m = [mx.full((x.shape[0],), -np.inf, dtype=mx.float32) for x in xs]
    s1 = [mx.zeros((x.shape[0],), dtype=mx.float32) for x in xs]
    a = {(b, p): mx.zeros((xs[b].shape[0],), dtype=mx.float32) for b in range(len(xs)) for p in range(n_probes)}
    prog = Progress("head", 2 * len(slices), log, unit="vocabulary slice")
    for s0, s_1 in slices:
        ws = w_store[s0:s_1].astype(mx.float32)
        for b, xn in enumerate(xs):
            z = xn @ ws.T
            m_new, s1[b] = _lse_step(z, m[b], s1[b])
            for p in range(n_probes):
                a[b, p] = _half_step(z, m[b], m_new, a[b, p], probes.bits(b, p, s0, s_1))
            m[b] = m_new
            mx.eval(m[b], s1[b], [a[b, p] for p in range(n_probes)])
        prog.step()
    lse = [mm + mx.log(ss) for mm, ss in zip(m, s1)]
    ssum = {(b, p): a[b, p] * exp((m[b] - lse[b]) * 0.5) for (b, p) in a}
    mx.eval(lse, list(ssum.values()))

    # pass 2: cotangents, gradient at the head input, head projections
    g_xn = {(b, p): mx.zeros_like(xs[b]) for b in range(len(xs)) for p in range(n_probes)}
    proj = {(b, p): np.zeros((xs[b].shape[0], len(widths)), dtype=np.float64) for b in range(len(xs)) for p in range(n_probes)}
    rows: dict[int, mx.array] = {}
    for s0, s_1 in slices:
        ws = w_store[s0:s_1].astype(mx.float32)
        dw = _head_errors(ws, head_target, widths, out_dtype)
        if dw is not None:
            mx.eval(dw)
            if tied_ids is not None:
                inside = tied_ids[(tied_ids >= s0) & (tied_ids < s_1)]
                for i, r in zip(inside, mx.split(dw[:, mx.array(inside - s0)], len(inside), axis=1) if len(inside) else []):
                    rows[int(i)] = r[:, 0]
            dw32 = dw.astype(mx.float32)
            nb, vs, hd = dw32.shape
            dwt = dw32.transpose(1, 0, 2).reshape(vs, nb * hd)
        for b, xn in enumerate(xs):
            z = xn @ ws.T
            for p in range(n_probes):
                c = _cotangent(z, lse[b], probes.bits(b, p, s0, s_1), ssum[b, p])
                g_xn[b, p] = g_xn[b, p] + c @ ws
                if dw is not None:
                    d = (c @ dwt).reshape(xn.shape[0], nb, hd)
                    part = _rowdot(d, xn)
                    mx.eval(part, g_xn[b, p])
                    proj[b, p] += np.asarray(part)
                else:
                    mx.eval(g_xn[b, p])
        prog.step()
    del w_store
    mx.clear_cache()  # see round_write.round_and_write

    # back through the final norm: gradient at the last block's output
    grads = {}
    with bm.rest():
        for (b, p), g in g_xn.items():
            x = batches[b]
            _, (gh,) = mx.vjp(lambda h, x=x: bm.head_input(x, h).reshape(-1, g.shape[-1]), [states.get(L, b)], [g])
            mx.eval(gh)
            grads[b, p] = gh
    tied_proj: dict[tuple[int, int], np.ndarray] = {}
    if head_target is not None:
        if bm.head.tied and emb_target is not None:
            tied_proj = proj
        else:
            for pr in proj.values():
                acc.add(head_target.path, pr)
    return grads, tied_proj, (rows if tied_ids is not None else None)


def _leaf_shapes(bm: BlockModel, k: int, x: mx.array, h: mx.array, mods: dict[int, tuple]) -> list[tuple]:
    calls: list[tuple] = []

    def record(m, args, kwargs, out):
        calls.append((mods[id(m)][1], _use(kwargs), tuple(out.shape)))

    bm.block_output(k, x, h, {i: (m, record) for i, (m, _) in mods.items()})
    return calls


def _probe_vjp(run: Callable[..., mx.array], primals: list[mx.array], mods: dict[int, tuple], calls: list[tuple], cot: mx.array):
    """``run(hooks, *primals)`` differentiated with zero probes added to each leaf call's
    output: ``(gradients at the primals, [(target, use, leaf args, gradient at the leaf output)])``."""
    captured: list[tuple] = []
    probes_in: list[mx.array] = []
    n = len(primals)

    def inject(m, args, kwargs, out):
        k = len(captured)
        captured.append(args)
        return out.astype(mx.float32) + probes_in[k]  # fp32 on: an embedding read as stored is bf16

    hooks = {i: (m, inject) for i, (m, _) in mods.items()}

    def f(*prim):
        probes_in[:] = prim[n:]
        captured.clear()
        return run(hooks, *prim[:n])

    zeros = [mx.zeros(s, dtype=mx.float32) for _, _, s in calls]
    _, vjps = mx.vjp(f, list(primals) + zeros, [cot])
    mx.eval(vjps, captured)
    return vjps[:n], [(t, use, args, g) for (t, use, _), args, g in zip(calls, captured, vjps[n:])]


def backward_stage(
    bm: BlockModel,
    batches: list[mx.array],
    states: BoundaryStates,
    grads: dict[tuple[int, int], mx.array],
    active: list[Target],
    bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    acc: _Accumulator,
    log: Callable[[str], None] | None,
) -> None:
    """Stage 3: blocks in reverse; ``grads`` ends as the gradients at block 0's input."""
    L = len(bm.layers)
    prog = Progress("backward", L, log)
    for k in reversed(range(L)):
        targets = [t for t in active if t.layer == k]
        with bm.block(k):
            bank = ErrorBank.rtn(bm.model, targets, bits, out_dtype)
            mods = {id(get_module(bm.model, t.path)): (get_module(bm.model, t.path), t) for t in targets}
            for b, x in enumerate(batches):
                h = states.get(k, b)
                calls = _leaf_shapes(bm, k, x, h, mods)
                for (bb, p) in [key for key in grads if key[0] == b]:
                    (gin,), leaf = _probe_vjp(
                        lambda hooks, hh, x=x: bm.block_output(k, x, hh, hooks), [h], mods, calls, grads[bb, p]
                    )
                    proj: dict[str, np.ndarray] = {}
                    for t, use, args, g in leaf:
                        s_ = _project(t, use, args, g, bank)
                        proj[t.path] = proj[t.path] + s_ if t.path in proj else s_
                    for path, s_ in proj.items():
                        acc.add(path, s_)
                    grads[bb, p] = gin
            del bank
        mx.clear_cache()
        prog.step()


def embedding_stage(
    bm: BlockModel,
    batches: list[mx.array],
    grads: dict[tuple[int, int], mx.array],
    emb: Target,
    bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    acc: _Accumulator,
    tied_proj: dict[tuple[int, int], np.ndarray],
    rows: dict[int, mx.array] | None,
) -> None:
    """Stage 4: the embedding's projections from the gradient at block 0's input."""
    name = emb.path + ".weight"
    widths = _widths(emb, bits)
    if rows is None:  # untied: RTN errors of the calibration tokens' rows only (rows round alone)
        ids = np.unique(np.concatenate([np.asarray(x).reshape(-1) for x in batches]))
        fresh = bm.source.fresh()
        w = fresh.pop(name)[mx.array(ids)].astype(mx.float32)
        del fresh
        err = mx.stack([rtn_error(w, b, emb.group_size, out_dtype) for b in widths]).astype(mx.float16)
        mx.eval(err)
        rows = {int(i): err[:, j] for j, i in enumerate(ids)}
    with bm.materialized([name], dtype=None), bm.rest():
        mod = get_module(bm.model, emb.path)
        mods = {id(mod): (mod, emb)}
        for (b, p), g0 in grads.items():
            x = batches[b]
            calls = []

            def record(m, args, kwargs, out):
                calls.append((emb, _use(kwargs), tuple(out.shape)))

            bm.first_input(x, {id(mod): (mod, record)})
            _, leaf = _probe_vjp(lambda hooks, x=x: bm.first_input(x, hooks).astype(mx.float32), [], mods, calls, g0)
            ids = np.asarray(x).reshape(-1)
            d = mx.stack([rows[int(i)] for i in ids], axis=1).astype(mx.float32)  # [widths, N, H]
            (_, _, _, g), = leaf
            g2 = g.reshape(-1, g.shape[-1])
            s_ = np.asarray((d * g2[None]).sum(-1).T)
            if (b, p) in tied_proj:
                s_ = s_ + tied_proj[b, p]
            acc.add(emb.path, s_)


def streamed_fisher(
    bm: BlockModel,
    tokens: np.ndarray,
    active: list[Target],
    bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    *,
    batch_size: int = 8,
    n_probes: int = 1,
    seed: int = 0,
    spill: bool = False,
    tile_budget: int = 256 << 20,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, LeafSensitivity], BoundaryStates, list[mx.array]]:
    """Second-order KL estimates for every leaf and width, streamed (see module doc).

    Returns the estimates, the block inputs (the write stage replays them for Hessians)
    and the calibration batches.
    """
    t0 = time.time()
    n_probes = max(int(n_probes), 1)
    batches = [mx.array(tokens[s : s + batch_size]) for s in range(0, len(tokens), batch_size)]
    states = forward_states(bm, batches, spill, log)
    check_head(bm, batches[0], states.get(len(bm.layers), 0))
    by_path = {t.path: t for t in active}
    head_t = by_path.get(bm.head.path)
    emb_t = by_path.get(bm.embedding.path) if bm.embedding is not None else None
    fresh = bm.source.fresh()
    vocab = int(fresh[bm.head.weight_name].shape[0])
    del fresh
    probes = Probes([int(x.size) for x in batches], n_probes, vocab, seed)
    acc = _Accumulator(active, bits)
    acc.n_probes = n_probes
    acc.n_tokens = int(sum(x.size for x in batches))
    grads, tied_proj, rows = head_stage(
        bm, batches, states, probes, n_probes, head_t, emb_t, bits, out_dtype, acc, tile_budget, log,
    )
    backward_stage(bm, batches, states, grads, active, bits, out_dtype, acc, log)
    if emb_t is not None:
        embedding_stage(bm, batches, grads, emb_t, bits, out_dtype, acc, tied_proj, rows)
    if log is not None:
        log(f"sensitivity: {len(active)} layers estimated in {time.time() - t0:.1f}s")
    return acc.results(), states, batches
