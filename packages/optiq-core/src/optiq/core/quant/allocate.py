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

from .. import knapsack
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
    """Exact multiple-choice knapsack (:func:`optiq.core.knapsack.solve`) on a discretized cost axis."""
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
    # costs above each leaf's cheapest option, in units rounded up (never over budget)
    weights = []
    for p in paths:
        base = min(o.cost for o in options[p])
        weights.append([int(np.ceil((o.cost - base) / unit - 1e-9)) for o in options[p]])
    choice = knapsack.solve(weights, [[o.kl for o in options[p]] for p in paths], cap)
    assert choice is not None  # the cheapest options always fit: budget >= min_cost
    picked = {p: options[p][j] for p, j in zip(paths, choice.picks)}
    return Allocation(
        {p: o.bits for p, o in picked.items()}, choice.loss, sum(o.cost for o in picked.values()), budget, True
    )


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
