"""Choose-bits stage of convert: per-leaf widths under the size budget (pure).

Sensitivities in, :class:`.allocate.Allocation` out: the options per leaf, the budget in
the requested bpw definition, the effective-bpw range check, and static's
upgrade-only rule. No model, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .allocate import Allocation, Option, allocate, leaf_options
from .targets import Target


@dataclass(frozen=True)
class SizeFacts:
    """What the budget depends on besides the quantized leaves."""

    total_params: int  # every parameter of the model (logical count)
    fixed_bits: int  # bits of the parameters that stay in full precision
    scale_bits: int  # bits of one scale / bias (the model dtype)


def _widths(t: Target, bits: tuple[int, ...]) -> tuple[int, ...]:
    return (t.pinned["bits"],) if t.pinned else bits


def effective_range(active: list[Target], bits: tuple[int, ...], facts: SizeFacts) -> tuple[float, float]:
    """Lowest and highest effective bpw (``mlx_lm``'s definition) the candidates reach."""

    def cost(t: Target, b: int) -> int:
        return t.n_params * b + (t.n_params // t.group_size) * 2 * facts.scale_bits

    lo = facts.fixed_bits + sum(min(cost(t, b) for b in _widths(t, bits)) for t in active)
    hi = facts.fixed_bits + sum(max(cost(t, b) for b in _widths(t, bits)) for t in active)
    return lo / facts.total_params, hi / facts.total_params


def check_effective_target(target: float, active: list[Target], bits: tuple[int, ...], facts: SizeFacts) -> None:
    lo, hi = effective_range(active, bits, facts)
    if not (lo - 1e-6 <= target <= hi + 1e-6):
        raise ConfigError(
            f"effective target {target} bpw is outside what candidates {list(bits)} can reach "
            f"for this model ({lo:.3f} to {hi:.3f} bpw)"
        )


def choose_bits(
    active: list[Target],
    kl_of: dict[str, dict[int, float]],
    bits: tuple[int, ...],
    target_bpw: float,
    bpw_kind: str,
    facts: SizeFacts,
    static: bool = False,
) -> Allocation:
    """Minimum summed sensitivity under the budget (multiple-choice knapsack).

    Static priors cannot know which layers tolerate fewer bits, so a static allocation
    only upgrades: every leaf keeps at least the widest width the budget allows for all.
    """
    options: dict[str, list[Option]] = {
        t.path: leaf_options(t.n_params, _widths(t, bits), kl_of[t.path], t.group_size, facts.scale_bits, bpw_kind)
        for t in active
    }
    if bpw_kind == "weights":
        budget = int(np.floor(target_bpw * sum(t.n_params for t in active)))
    else:
        # a byte of slack: a target copied from another model's reported bpw must admit it
        budget = int(np.floor(target_bpw * facts.total_params - facts.fixed_bits + 8))
    if static:
        from .static import floor_bits

        floor = floor_bits(options, budget)
        options = {p: [o for o in opts if o.bits >= floor] or opts for p, opts in options.items()}
    return allocate(options, budget)
