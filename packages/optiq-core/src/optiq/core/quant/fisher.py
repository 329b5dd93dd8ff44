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

Speed (the point of this module; ``benchmarks/sensitivity_speed.py``):

* ``dW`` comes from a fake-quantization (quantize-dequantize in fp32), by default MLX's
  own round-to-nearest quantizer (``rtn``): data-free, vectorized, milliseconds per
  layer. GPTQ runs later, once per leaf at its chosen width (``convert``'s write step).
* :func:`reference_and_estimate` needs no separate reference pass: the probe's forward
  pass *is* the reference pass (probes are zeros, so outputs are exact), recording layer
  outputs, Hessians and the reference distribution while the backward pass runs. The
  cotangent ``c`` depends on ``p``, so it is computed inside the graph from the logits
  behind ``stop_gradient``.
* All widths of a leaf are projected in one fp32 GEMM (BLAS), never MLX's quantized
  matmul.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu import softmax
from .gdn import fast_gated_delta
from .hooks import call_hooks
from .sensitivity import LeafSensitivity, Reference, ReferenceRecorder, quantize_targets
from .targets import Target, get_module

# Fake-quantization used for the estimate's weight errors; "rtn" needs no calibration data.
ESTIMATE_ROUNDING = "rtn"


def fisher_cotangent(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``c = A e`` with ``A A^T = diag(p) - p p^T`` and Rademacher ``e``, per row of ``p``."""
    e = rademacher(p.shape, rng)
    sp = np.sqrt(p)
    return (sp * e - p * (sp * e).sum(-1, keepdims=True)).astype(np.float32)


def rademacher(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2, size=shape, dtype=np.int8).astype(np.float32) * 2 - 1


def _graph_cotangent(logits: mx.array, e: mx.array) -> mx.array:
    """:func:`fisher_cotangent` in MLX from the logits, outside the gradient."""
    p = mx.stop_gradient(softmax(logits.astype(mx.float32), axis=-1))
    sp = mx.sqrt(p)
    return mx.stop_gradient(sp * e - p * (sp * e).sum(-1, keepdims=True))


def rtn_error(w: mx.array, bits: int, group_size: int, dtype: mx.Dtype) -> mx.array:
    """``Q(w) - w`` in fp32 for MLX's own quantizer on ``w`` cast to ``dtype``.

    Equals ``rounding.quantize_rtn`` (what ``mlx_lm.convert`` writes) but stays in MLX:
    no code unpacking, no numpy round trip.
    """
    wq, s, b = mx.quantize(w.astype(dtype), group_size=group_size, bits=bits)
    deq = mx.dequantize(wq, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
    return deq - w.astype(mx.float32)


def _widths(t: Target, candidate_bits: tuple[int, ...]) -> tuple[int, ...]:
    return (t.pinned["bits"],) if t.pinned else tuple(candidate_bits)


class ErrorBank:
    """Every leaf's weight error at every width, laid out for the projections.

    Linear layers and embeddings: one ``[widths, out, in]`` fp16 MLX array (fp16 halves
    memory; cast to fp32 for each GEMM). Expert pools: numpy per width (per-expert loops).
    """

    def __init__(self, widths: dict[str, tuple[int, ...]]):
        self.widths = widths
        self.stacked: dict[str, mx.array] = {}
        self.experts: dict[str, dict[int, np.ndarray]] = {}

    def add(self, t: Target, errors: dict[int, Any]) -> None:
        if t.kind == "experts":
            self.experts[t.path] = {b: np.asarray(e, dtype=np.float32) for b, e in errors.items()}
            return
        stack = [mx.array(errors[b]) if isinstance(errors[b], np.ndarray) else errors[b] for b in self.widths[t.path]]
        self.stacked[t.path] = mx.stack(stack).astype(mx.float16)
        mx.eval(self.stacked[t.path])

    @classmethod
    def rtn(cls, model: nn.Module, active: list[Target], candidate_bits: tuple[int, ...], out_dtype: mx.Dtype) -> "ErrorBank":
        """Round-to-nearest errors (data-free: can be built before the reference pass)."""
        bank = cls({t.path: _widths(t, candidate_bits) for t in active})
        for t in active:
            w = get_module(model, t.path)["weight"]
            bank.add(t, {b: rtn_error(w, b, t.group_size, out_dtype) for b in bank.widths[t.path]})
        return bank

    @classmethod
    def rounded(
        cls, model: nn.Module, ref: Reference, active: list[Target], candidate_bits: tuple[int, ...],
        out_dtype: mx.Dtype, rounding: str,
    ) -> "ErrorBank":
        """Errors of ``rounding`` (``clip``/``gptq`` use the reference pass's Hessians)."""
        if rounding == "rtn":
            return cls.rtn(model, active, candidate_bits, out_dtype)
        bank = cls({t.path: _widths(t, candidate_bits) for t in active})
        allq = quantize_targets(model, active, bank.widths, out_dtype, rounding, ref)
        for t in active:
            w = np.asarray(get_module(model, t.path)["weight"].astype(mx.float32))
            bank.add(t, {b: (q.dequantize() - w).astype(np.float32) for b, q in allq.pop(t.path).items()})
        return bank


def _expert_rows(x: mx.array, idx: mx.array) -> tuple[np.ndarray, np.ndarray]:
    xs = x.squeeze(-2) if x.ndim >= 2 and x.shape[-2] == 1 else x
    xs = mx.broadcast_to(xs, tuple(idx.shape) + (xs.shape[-1],))
    return np.asarray(xs.reshape(-1, xs.shape[-1]).astype(mx.float32)), np.asarray(idx.reshape(-1))


def _project(t: Target, use: str, args: tuple, g: mx.array, bank: ErrorBank) -> np.ndarray:
    """Per position and width, ``g_t . (dW_b x_t)``: [positions, widths] fp32."""
    g = g.reshape(-1, g.shape[-1])
    if t.kind == "embedding" and use == "main":
        ids = args[0].reshape(-1)
        d = bank.stacked[t.path][:, ids].astype(mx.float32)  # [nb, N, H]: the rows' errors
        return np.asarray((d * g[None]).sum(-1).T)
    if t.kind == "experts":
        X, I = _expert_rows(args[0], args[1])
        gn = np.asarray(g)
        out = np.zeros((len(X), len(bank.widths[t.path])), dtype=np.float32)
        for e in np.unique(I):
            sel = I == e
            for k, b in enumerate(bank.widths[t.path]):
                out[sel, k] = np.einsum("ij,ij->i", X[sel] @ bank.experts[t.path][b][e].T, gn[sel])
        return out
    X = args[0].astype(mx.float32).reshape(-1, args[0].shape[-1])
    dw = bank.stacked[t.path].astype(mx.float32)  # [nb, out, in]
    nb, n_out, n_in = dw.shape
    # All widths in one GEMM, contracting over the larger side (same FLOPs either way;
    # the longer inner dimension runs faster and leaves a smaller product to reduce):
    # g . (dW x) as (dW x) . g when out <= in, as (g dW) . x otherwise (e.g. lm_head).
    if n_out <= n_in:
        d = (X @ dw.reshape(-1, n_in).T).reshape(X.shape[0], nb, n_out)
        return np.asarray((d * g[:, None, :]).sum(-1))
    d = (g @ dw.transpose(1, 0, 2).reshape(n_out, nb * n_in)).reshape(X.shape[0], nb, n_in)
    return np.asarray((d * X[:, None, :]).sum(-1))


def _use(kwargs: dict) -> str:
    return "head" if kwargs.get("as_linear") else "main"


class _ProbePass:
    """One probe backward pass over one batch: ``g = J^T c`` at every leaf output.

    Zero probes are added to every leaf's output (so the forward is exactly the
    reference) and differentiated; with a :class:`ReferenceRecorder` the same forward
    also records the reference.
    """

    def __init__(self, model: nn.Module, active: list[Target]):
        self.model = model
        self.mods = {t.path: get_module(model, t.path) for t in active}
        self.by_id = {id(m): t for t in active for m in [self.mods[t.path]]}

    def shapes(self, x: mx.array) -> list[tuple[str, tuple[int, ...]]]:
        """(leaf|use, output shape) per leaf call, in call order (a lazy forward: no compute)."""
        calls: list[tuple[str, tuple[int, ...]]] = []

        def record(m, args, kwargs, out):
            calls.append((f"{self.by_id[id(m)].path}|{_use(kwargs)}", tuple(out.shape)))

        with fast_gated_delta(), call_hooks({id(m): (m, record) for m in self.mods.values()}):
            self.model(x)
        return calls

    def run(
        self, x: mx.array, e: mx.array, recorder: ReferenceRecorder | None = None,
    ) -> tuple[mx.array, list[tuple[str, tuple, mx.array]]]:
        """Logits and ``(leaf|use, leaf args, g)`` per leaf call, all evaluated."""
        calls = self.shapes(x)
        probes = [mx.zeros(s, dtype=mx.float32) for _, s in calls]
        captured: list[tuple] = []
        logits_out: list[mx.array] = []

        def inject(m, args, kwargs, out):
            k = len(captured)
            captured.append(args)
            return out + probes_in[k].astype(out.dtype)

        hooks = {id(m): (m, inject) for m in self.mods.values()}
        if recorder is not None:
            hooks = _chain(recorder.hooks(), hooks)

        def loss(*pr):
            nonlocal probes_in
            probes_in = pr
            captured.clear()
            logits_out.clear()
            with fast_gated_delta(), call_hooks(hooks):
                z = self.model(x).astype(mx.float32)
            logits_out.append(z)
            return (_graph_cotangent(z, e) * z).sum()

        probes_in: tuple = ()
        if recorder is not None:
            recorder.begin_batch()
        grads = mx.grad(loss, argnums=list(range(len(probes))))(*probes)
        state = [grads, logits_out, captured]
        if recorder is not None:
            state += [[o for o in recorder.cur_outputs if o is not None],
                      [v[0] for v in recorder.store.values() if isinstance(v[0], mx.array)]]
        mx.eval(state)  # forward (reference) and backward in one evaluation
        if recorder is not None:
            recorder.end_batch(x, logits_out[0])
        return logits_out[0], [(key, args, g) for (key, _), args, g in zip(calls, captured, grads)]


def _chain(first: dict[int, tuple[nn.Module, Callable]], then: dict[int, tuple[nn.Module, Callable]]):
    """Combine two ``call_hooks`` mappings: ``first``'s hooks observe, ``then``'s may replace."""
    out = dict(first)
    for k, (m, fn2) in then.items():
        if k in out:
            fn1 = out[k][1]

            def both(mod, args, kwargs, o, __f1=fn1, __f2=fn2):
                __f1(mod, args, kwargs, o)
                return __f2(mod, args, kwargs, o)

            out[k] = (m, both)
        else:
            out[k] = (m, fn2)
    return out


class _Sums:
    """Accumulated ``sum_t (g_t . dW_b x_t)^2`` per leaf and width."""

    def __init__(self, active: list[Target], bank: ErrorBank):
        self.by_path = {t.path: t for t in active}
        self.bank = bank
        self.sums = {t.path: np.zeros(len(bank.widths[t.path])) for t in active}
        self.n_tokens = 0
        self.n_probes = 0

    def add(self, calls: list[tuple[str, tuple, mx.array]]) -> None:
        proj: dict[str, np.ndarray] = {}
        for key, args, g in calls:
            path, use = key.rsplit("|", 1)
            s_ = _project(self.by_path[path], use, args, g, self.bank)
            # tied embeddings: both uses move the same logits, so their contributions add
            # before squaring. Expert slots are kept separate (independent errors).
            proj[path] = proj[path] + s_ if path in proj else s_
        for path, s_ in proj.items():
            self.sums[path] += (s_.astype(np.float64) ** 2).sum(0)

    def results(self) -> dict[str, LeafSensitivity]:
        out = {}
        for path, s in self.sums.items():
            kl = {b: 0.5 * float(v) / max(self.n_tokens * self.n_probes, 1) for b, v in zip(self.bank.widths[path], s)}
            out[path] = LeafSensitivity(path, _monotone(kl), [])
        return out


def _monotone(kl: dict[int, float]) -> dict[int, float]:
    """More bits never hurt more (estimation noise aside)."""
    running = np.inf
    out = {}
    for b in sorted(kl):
        running = min(running, kl[b])
        out[b] = float(running)
    return out


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
    """Second-order KL estimates for every quantizable leaf and width, given a reference.

    ``rounding`` gives the weight errors (``gptq``/``clip`` use ``ref``'s Hessians).
    :func:`reference_and_estimate` is the faster path when no reference exists yet.
    """
    rng = np.random.default_rng(seed)
    active = [t for t in targets if t.quantizable]
    bank = ErrorBank.rounded(model, ref, active, candidate_bits, out_dtype, rounding)
    sums = _Sums(active, bank)
    probe = _ProbePass(model, active)
    for bi, x in enumerate(ref.batches):
        for _ in range(n_probes):
            _, calls = probe.run(x, _rademacher_mx(ref.dists[bi].p.shape, x.shape, rng))
            sums.add(calls)
        sums.n_tokens += x.size
        if progress is not None:
            progress("batch", bi)
    sums.n_probes = n_probes
    return sums.results()


def _rademacher_mx(p_shape: tuple[int, ...], x_shape: tuple[int, ...], rng: np.random.Generator) -> mx.array:
    return mx.array(rademacher(p_shape, rng).reshape(tuple(x_shape) + (p_shape[-1],)))


def reference_and_estimate(
    model: nn.Module,
    tokens: np.ndarray,
    targets: list[Target],
    candidate_bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    *,
    batch_size: int = 8,
    n_probes: int = 1,
    seed: int = 0,
    progress: Callable[[str, int], None] | None = None,
) -> tuple[Reference, dict[str, LeafSensitivity]]:
    """The reference pass and RTN-error second-order estimates from one forward+backward.

    Equivalent to :func:`.sensitivity.capture_reference` followed by
    :func:`fisher_sensitivities` with ``rounding="rtn"`` (same Reference, estimates
    equal up to the probes' randomness) at about the cost of the probe pass alone.
    Replay of recorded layer outputs is not checked here (``ref.replay_checked`` is
    False; measured passes check it when they need it).
    """
    t0 = time.time()
    rng = np.random.default_rng(seed)
    active = [t for t in targets if t.quantizable]
    bank = ErrorBank.rtn(model, active, candidate_bits, out_dtype)
    sums = _Sums(active, bank)
    probe = _ProbePass(model, active)
    recorder = ReferenceRecorder(model, targets)
    vocab: int | None = None
    for bi, s in enumerate(range(0, len(tokens), batch_size)):
        x = mx.array(tokens[s : s + batch_size])
        for k in range(max(n_probes, 1)):
            if vocab is None:
                vocab = int(model(x[:1, :1]).shape[-1])
            e = _rademacher_mx((x.size, vocab), x.shape, rng)
            _, calls = probe.run(x, e, recorder if k == 0 else None)
            sums.add(calls)
        sums.n_tokens += x.size
        if progress is not None:
            progress("batch", bi)
    sums.n_probes = max(n_probes, 1)
    ref = recorder.finish(tokens, t0)
    ref.replay_ok, ref.replay_checked = False, False
    return ref, sums.results()
