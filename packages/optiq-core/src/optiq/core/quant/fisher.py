"""Fast sensitivity estimate: second-order KL from output-Fisher probes.

For a small change ``dz`` of the logits at one position, ``KL(p || softmax(z + dz)) =
1/2 dz^T F dz + O(dz^3)`` with ``F = diag(p) - p p^T`` (the Fisher information of the
reference distribution). A leaf's quantization error changes its output by
``d_t = dW x_t`` at each position, and the logits by ``J d``. Writing ``F = A A^T`` and
drawing a random sign vector ``e`` per position, ``c = A e`` satisfies
``E[(c^T J d)^2] = (J d)^T F (J d)``, and ``g = J^T c`` -- the gradient of ``c . z`` with
respect to the leaf's *output* -- comes from one backward pass for *all* leaves at once.
So, with a few probe backward passes and the recorded leaf inputs,

    KL_leaf(bits) ~= 1/2 mean_t mean_probes (g_t . (dW_bits x_t))^2

for every leaf and every candidate width, where the measured estimator
(:mod:`.sensitivity`) needs one forward pass per leaf and width. The estimate is exact to
second order in the perturbation (tested against measured KL in tests/test_convert_*).
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .gdn import fast_gated_delta
from .hooks import call_hooks
from .sensitivity import LeafSensitivity, Reference, quantize_targets
from .targets import Target, get_module


def fisher_cotangent(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``c = A e`` with ``A A^T = diag(p) - p p^T`` and Rademacher ``e``, per row of ``p``."""
    e = rng.integers(0, 2, size=p.shape, dtype=np.int8).astype(np.float32) * 2 - 1
    sp = np.sqrt(p)
    return (sp * e - p * (sp * e).sum(-1, keepdims=True)).astype(np.float32)


def _expert_rows(x: mx.array, idx: mx.array) -> tuple[np.ndarray, np.ndarray]:
    xs = x.squeeze(-2) if x.ndim >= 2 and x.shape[-2] == 1 else x
    xs = mx.broadcast_to(xs, tuple(idx.shape) + (xs.shape[-1],))
    return np.asarray(xs.reshape(-1, xs.shape[-1]).astype(mx.float32)), np.asarray(idx.reshape(-1))


def fisher_sensitivities(
    model: nn.Module,
    ref: Reference,
    targets: list[Target],
    candidate_bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    rounding: str = "gptq",
    n_probes: int = 2,
    seed: int = 0,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, LeafSensitivity]:
    """Second-order KL estimates for every quantizable leaf and candidate width."""
    rng = np.random.default_rng(seed)
    active = [t for t in targets if t.quantizable]
    # weight errors of every (leaf, width)
    deltas: dict[str, dict[int, np.ndarray]] = {}
    allq = quantize_targets(
        model, active, {t.path: ((t.pinned["bits"],) if t.pinned else candidate_bits) for t in active},
        out_dtype, rounding, ref,
    )
    for t in active:
        w = np.asarray(get_module(model, t.path)["weight"].astype(mx.float32))
        qs = allq.pop(t.path)
        deltas[t.path] = {b: (q.dequantize() - w).astype(np.float32) for b, q in qs.items()}
        if progress is not None:
            progress(t.path, -1)
    sums = {t.path: {b: 0.0 for b in deltas[t.path]} for t in active}
    widths = {t.path: list(deltas[t.path]) for t in active}
    # One copy of the errors, in fp16 (halves memory; cast to fp32 for each GEMM):
    # [nb, out, in] as an MLX array for linear layers and embeddings (multi-threaded
    # BLAS), numpy for expert pools (per-expert loops).
    dmx: dict[str, mx.array] = {}
    for t in active:
        if t.kind in ("linear", "embedding"):
            dmx[t.path] = mx.array(np.stack([deltas[t.path][b] for b in widths[t.path]]).astype(np.float16))
            del deltas[t.path]
    n_tokens = 0
    mods = {t.path: get_module(model, t.path) for t in active}
    by_id = {id(m): t for t in active for m in [mods[t.path]]}

    for bi, x in enumerate(ref.batches):
        p = ref.dists[bi].p
        shapes: dict[str, list[tuple[int, ...]]] = {}

        def record(m, args, kwargs, out):
            t = by_id[id(m)]
            key = f"{t.path}|{'head' if kwargs.get('as_linear') else 'main'}"
            shapes.setdefault(key, []).append(tuple(out.shape))

        with fast_gated_delta(), call_hooks({id(m): (m, record) for m in mods.values()}):
            model(x)  # lazy: builds the graph for the shapes, computes nothing
        keys = [(k, j) for k, v in shapes.items() for j in range(len(v))]
        pos = {kj: i for i, kj in enumerate(keys)}
        for _ in range(n_probes):
            probes = [mx.zeros(shapes[k][j], dtype=mx.float32) for k, j in keys]
            counter: dict[str, int] = {}
            captured: dict[str, list[tuple[Any, ...]]] = {}

            def fwd(*pr):
                counter.clear()
                captured.clear()

                def inject(m, args, kwargs, out):
                    t = by_id[id(m)]
                    key = f"{t.path}|{'head' if kwargs.get('as_linear') else 'main'}"
                    j = counter.get(key, 0)
                    counter[key] = j + 1
                    captured.setdefault(key, []).append(args)
                    return out + pr[pos[(key, j)]].astype(out.dtype)

                with fast_gated_delta(), call_hooks({id(m): (m, inject) for m in mods.values()}):
                    return [model(x).astype(mx.float32)]

            c = fisher_cotangent(p, rng).reshape(tuple(x.shape) + (p.shape[-1],))
            _, grads = mx.vjp(fwd, probes, [mx.array(c)])
            mx.eval(grads)
            proj: dict[str, np.ndarray] = {}
            for t in active:
                bits_t = widths[t.path]
                for kind in ("main", "head"):
                    key = f"{t.path}|{kind}"
                    for j, args in enumerate(captured.get(key, [])):
                        g = grads[pos[(key, j)]]
                        g = g.reshape(-1, g.shape[-1])
                        if t.kind == "embedding" and kind == "main":
                            ids = args[0].reshape(-1)
                            # [N, nb, H]: the embedding rows' errors at each position
                            d = dmx[t.path][:, ids].astype(mx.float32)  # [nb, N, H]
                            s_ = (d * g[None]).sum(-1).T
                        elif t.kind == "experts":
                            X, I = _expert_rows(args[0], args[1])
                            gn = np.asarray(g)
                            s_np = np.zeros((len(X), len(bits_t)), dtype=np.float32)
                            for e in np.unique(I):
                                sel = I == e
                                for k, b in enumerate(bits_t):
                                    s_np[sel, k] = np.einsum("ij,ij->i", X[sel] @ deltas[t.path][b][e].T, gn[sel])
                            s_ = mx.array(s_np)
                        else:
                            X = args[0].astype(mx.float32).reshape(-1, args[0].shape[-1])
                            # all widths in one GEMM: [N, nb*out] -> [N, nb, out]
                            dw = dmx[t.path].astype(mx.float32)
                            dw = dw.reshape(-1, dw.shape[-1])  # [nb*out, in]
                            d = (X @ dw.T).reshape(X.shape[0], len(bits_t), -1)
                            s_ = (d * g[:, None, :]).sum(-1)
                        # tied embeddings: both uses move the same logits, so their
                        # contributions add before squaring. Expert slots are kept
                        # separate (different experts' errors are independent).
                        s_ = np.asarray(s_.astype(mx.float32))
                        proj[t.path] = proj[t.path] + s_ if t.path in proj else s_
            for path, s_ in proj.items():
                sq = (s_.astype(np.float64) ** 2).sum(0)
                for k, b in enumerate(widths[path]):
                    sums[path][b] += float(sq[k])
        n_tokens += x.size
        if progress is not None:
            progress("batch", bi)

    results = {}
    for t in active:
        kl = {b: 0.5 * v / (n_tokens * n_probes) for b, v in sums[t.path].items()}
        running = np.inf
        for b in sorted(kl):
            running = min(running, kl[b])
            kl[b] = float(running)
        results[t.path] = LeafSensitivity(t.path, dict(sorted(kl.items())), [])
    return results
