"""Score a whole sequence in one forward pass as if it had been decoded token by token
through the mixed-precision cache.

When :class:`~optiq.core.kv.cache.MixedKVCache` decodes, every token attends to the
*quantized* keys/values of all earlier tokens. A prefill chunk, however, attends to its
own keys/values at full precision (as mlx-lm's ``kv_bits`` does for its first chunk), so
``model(tokens, cache=make_kv_cache(...))`` would hide most of the quantization error
of a teacher-forced evaluation. :class:`SimulatedKVCache` stores and returns K/V exactly
as the mixed cache would read them back (rotate -> quantize -> dequantize -> un-rotate,
fp16 scales), including
the current chunk, so perplexity/KL of a config can be measured in one batched forward.
The sensitivity pass uses the same storage rule, one batch row per variant.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models.cache import KVCache

from . import quant
from .config import KVConfig
from .layers import configured_cache


class SimulatedKVCache(KVCache):
    """A ``KVCache`` holding fake-quantized K (``k_bits``) and V (``v_bits``); None = exact.

    ``rows`` optionally gives per-batch-row (k_bits, v_bits) rules instead (one variant
    per row, used by the sensitivity pass). ``rotation`` is the mixed cache's (quantized
    rows only: exact rows stay exact).
    """

    def __init__(
        self,
        k_bits: int | None = None,
        v_bits: int | None = None,
        group_size: int = 64,
        rows: list[tuple[int | None, int | None]] | None = None,
        rotation: str = "hadamard",
    ):
        super().__init__()
        self.rows = rows
        self.k_bits, self.v_bits = k_bits, v_bits
        self.group_size = group_size
        self.rotation = quant.check_rotation(rotation)

    def _fake(self, x: mx.array, bits: int) -> mx.array:
        return quant.fake_quantize(x, bits, self.group_size, self.rotation)

    def _apply(self, x: mx.array, which: int) -> mx.array:
        if self.rows is None:
            bits = (self.k_bits, self.v_bits)[which]
            return x if bits is None else self._fake(x, bits)
        per_row = [r[which] for r in self.rows]
        out = x
        for b in sorted({b for b in per_row if b is not None}):
            mask = mx.array([rb == b for rb in per_row])[:, None, None, None]
            out = mx.where(mask, self._fake(x, b), out)
        return out

    def update_and_fetch(self, keys, values):
        return super().update_and_fetch(self._apply(keys, 0), self._apply(values, 1))


def make_simulated_kv_cache(model: nn.Module, config: KVConfig) -> list[Any]:
    """The model's cache list with each configured layer simulating its (k_bits, v_bits)
    and the config's rotation.

    Use a fresh list per sequence: ``logits = model(tokens[None], cache=make_simulated_kv_cache(model, cfg))``.
    """
    return configured_cache(model, config, SimulatedKVCache)
