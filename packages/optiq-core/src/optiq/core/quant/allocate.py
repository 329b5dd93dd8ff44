"""Choose a bit width per leaf: minimum predicted KL under a size budget.

Each leaf ``i`` has options ``(bits, cost_i(bits), kl_i(bits))``; the predicted KL of a
mixed model is ``sum_i kl_i`` (sensitivities add for small, independent perturbations).
Minimizing it under ``sum_i cost_i <= budget`` is a multiple-choice knapsack, solved
exactly by dynamic programming over the cost discretized into a few thousand units
(costs are rounded *up*, so the result never exceeds the budget).

Two definitions of bits per weight (bpw) are supported as the budget:

``weights``
    mean bit width of the quantized weights, scales and biases excluded
    (``sum bits_i * n_i / sum n_i`` over quantized leaves). ``--target-bpw 4.5`` with
    candidates 4/8 means one eighth of the weights at 8 bits.
``effective``
    what stock ``mlx_lm.utils.compute_bits_per_weight`` reports: all bytes of all
    parameters (codes, scales, biases, and the float parameters left unquantized) * 8 /
    the number of logical parameters. Uniform 4-bit with group 64 and bf16 scales is 4.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .formats import leaf_bits_cost

RESOLUTION = 4000


@dataclass
class Option:
    bits: int
    cost: int  # in bits, per the budget definition
    kl: float


@dataclass
class Allocation:
    bits: dict[str, int]
    predicted_kl: float
    cost: int
    budget: int
    feasible: bool


def leaf_options(
    n_params: int,
    bits_list: tuple[int, ...] | list[int],
    kl: dict[int, float],
    group_size: int,
    scale_bits: int,
    kind: str,
) -> list[Option]:
    out = []
    for b in bits_list:
        if kind == "weights":
            cost = n_params * b
        else:
            cost = leaf_bits_cost(n_params, b, group_size, scale_bits)
        out.append(Option(bits=b, cost=cost, kl=float(kl[b])))
    return out


def allocate(options: dict[str, list[Option]], budget: int, resolution: int = RESOLUTION) -> Allocation:
    """Exact multiple-choice knapsack on a discretized cost axis."""
    paths = list(options)
    if not paths:
        return Allocation({}, 0.0, 0, budget, True)
    min_cost = sum(min(o.cost for o in options[p]) for p in paths)
    max_cost = sum(max(o.cost for o in options[p]) for p in paths)
    if budget < min_cost:
        cheapest = {p: min(options[p], key=lambda o: (o.cost, o.kl)) for p in paths}
        return Allocation(
            {p: o.bits for p, o in cheapest.items()},
            float(sum(o.kl for o in cheapest.values())),
            min_cost,
            budget,
            feasible=False,
        )
    if budget >= max_cost:
        best = {p: min(options[p], key=lambda o: (o.kl, o.cost)) for p in paths}
        return Allocation(
            {p: o.bits for p, o in best.items()},
            float(sum(o.kl for o in best.values())),
            sum(o.cost for o in best.values()),
            budget,
            True,
        )
    spare = budget - min_cost
    unit = max(spare / resolution, 1e-9)
    cap = int(np.floor(spare / unit + 1e-9))
    INF = np.inf
    best = np.full(cap + 1, INF)
    best[0] = 0.0
    choice = np.zeros((len(paths), cap + 1), dtype=np.int16)
    for i, p in enumerate(paths):
        opts = options[p]
        base = min(o.cost for o in opts)
        new = np.full(cap + 1, INF)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, o in enumerate(opts):
            w = int(np.ceil((o.cost - base) / unit - 1e-9))
            if w > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[w:] = best[: cap + 1 - w] + o.kl
            better = cand < new
            new = np.where(better, cand, new)
            pick = np.where(better, j, pick)
        best = new
        choice[i] = pick
    # cheapest capacity among the optimal ones
    kmin = best.min()
    c = int(np.flatnonzero(best <= kmin + 1e-15 * max(abs(kmin), 1.0))[0])
    bits = {}
    total_cost = 0
    for i in range(len(paths) - 1, -1, -1):
        p = paths[i]
        opts = options[p]
        o = opts[int(choice[i, c])]
        bits[p] = o.bits
        total_cost += o.cost
        base = min(x.cost for x in opts)
        c -= int(np.ceil((o.cost - base) / unit - 1e-9))
    kl = float(sum(next(o.kl for o in options[p] if o.bits == bits[p]) for p in paths))
    return Allocation(dict(reversed(list(bits.items()))), kl, total_cost, budget, True)


def check_target(target_bpw: float, candidate_bits: tuple[int, ...], kind: str) -> None:
    """Errors a user can act on before any work starts."""
    if kind not in ("weights", "effective"):
        raise ConfigError(f"unknown bpw definition '{kind}': use 'weights' or 'effective'")
    if not np.isfinite(target_bpw) or target_bpw <= 0:
        raise ConfigError(f"--target-bpw must be a positive number, got {target_bpw}")
    if kind == "weights":
        lo, hi = min(candidate_bits), max(candidate_bits)
        if target_bpw < lo - 1e-9:
            raise ConfigError(
                f"--target-bpw {target_bpw} is below the smallest candidate width ({lo} bits): "
                f"add a smaller width to --candidate-bits or raise the target"
            )
        if target_bpw > hi + 1e-9:
            raise ConfigError(
                f"--target-bpw {target_bpw} is above the largest candidate width ({hi} bits): "
                f"add a larger width to --candidate-bits or lower the target"
            )
