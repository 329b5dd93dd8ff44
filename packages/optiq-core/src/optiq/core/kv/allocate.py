"""Choose K and V bits per layer: least predicted KL within a stored-bits budget.

The budget is the mean stored bits per K/V element, counting each group's fp16 scale
and bias (what the cache really holds), so ``--target-bits 4.5`` with group size 64
means "no more memory than uniform 4-bit". Predicted KL is the sum of the per-tensor
KLs measured by :mod:`.sensitivity` (the usual additivity assumption; the CLI also
measures the chosen config as a whole). The problem is a multiple-choice knapsack,
solved exactly by :func:`optiq.core.knapsack.solve` over integer costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

from .. import knapsack
from ..errors import ConfigError
from . import quant
from .layers import KVLayout
from .sensitivity import KVSensitivity

MAX_DP_CELLS = 20_000_000


@dataclass(frozen=True)
class Allocation:
    bits: dict[int, tuple[int, int]]  # layer -> (k_bits, v_bits)
    predicted_kl: float
    achieved_bits: float


def _mean_bits(layout: KVLayout, choice: dict[tuple[int, str], int], group_size: int) -> float:
    num = den = 0.0
    for kv in layout.kv_layers:
        for t, e in (("k", kv.k_elements), ("v", kv.v_elements)):
            num += e * quant.bits_per_element(choice[(kv.index, t)], group_size)
            den += e
    return num / den


def min_achievable_bits(candidate_bits: tuple[int, ...], group_size: int) -> float:
    """Mean stored bits when every tensor takes the lowest candidate width."""
    return quant.bits_per_element(min(candidate_bits), group_size)


def allocate_kv_bits(
    sensitivity: KVSensitivity,
    layout: KVLayout,
    target_bits: float,
    candidate_bits: tuple[int, ...] | None = None,
    group_size: int | None = None,
) -> Allocation:
    """Per-layer (k_bits, v_bits) minimizing summed KL with mean stored bits <= target."""
    cands = tuple(sorted(set(candidate_bits or sensitivity.candidate_bits)))
    g = group_size or sensitivity.group_size
    lowest = min_achievable_bits(cands, g)
    if target_bits + 1e-9 < lowest:
        raise ConfigError(
            f"--target-bits {target_bits} is below what the candidates can store: {min(cands)}-bit K/V "
            f"with group size {g} already takes {lowest:g} bits per element (codes + fp16 scale and bias); "
            f"raise the target or add a lower candidate width"
        )
    items = [(kv.index, t, e) for kv in layout.kv_layers for t, e in (("k", kv.k_elements), ("v", kv.v_elements))]
    # Integer cost of storing item i at b bits: e * (b*g + 32)  (= e * g * bits_per_element).
    raw = [[e * (b * g + 2 * quant.SCALE_BITS) for b in cands] for _, _, e in items]
    total_e = sum(e for _, _, e in items)
    unit = reduce(math.gcd, [c for row in raw for c in row])
    costs = [[c // unit for c in row] for row in raw]
    budget = math.floor(target_bits * g * total_e / unit + 1e-9)
    scale = max(1.0, budget * len(items) / MAX_DP_CELLS)
    if scale > 1:  # very uneven element counts: coarsen conservatively (round costs up)
        costs = [[math.ceil(c / scale) for c in row] for row in costs]
        budget = math.floor(budget / scale)
    losses = [[sensitivity.kl[i][t][b] for b in cands] for i, t, _ in items]

    picked = knapsack.solve(costs, losses, budget)
    if picked is None:
        raise ConfigError(f"no assignment of {cands} meets --target-bits {target_bits}")
    choice = {(i, t): cands[j] for (i, t, _), j in zip(items, picked.picks)}
    bits = {kv.index: (choice[(kv.index, "k")], choice[(kv.index, "v")]) for kv in layout.kv_layers}
    return Allocation(bits=bits, predicted_kl=picked.loss, achieved_bits=_mean_bits(layout, choice, g))
