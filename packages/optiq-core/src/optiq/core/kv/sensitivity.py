"""KV sensitivity: how much does quantizing one layer's keys (or values) move the output?

For each KV layer, each of K and V, and each candidate width, the pass measures the KL
divergence of the model's next-token distributions from those of a full-precision cache
when *only* that tensor is stored quantized, averaged over every position of the
calibration sequences. K and V are measured separately because keys (which pass
through softmax) are usually far more sensitive than values.

All perturbations of one sequence run as one batch: row 0 keeps a full-precision cache
and every other row quantizes exactly one tensor (the cache rows are stored the way
:class:`~optiq.core.kv.cache.MixedKVCache` reads them back while decoding, see
:mod:`.simulate`). On the
CPU this amortises the per-token recurrent loop of linear-attention layers over all
variants, which makes the pass several times faster than one forward per variant.
The KL is :func:`optiq.core.kl.kl_per_token`, the one weight quantization and
evaluation use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx import nn

from ..calibration import cut_windows
from ..errors import DataError
from ..kl import RefDist, kl_per_token
from .layers import KVLayout, base_cache
from .simulate import SimulatedKVCache

# A variant sets, for some layers, (k_bits or None, v_bits or None); None = full precision.
Variant = dict[int, tuple[int | None, int | None]]

# Keep the batched logits (and the per-row KL temporaries) under about this size.
LOGITS_BUDGET_BYTES = 1 << 30


def _cache_for(model: nn.Module, variants: list[Variant], group_size: int, rotation: str) -> list:
    cache = base_cache(model)
    layers = {i for v in variants for i in v}
    for i in layers:
        rules = [v.get(i, (None, None)) for v in variants]
        cache[i] = SimulatedKVCache(group_size=group_size, rows=rules, rotation=rotation)
    return cache


def variant_kls(
    model: nn.Module,
    sequences: mx.array,
    variants: list[Variant],
    group_size: int,
    vocab_size: int,
    progress: Callable[[int], None] | None = None,
    rotation: str = "hadamard",
) -> list[float]:
    """Mean KL (nats per token) vs a full-precision cache for each variant, over all sequences
    (quantized tensors stored with ``rotation``, as the mixed cache would store them)."""
    n, seq_len = sequences.shape
    max_rows = max(1, LOGITS_BUDGET_BYTES // (seq_len * vocab_size * 4 * 3))
    totals = [0.0] * len(variants)
    for s in range(n):
        tokens = sequences[s : s + 1]
        ref: RefDist | None = None
        # Row 0 of the first chunk is the full-precision reference.
        todo = [{}] + list(range(len(variants)))
        chunks = [todo[i : i + max_rows] for i in range(0, len(todo), max_rows)]
        for chunk in chunks:
            rows = [variants[j] if isinstance(j, int) else j for j in chunk]
            cache = _cache_for(model, rows, group_size, rotation)
            logits = model(mx.repeat(tokens, len(rows), axis=0), cache=cache)
            if ref is None:
                ref = RefDist.from_logits(logits[0])
            for r, j in enumerate(chunk):
                if isinstance(j, int):
                    totals[j] += float(kl_per_token(ref, logits[r]).mean()) / n
            if progress is not None:
                progress(sum(isinstance(j, int) for j in chunk))
    return totals


@dataclass
class KVSensitivity:
    """Measured KL per (layer, tensor, bits): ``kl[layer]["k"|"v"][bits]``."""

    kl: dict[int, dict[str, dict[int, float]]]
    candidate_bits: tuple[int, ...]
    group_size: int
    seq_len: int
    n_samples: int
    seconds: float
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): robust to other load
    extra: dict = field(default_factory=dict)
    rotation: str = "hadamard"  # how the quantized tensors were stored while measuring

    def to_dict(self) -> dict:
        return {
            "metric": "mean KL(full-precision cache || one tensor quantized), nats per token, over all positions",
            "group_size": self.group_size,
            "rotation": self.rotation,
            "candidate_bits": list(self.candidate_bits),
            "seq_len": self.seq_len,
            "n_samples": self.n_samples,
            "seconds": round(self.seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "layers": [
                {
                    "layer": i,
                    "k": {str(b): v for b, v in sorted(d["k"].items())},
                    "v": {str(b): v for b, v in sorted(d["v"].items())},
                }
                for i, d in sorted(self.kl.items())
            ],
            **self.extra,
        }


def measure_kv_sensitivity(
    model: nn.Module,
    sequences: mx.array,
    layout: KVLayout,
    candidate_bits: tuple[int, ...],
    group_size: int,
    progress: Callable[[int], None] | None = None,
    rotation: str = "hadamard",
) -> KVSensitivity:
    """Measure K and V sensitivity of every KV layer at every candidate width."""
    tic, cpu = time.perf_counter(), time.process_time()
    keys = [(kv.index, t, b) for kv in layout.kv_layers for t in ("k", "v") for b in candidate_bits]
    variants: list[Variant] = [{i: ((b, None) if t == "k" else (None, b))} for i, t, b in keys]
    kls = variant_kls(model, sequences, variants, group_size, layout.vocab_size, progress, rotation)
    kl: dict[int, dict[str, dict[int, float]]] = {kv.index: {"k": {}, "v": {}} for kv in layout.kv_layers}
    for (i, t, b), v in zip(keys, kls):
        kl[i][t][b] = v
    return KVSensitivity(
        kl=kl,
        candidate_bits=tuple(candidate_bits),
        group_size=group_size,
        seq_len=int(sequences.shape[1]),
        n_samples=int(sequences.shape[0]),
        seconds=time.perf_counter() - tic,
        cpu_seconds=time.process_time() - cpu,
        rotation=rotation,
    )


def calibration_sequences(tokenizer, text: str, n_samples: int, seq_len: int, source: str = "text") -> mx.array:
    """``n_samples`` windows of ``seq_len`` tokens spread evenly over the tokenized text."""
    if n_samples < 1 or seq_len < 2:
        raise DataError("need n_samples >= 1 and seq_len >= 2")
    return mx.array(cut_windows(tokenizer.encode(text), n_samples, seq_len, f"calibration {source}"))
