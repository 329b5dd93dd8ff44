"""Measure each layer's sensitivity: KL of the output distribution with only it quantized.

One reference forward pass over the calibration tokens records, per batch, the reference
next-token distribution and every decoder layer's output, and per quantizable leaf the
Hessian ``E[x x^T]`` of its input (for GPTQ rounding and output-error estimates).

Then, for each leaf and candidate bit width, the leaf's weight is replaced by its
quantize-dequantize image (fp32, BLAS matmuls; never MLX's CPU quantized matmul) and
the model runs *from that leaf's decoder layer on*: earlier layers replay their recorded
outputs. The mean per-token KL to the reference is the leaf's sensitivity at that width.

A width whose predicted KL is negligible is predicted instead of measured: the KL of a
small weight perturbation is quadratic in the layer-output error, so
``KL(b) ~= KL(b_low) * E(b) / E(b_low)`` with ``E`` the Hessian-weighted output error
``tr(dW H dW^T)``. By default a width is measured when that prediction is at least 2% of
the leaf's KL at its lowest width (for 4/8-bit candidates, 8-bit is predicted).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..architecture import decoder_layers
from ..kl import RefDist, kl_per_token
from .gdn import fast_gated_delta
from .hooks import call_hooks, replay_layers
from .rounding import Quantized, quantize_weight
from .targets import Target, get_module

MEASURE_FLOOR = 0.02
# Expert-pool Hessians bigger than this (bytes) keep only their diagonal.
MAX_EXPERT_HESSIAN_BYTES = 256 << 20


@dataclass
class Reference:
    """Everything recorded by the reference pass."""

    batches: list[mx.array]
    dists: list[RefDist]
    layer_outputs: list[list[mx.array]]
    hessians: dict[str, np.ndarray]  # E[x x^T]: [in, in] or [experts, in, in] (or diag)
    hessian_key: dict[str, str]  # leaf -> key in ``hessians`` (leaves with one input share)
    token_counts: np.ndarray  # calibration token frequencies (embedding error weights)
    start_layer: dict[str, int]  # where a partial forward must start for each leaf
    replay_ok: bool = True
    replay_checked: bool = True
    seconds: float = 0.0

    @property
    def n_layers(self) -> int:
        return len(self.layer_outputs[0]) if self.layer_outputs else 0


def _accumulate_linear(store: dict, key: str, x: mx.array) -> None:
    x2 = x.reshape(-1, x.shape[-1]).astype(mx.float32)
    h = x2.T @ x2
    if key in store:
        store[key] = (store[key][0] + h, store[key][1] + x2.shape[0])
    else:
        store[key] = (h, x2.shape[0])


def _accumulate_experts(store: dict, key: str, x: mx.array, idx: mx.array, n_exp: int, diag_only: bool) -> None:
    xs = x.squeeze(-2) if x.ndim >= 2 and x.shape[-2] == 1 else x
    xs = mx.broadcast_to(xs, tuple(idx.shape) + (xs.shape[-1],))
    X = np.asarray(xs.reshape(-1, xs.shape[-1]).astype(mx.float32))
    I = np.asarray(idx.reshape(-1))
    d = X.shape[-1]
    if key not in store:
        shape = (n_exp, d) if diag_only else (n_exp, d, d)
        store[key] = (np.zeros(shape, dtype=np.float64), np.zeros(n_exp, dtype=np.int64))
    h, c = store[key]
    for e in np.unique(I):
        Xe = X[I == e].astype(np.float64)
        if diag_only:
            h[e] += (Xe * Xe).sum(0)
        else:
            h[e] += Xe.T @ Xe
        c[e] += len(Xe)


class ReferenceRecorder:
    """Hooks that record, while the full-precision model runs over calibration batches,
    everything a :class:`Reference` holds (layer outputs, leaf-input Hessians, the order
    leaves run in). Used by :func:`capture_reference` and, to share one forward pass with
    the probe backward pass, by :func:`optiq.core.quant.fisher.reference_and_estimate`.
    """

    def __init__(self, model: nn.Module, targets: list[Target]):
        self.model = model
        self.targets = targets
        self.n_layers = len(decoder_layers(model))
        self.store: dict[str, Any] = {}
        self.order: list[tuple[str, Any]] = []
        self.first_order: list[tuple[str, Any]] = []
        self.cur_outputs: list[mx.array | None] = [None] * self.n_layers
        self.batch_inputs: dict[int, tuple[mx.array, str]] = {}
        self.shared: dict[str, str] = {}  # leaf -> leaf whose identical input it shares
        self.batches: list[mx.array] = []
        self.dists: list[RefDist] = []
        self.outs: list[list[mx.array | None]] = []

    def hooks(self) -> dict[int, tuple[nn.Module, Callable]]:
        """``call_hooks`` mapping: decoder layers record outputs, leaves their inputs."""
        hooks: dict[int, tuple[nn.Module, Callable]] = {}
        for i, layer in enumerate(decoder_layers(self.model)):
            hooks[id(layer)] = (layer, self._layer_hook(i))
        for t in self.targets:
            if t.quantizable:
                mod = get_module(self.model, t.path)
                hooks[id(mod)] = (mod, self._leaf_hook(t))
        return hooks

    def _layer_hook(self, i: int) -> Callable:
        def fn(mod, args, kwargs, out):
            self.cur_outputs[i] = out
            self.order.append(("layer", i))

        return fn

    def _leaf_hook(self, t: Target) -> Callable:
        store = self.store

        def fn(m, args, kwargs, out):
            self.order.append(("leaf", t.path))
            if t.kind == "embedding":
                if kwargs.get("as_linear"):
                    _accumulate_linear(store, t.path, args[0])
                return
            if t.kind == "experts":
                n_exp = m["weight"].shape[0]
                d = m["weight"].shape[-1]
                diag = n_exp * d * d * 8 > MAX_EXPERT_HESSIAN_BYTES
                _accumulate_experts(store, t.path, args[0], args[1], n_exp, diag)
                return
            x = args[0]
            seen = self.batch_inputs.get(id(x))
            if seen is not None and seen[0] is x:  # same input as an earlier leaf (q/k/v...)
                self.shared[t.path] = seen[1]
                return
            self.batch_inputs[id(x)] = (x, t.path)  # holding x keeps its id unique in the batch
            _accumulate_linear(store, t.path, x)

        return fn

    def begin_batch(self) -> None:
        self.order.clear()
        self.batch_inputs.clear()

    def end_batch(self, x: mx.array, logits: mx.array) -> None:
        """Evaluate what the batch recorded and keep it (call after the forward pass)."""
        mx.eval(logits, [o for o in self.cur_outputs if o is not None])
        mx.eval([v[0] for v in self.store.values() if isinstance(v[0], mx.array)])
        self.batch_inputs.clear()
        self.batches.append(x)
        self.dists.append(RefDist.from_logits(logits))
        self.outs.append(list(self.cur_outputs))
        if len(self.batches) == 1:
            self.first_order = list(self.order)

    def finish(self, tokens: np.ndarray, t0: float) -> Reference:
        """The :class:`Reference` (Hessians normalized and de-duplicated, start layers)."""
        flat = tokens.reshape(-1)
        counts = np.bincount(flat, minlength=max(int(flat.max()) + 1, 1))
        hessians, hessian_key = _finish_hessians(self.store, self.shared)
        return Reference(
            batches=self.batches,
            dists=self.dists,
            layer_outputs=self.outs,
            hessians=hessians,
            hessian_key=hessian_key,
            token_counts=counts,
            start_layer=_start_layers(self.targets, self.first_order, self.n_layers),
            seconds=time.time() - t0,
        )


def _finish_hessians(store: dict[str, Any], shared: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Normalize accumulated ``sum x x^T`` to ``E[x x^T]`` and keep one copy of equal ones."""
    hessians = {}
    for key in shared:  # a leaf fed a shared input keeps no Hessian of its own
        store.pop(key, None)
    for key, (h, c) in store.items():
        if isinstance(h, mx.array):
            hessians[key] = np.asarray(h).astype(np.float64) / max(int(c), 1)
        else:
            cc = np.maximum(c, 1).astype(np.float64)
            hessians[key] = h / (cc[:, None] if h.ndim == 2 else cc[:, None, None])
            hessians[key + "#counts"] = c.astype(np.float64)

    # Leaves fed the same input (q/k/v, gate/up, GDN in_proj_*) have bit-identical
    # Hessians: keep one copy, and round such leaves together (one GPTQ sweep).
    hessian_key: dict[str, str] = dict(shared)
    canonical: dict[tuple, str] = {}
    for key in list(hessians):
        if "#" in key:
            continue
        h = hessians[key]
        sig = (h.shape, hashlib.sha1(np.ascontiguousarray(h).tobytes()).hexdigest())
        first = canonical.get(sig)
        if first is not None and np.array_equal(hessians[first], h) and f"{key}#counts" not in hessians:
            hessian_key[key] = first
            del hessians[key]
        else:
            canonical[sig] = key
            hessian_key[key] = key
    for key in hessian_key:  # resolve chains (follower -> leader -> identical earlier leaf)
        k = hessian_key[key]
        while hessian_key.get(k, k) != k:
            k = hessian_key[k]
        hessian_key[key] = k
    return hessians, hessian_key


def _start_layers(targets: list[Target], first_order: list[tuple[str, Any]], n_layers: int) -> dict[str, int]:
    """Where a partial forward must start for each leaf."""
    last_layer_pos = max((k for k, (kind, _) in enumerate(first_order) if kind == "layer"), default=-1)
    start = {}
    for t in targets:
        if t.layer is not None:
            start[t.path] = t.layer
        else:
            pos = [k for k, (kind, p) in enumerate(first_order) if kind == "leaf" and p == t.path]
            start[t.path] = n_layers if pos and min(pos) > last_layer_pos and t.kind != "embedding" else 0
    return start


def capture_reference(
    model: nn.Module,
    tokens: np.ndarray,
    targets: list[Target],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    check_replay: bool = True,
) -> Reference:
    """Run the full-precision model once over ``tokens`` [n, T] and record what we need."""
    t0 = time.time()
    rec = ReferenceRecorder(model, targets)
    with fast_gated_delta(), call_hooks(rec.hooks()):
        for s in range(0, len(tokens), batch_size):
            x = mx.array(tokens[s : s + batch_size])
            rec.begin_batch()
            rec.end_batch(x, model(x))
            if progress:
                progress(len(x))
    ref = rec.finish(tokens, t0)
    ref.replay_ok = _check_replay(model, ref) if check_replay else False
    ref.replay_checked = check_replay
    return ref


def forward_from(model: nn.Module, ref: Reference, batch: int, start: int) -> mx.array:
    """Logits of ``model`` on calibration batch ``batch``, computing layers ``start..``."""
    x = ref.batches[batch]
    if start <= 0 or not ref.replay_ok:
        return model(x)
    layers = decoder_layers(model)
    with replay_layers(layers[:start], ref.layer_outputs[batch][:start]):
        return model(x)


def _check_replay(model: nn.Module, ref: Reference) -> bool:
    """Replaying recorded layer outputs must reproduce the reference exactly.

    Checked with every layer replayed and with only the last one computed (both cheap).
    """
    n = ref.n_layers
    if n == 0:
        return False
    with fast_gated_delta():
        for start in sorted({n, max(n - 1, 0)}):
            layers = decoder_layers(model)
            with replay_layers(layers[:start], ref.layer_outputs[0][:start]):
                logits = model(ref.batches[0])
            kl = kl_per_token(ref.dists[0], logits).mean()
            if not np.isfinite(kl) or kl > 1e-8:
                return False
    return True


def mean_kl(model: nn.Module, ref: Reference, start: int) -> float:
    total, count = 0.0, 0
    with fast_gated_delta():
        for b in range(len(ref.batches)):
            logits = forward_from(model, ref, b, start)
            kl = kl_per_token(ref.dists[b], logits)
            total += float(kl.sum())
            count += kl.size
    return total / max(count, 1)


def output_error(t: Target, w: np.ndarray, q: Quantized, ref: Reference) -> float:
    """Hessian-weighted error ``tr(dW H dW^T)`` (per calibration token) of one quantization."""
    dw = (w - q.dequantize()).astype(np.float64)
    h = ref.hessians.get(ref.hessian_key.get(t.path, t.path))
    if t.kind == "embedding":
        if h is not None:  # tied head: error on the head side
            return _quad(dw, h)
        c = ref.token_counts
        f = np.zeros(dw.shape[0])
        n = min(len(c), len(f))
        f[:n] = c[:n]
        f = f / max(f.sum(), 1.0)
        return float((f[:, None] * dw * dw).sum())
    if h is None:
        return float((dw * dw).sum())
    if t.kind == "experts":
        counts = ref.hessians.get(t.path + "#counts")
        frac = counts / max(counts.sum(), 1.0) if counts is not None else np.ones(len(dw))
        if h.ndim == 2:  # diagonal only
            return float(sum(frac[e] * (dw[e] ** 2 * h[e][None, :]).sum() for e in range(len(dw))))
        return float(sum(frac[e] * _quad(dw[e], h[e]) for e in range(len(dw))))
    return _quad(dw, h)


def _quad(dw: np.ndarray, h: np.ndarray) -> float:
    """``tr(dW H dW^T)`` with one GEMM (einsum with three operands does not use BLAS)."""
    return float(((dw @ h) * dw).sum())


def hessian_for_rounding(t: Target, ref: Reference | None) -> np.ndarray | None:
    if ref is None:
        return None
    h = ref.hessians.get(ref.hessian_key.get(t.path, t.path))
    if h is None:
        return None
    if t.kind == "experts" and h.ndim == 2:
        # diagonal only: rounding uses it as column weights through a diagonal matrix
        return np.stack([np.diag(d) for d in h])
    return h


def quantize_targets(
    model: nn.Module,
    targets: list[Target],
    bits_of: dict[str, tuple[int, ...]],
    out_dtype: mx.Dtype,
    rounding: str,
    ref: Reference | None,
) -> dict[str, dict[int, Quantized]]:
    """Quantize each target at each of its widths; leaves sharing an input share one pass."""
    from .rounding import quantize_rows

    out: dict[str, dict[int, Quantized]] = {}
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        key = ref.hessian_key.get(t.path, t.path) if ref is not None else t.path
        if t.kind != "linear" or rounding == "rtn":
            key = t.path
        groups.setdefault((key, t.group_size), []).append(t)
    for (_, g), members in groups.items():
        ws = {t.path: np.asarray(get_module(model, t.path)["weight"].astype(mx.float32)) for t in members}
        if len(members) == 1:
            t = members[0]
            out[t.path] = quantize_weight(ws[t.path], bits_of[t.path], g, out_dtype, rounding, hessian_for_rounding(t, ref))
            continue
        blocks = [(ws[t.path], b) for t in members for b in bits_of[t.path]]
        qs = iter(quantize_rows(blocks, g, out_dtype, rounding, hessian_for_rounding(members[0], ref)))
        for t in members:
            out[t.path] = {b: next(qs) for b in bits_of[t.path]}
    return out


@dataclass
class LeafSensitivity:
    path: str
    kl: dict[int, float]
    measured: list[int]
    error: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kl": {str(b): v for b, v in self.kl.items()},
            "measured": self.measured,
            "error": {str(b): v for b, v in self.error.items()},
        }

    @classmethod
    def from_json(cls, path: str, d: dict[str, Any]) -> "LeafSensitivity":
        return cls(
            path=path,
            kl={int(b): float(v) for b, v in d["kl"].items()},
            measured=[int(b) for b in d["measured"]],
            error={int(b): float(v) for b, v in d.get("error", {}).items()},
        )


class Checkpoint:
    """Sensitivities measured so far, saved atomically after every leaf."""

    def __init__(self, path: Path | None, fingerprint: str, resume: bool = True):
        self.path = path
        self.fingerprint = fingerprint
        self.results: dict[str, LeafSensitivity] = {}
        if path is not None and resume and path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get("fingerprint") == fingerprint:
                    self.results = {
                        p: LeafSensitivity.from_json(p, d) for p, d in data["results"].items()
                    }
            except (OSError, ValueError, KeyError):
                self.results = {}
        self.resumed = len(self.results)

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        data = {
            "fingerprint": self.fingerprint,
            "results": {p: r.to_json() for p, r in self.results.items()},
        }
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def bits_to_measure(errors: dict[int, float], floor: float) -> list[int]:
    """Widths whose predicted KL is at least ``floor`` times the lowest width's."""
    bits = sorted(errors)
    base = errors[bits[0]]
    if base <= 0:
        return bits[:1]
    return [b for b in bits if errors[b] / base >= floor]


def measure_sensitivities(
    model: nn.Module,
    ref: Reference,
    targets: list[Target],
    candidate_bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    rounding: str = "gptq",
    measure_floor: float = MEASURE_FLOOR,
    checkpoint: Checkpoint | None = None,
    progress: Any = None,
) -> dict[str, LeafSensitivity]:
    """KL at each candidate width for each quantizable leaf (pinned leaves: their width)."""
    results = dict(checkpoint.results) if checkpoint else {}
    todo = [t for t in targets if t.quantizable and (t.path not in results or not results[t.path].measured)]
    if not ref.replay_checked and any(ref.start_layer.get(t.path, 0) > 0 for t in todo):
        ref.replay_ok = _check_replay(model, ref)
        ref.replay_checked = True
    qcache: dict[str, dict[int, Quantized]] = {}
    for t in todo:
        mod = get_module(model, t.path)
        w_orig = mod["weight"]
        w = np.asarray(w_orig.astype(mx.float32))
        bits = (t.pinned["bits"],) if t.pinned else candidate_bits
        if t.path not in qcache:  # quantize t and the not-yet-measured leaves sharing its input
            key = ref.hessian_key.get(t.path, t.path)
            mates = [u for u in todo if u.path not in results and ref.hessian_key.get(u.path, u.path) == key]
            mates = mates if t in mates else [t]
            qcache.update(quantize_targets(
                model, mates, {u.path: ((u.pinned["bits"],) if u.pinned else candidate_bits) for u in mates},
                out_dtype, rounding, ref,
            ))
        qs = qcache.pop(t.path)
        errors = {b: output_error(t, w, q, ref) for b, q in qs.items()}
        measure = bits_to_measure(errors, measure_floor) if len(bits) > 1 else list(bits)
        kl: dict[int, float] = {}
        start = ref.start_layer.get(t.path, 0)
        for b in measure:
            mod["weight"] = mx.array(qs[b].dequantize()).astype(w_orig.dtype)
            try:
                kl[b] = mean_kl(model, ref, start)
            finally:
                mod["weight"] = w_orig
            if progress is not None:
                progress(t.path, b)
        lo = min(measure)
        for b in bits:
            if b not in kl:
                base = errors[lo] if errors[lo] > 0 else 1.0
                # predicted from the highest measured width below it
                anchor = max(m for m in measure if m < b) if any(m < b for m in measure) else lo
                ea = errors[anchor] if errors[anchor] > 0 else base
                kl[b] = kl[anchor] * errors[b] / ea
        # quantizing with more bits never hurts more (measurement noise aside)
        running = np.inf
        for b in sorted(kl):
            running = min(running, kl[b])
            kl[b] = float(running)
        results[t.path] = LeafSensitivity(t.path, dict(sorted(kl.items())), sorted(measure), errors)
        if checkpoint is not None:
            checkpoint.results[t.path] = results[t.path]
            checkpoint.save()
    return results
