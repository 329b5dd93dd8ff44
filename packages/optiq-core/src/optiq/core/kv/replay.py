"""KL of KV-quantization variants, run block by block from shared block states.

Quantizing layer k's K/V changes nothing before block k, so a variant (some layers'
K and/or V quantized) does not re-run the blocks before its first quantized layer: it
joins the full-precision reference there, starting from the reference's state. The pass
walks the decoder blocks once, in order. At block j every active row group -- the
reference and each variant that has started, each over every sequence -- advances one
block, in row chunks of bounded size, with block j's weights dequantized once for all
chunks (:func:`optiq.core.cpu.keep_dequantized`). Blocks after a variant's first
quantized layer still run for it (its quantization changes everything after); what is
shared is everything before, and each block's weights. The row states live in
:class:`~optiq.core.quant.states.BoundaryStates` (one slot per row group, on disk when
large); the blocks run through the model's own forward (:mod:`optiq.core.quant.blocks`).

The vocabulary-sized work runs last, in token chunks: per sequence and chunk, the
reference's distribution once (:class:`~optiq.core.kl.RefDist`), then the variants'
logits in batches of rows within a budget, each reduced to its KL at once, so no
``tokens x vocabulary`` tensor of a whole sequence (2 GB at 2,048 tokens and a 248k
vocabulary) is ever built. The head is dequantized once for the stage when its fp32
copy fits :data:`DENSE_HEAD_BYTES`.

Every variant sees exactly the computation of a forward pass through its own cache
(the KVs of one variant per batch row, as :class:`~.simulate.SimulatedKVCache` stores
them); only the batching differs, so KLs match one-forward-per-variant to fp32
rounding (tests/test_kv_sensitivity.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx import nn

from ..architecture import decoder_layers
from ..cpu import keep_dequantized
from ..kl import RefDist, kl_per_token
from ..quant.blocks import block_output, first_input, logits_from
from ..quant.progress import Progress
from ..quant.states import BoundaryStates
from .layers import base_cache
from .simulate import SimulatedKVCache

# A variant sets, for some layers, (k_bits or None, v_bits or None); None = full precision.
Variant = dict[int, tuple[int | None, int | None]]

# Activations of the rows advanced through one block per call (estimated, see _rows_per_call).
ACTIVATION_BUDGET_BYTES = 1 << 29
# Logits (fp32, tokens x vocabulary) of one head call; the KL adds about two more of each row.
LOGITS_BUDGET_BYTES = 1 << 27
# Row states beyond this go to a temporary .npy file on disk.
STATES_IN_MEMORY_BYTES = 1 << 30
# Keep the output head dequantized (fp32) through the logits stage when it is at most this.
DENSE_HEAD_BYTES = 3 << 29


class _States(BoundaryStates):
    """Row-group states (fp32 at rest), handed out in the model's compute dtype."""

    dtype: mx.Dtype = mx.float32

    def get(self, j: int, b: int) -> mx.array:
        return super().get(j, b).astype(self.dtype)


def _key(v: Variant) -> tuple:
    """Canonical form of a variant: the quantized (layer, k_bits, v_bits), sorted."""
    return tuple(sorted((i, kb, vb) for i, (kb, vb) in v.items() if kb is not None or vb is not None))


def _rows_per_call(seq_len: int, hidden: int) -> int:
    # Per row: a few dozen hidden-sized fp32 activations per token (MLP, projections,
    # temporaries) and causal attention scores (heads x T x T; 16 heads assumed).
    per_row = 4 * seq_len * (32 * hidden + 16 * seq_len)
    return max(1, ACTIVATION_BUDGET_BYTES // per_row)


def output_head(model: nn.Module) -> nn.Module:
    """The module producing logits: an ``lm_head`` if the model has one, else the (tied) embedding."""
    mods = list(model.named_modules())
    for path, m in mods:
        if path.split(".")[-1] == "lm_head":
            return m
    for _, m in mods:
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            return m
    raise ValueError(f"{type(model).__name__}: no lm_head and no embedding found")


def _dense_head(model: nn.Module, vocab_size: int, hidden: int) -> contextlib.AbstractContextManager:
    if vocab_size * hidden * 4 <= DENSE_HEAD_BYTES:
        return keep_dequantized([output_head(model)])
    return contextlib.nullcontext()


def variant_kls(
    model: nn.Module,
    sequences: mx.array,
    variants: list[Variant],
    group_size: int,
    vocab_size: int,
    rotation: str = "hadamard",
    log: Callable[[str], None] | None = None,
    stage: str = "sensitivity",
) -> list[float]:
    """Mean KL (nats per token) vs a full-precision cache for each variant, over every
    position of every sequence (quantized tensors stored with ``rotation``, as the mixed
    cache stores them). Identical variants are run once; one that quantizes nothing is 0.
    Progress goes to ``log`` per block, then per sequence of the logits stage."""
    layers = decoder_layers(model)
    n, seq_len = (int(d) for d in sequences.shape)
    keys = [_key(v) for v in variants]
    uniq = list(dict.fromkeys(k for k in keys if k))
    rules = [{i: (kb, vb) for i, kb, vb in u} for u in uniq]
    starts = [min(rule) for rule in rules]

    h0 = [first_input(model, layers, sequences[s : s + 1]) for s in range(n)]
    hidden, dtype = int(h0[0].shape[-1]), h0[0].dtype
    # slot 0: the reference; slot 1 + u: unique variant u (filled when it starts)
    slots = 1 + len(uniq)
    spill = BoundaryStates.nbytes(slots, n * seq_len, hidden) > STATES_IN_MEMORY_BYTES
    states = _States(slots, [(1, seq_len)] * n, hidden, spill=spill)
    states.dtype = dtype
    try:
        for s, h in enumerate(h0):
            states.put(0, s, h)
        del h0
        _advance(model, layers, sequences, states, rules, starts, group_size, rotation, Progress(stage, len(layers), log))
        totals = _kl_totals(model, layers, sequences, states, len(uniq), vocab_size,
                            Progress(f"{stage} logits", n, log, unit="sequence"))
    finally:
        states.close()
    per_key = {u: float(t) / (n * seq_len) for u, t in zip(uniq, totals)}
    return [per_key.get(k, 0.0) for k in keys]


def _advance(model, layers, sequences, states, rules, starts, group_size, rotation, progress) -> None:
    """Run every row group through the blocks, from the block where it starts (see module doc)."""
    n, seq_len = (int(d) for d in sequences.shape)
    per_call = _rows_per_call(seq_len, states.hidden)
    for j in range(len(layers)):
        joining = [u for u, st in enumerate(starts) if st == j]
        for u in joining:
            for s in range(n):
                states.put(1 + u, s, states.get(0, s))
        active = [None] + [u for u, st in enumerate(starts) if st <= j]  # None: the reference
        rows = [(u, s) for u in active for s in range(n)]
        row_bits = [(None, None) if u is None else rules[u].get(j, (None, None)) for u, _ in rows]
        with keep_dequantized([layers[j]]):
            for a in range(0, len(rows), per_call):
                chunk, bits = rows[a : a + per_call], row_bits[a : a + per_call]
                h = mx.concatenate([states.get(0 if u is None else 1 + u, s) for u, s in chunk])
                tokens = sequences[mx.array([s for _, s in chunk])]
                cache = base_cache(model)
                if any(b != (None, None) for b in bits):
                    cache[j] = SimulatedKVCache(group_size=group_size, rows=bits, rotation=rotation)
                out = block_output(model, layers, j, tokens, h, cache=cache)
                mx.eval(out)
                for r, (u, s) in enumerate(chunk):
                    states.put(0 if u is None else 1 + u, s, out[r : r + 1])
                del h, out, cache
        started = f", {len(joining)} variant(s) start here" if joining else ""
        progress.step(f"({len(rows)} rows{started})")


def _kl_totals(model, layers, sequences, states, n_variants, vocab_size, progress) -> np.ndarray:
    """Sum over positions of KL(reference || variant), per variant, in token chunks."""
    n, seq_len = (int(d) for d in sequences.shape)
    per_call = max(1, LOGITS_BUDGET_BYTES // (vocab_size * 4))
    c = min(seq_len, per_call)
    batch = max(1, per_call // c)
    totals = np.zeros(n_variants, dtype=np.float64)
    with _dense_head(model, vocab_size, states.hidden):
        for s in range(n):
            ref_h = states.get(0, s)
            var_h = [states.get(1 + u, s) for u in range(n_variants)]
            for a in range(0, seq_len, c):
                tok = sequences[s : s + 1, a : a + c]
                ref = RefDist.from_logits(logits_from(model, layers, tok, ref_h[:, a : a + c])[0])
                for v0 in range(0, n_variants, batch):
                    vs = range(v0, min(n_variants, v0 + batch))
                    h = mx.concatenate([var_h[u][:, a : a + c] for u in vs])
                    logits = logits_from(model, layers, mx.repeat(tok, len(vs), axis=0), h)
                    for r, u in enumerate(vs):
                        totals[u] += float(kl_per_token(ref, logits[r]).sum())
                    del logits
                del ref
            progress.step()
    return totals
