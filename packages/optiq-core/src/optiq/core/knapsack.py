"""Multiple-choice knapsack: one option per item, least summed loss within a capacity.

Choosing a bit width per weight leaf (:mod:`optiq.core.quant.allocate`) and per K/V
tensor (:mod:`optiq.core.kv.allocate`) are both this problem. Each caller turns its own
size definition into non-negative integer costs; this solves the rest exactly, by
dynamic programming over the capacities ``0..capacity``, so both follow one rule for
optimality and for ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Choice:
    """The solution: the index of the option taken for each item, and their summed loss."""

    picks: list[int]
    loss: float


def solve(costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], capacity: int) -> Choice | None:
    """Options (one per item) of least summed loss whose summed cost is at most ``capacity``.

    ``costs[i][j]`` and ``losses[i][j]`` describe option ``j`` of item ``i``. Among equally
    good solutions (losses within 1e-15 relative) the cheapest is returned; at equal cost
    and loss the earlier option. ``None`` when no choice fits.
    """
    if capacity < 0:
        return None
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for i, (row_cost, row_loss) in enumerate(zip(costs, losses, strict=True)):
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int16)
        for j, (c, loss) in enumerate(zip(row_cost, row_loss, strict=True)):
            if c > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[c:] = best[: capacity + 1 - c] + loss
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        best = new
        back[i] = pick
    if not np.isfinite(best).any():
        return None
    least = best.min()
    end = int(np.flatnonzero(best <= least + 1e-15 * max(abs(least), 1.0))[0])  # cheapest among the best
    loss = float(best[end])
    picks = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        j = int(back[i, end])
        picks[i] = j
        end -= costs[i][j]
    return Choice(picks=picks, loss=loss)
