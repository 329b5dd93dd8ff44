"""KV sensitivity: how much does quantizing one layer's keys (or values) move the output?

For each KV layer, each of K and V, and each candidate width, the pass measures the KL
divergence of the model's next-token distributions from those of a full-precision cache
when *only* that tensor is stored quantized, averaged over every position of the
calibration sequences. K and V are measured separately because keys (which pass
through softmax) are usually far more sensitive than values.

Each such variant is one batch row whose cache stores that tensor the way
:class:`~optiq.core.kv.cache.MixedKVCache` reads it back while decoding (see
:mod:`.simulate`). The rows run block by block from shared states: a variant on layer k
starts at block k from the reference's state there, and the vocabulary-sized head and
KL run in token chunks (see :mod:`.replay`). The KL is :func:`optiq.core.kl.kl_per_token`,
the one weight quantization and evaluation use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
from mlx import nn

from ..calibration import cut_windows
from ..errors import DataError
from .layers import KVLayout
from .replay import Variant, variant_kls

__all__ = ["KVSensitivity", "Variant", "calibration_sequences", "measure_kv_sensitivity", "variant_kls"]


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
    rotation: str = "hadamard",
    log: Callable[[str], None] | None = None,
    whole_configs: dict[str, Variant] | None = None,
) -> KVSensitivity:
    """Measure K and V sensitivity of every KV layer at every candidate width.

    ``whole_configs`` (name -> variant) are measured in the same pass, sharing its
    reference (their KLs go to ``extra["measured_kl_of_whole_configs"]``)."""
    tic, cpu = time.perf_counter(), time.process_time()
    keys = [(kv.index, t, b) for kv in layout.kv_layers for t in ("k", "v") for b in candidate_bits]
    variants: list[Variant] = [{i: ((b, None) if t == "k" else (None, b))} for i, t, b in keys]
    whole = whole_configs or {}
    kls = variant_kls(model, sequences, variants + list(whole.values()), group_size, layout.vocab_size, rotation, log=log)
    kl: dict[int, dict[str, dict[int, float]]] = {kv.index: {"k": {}, "v": {}} for kv in layout.kv_layers}
    for (i, t, b), v in zip(keys, kls):
        kl[i][t][b] = v
    return KVSensitivity(
        extra={"measured_kl_of_whole_configs": dict(zip(whole, kls[len(keys):]))} if whole else {},
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
