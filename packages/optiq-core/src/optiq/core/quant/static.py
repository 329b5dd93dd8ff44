"""``--method static``: bits from architecture rules, no forward passes.

For models too large to run on calibration data. Each leaf gets a data-free proxy of
its sensitivity: how much of its weight quantization at ``b`` bits loses
(``||W - Q_b(W)||^2 / ||W||^2``, which sees outliers), times a rule weight for its role
and position. The rules follow what measurement and llama.cpp's k-quants agree on:
the output head matters most; value/output projections, down projections and small
gating projections (router gates, Gated DeltaNet ``a``/``b`` gates) matter more than
query/key/up projections; the first and last layers matter more than middle ones;
The same knapsack as the measured method then spends the bit budget where these priors
say it helps most -- but only upward: every leaf keeps at least the widest width the
budget allows for all leaves (rules cannot tell which layers tolerate fewer bits, and a
wrong guess there costs more than a right one gains).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .rounding import clip_errors
from .targets import Target

# A leaf's relative error is measured on at most this many weights: whole groups, from
# evenly spaced rows, each row giving the next column group in turn (so every part of
# the output and input dimensions is represented). Groups round independently without
# a Hessian, so the sample's error is an unbiased estimate of the whole leaf's. 2^18
# weights (4,096 groups of 64): within 1% of the whole leaf's error on Gaussian
# real-shape (0.8B) tensors, and within 5-8% on heavy-tailed ones with outlier columns
# and uneven row scales -- as close as 2^20 gets there, where 2^16 errs by 10-17%
# (docs/convert.md). Smaller leaves (all of the bundled model's) are measured whole.
PRIOR_SAMPLE = 1 << 18


def sampled_groups(w: mx.array, group_size: int, limit: int = PRIOR_SAMPLE) -> mx.array:
    """``w`` as fp32 rows [rows, in] when it has at most ``limit`` weights, else
    ``limit // group_size`` of its groups [k, group_size] (see ``PRIOR_SAMPLE``)."""
    n = int(w.shape[-1])
    rows = int(np.prod(w.shape[:-1]))
    flat = w.reshape(rows, n)
    if rows * n > limit:
        G, k = n // group_size, max(1, limit // group_size)
        j = np.arange(k, dtype=np.int64)
        # rows evenly spaced (repeated when k > rows: then the run on one row takes
        # consecutive, distinct column groups, as a run is at most k / rows <= G long)
        r, c = (j * rows) // k, j % G
        flat = flat.reshape(rows, G, group_size)[mx.array(r), mx.array(c)]
    out = flat.astype(mx.float32)
    mx.eval(out)
    return out


ROLE_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("lm_head", 8.0),
    ("shared_expert_gate", 4.0),
    ("mlp.gate", 4.0),  # MoE router
    ("in_proj_a", 2.0),
    ("in_proj_b", 2.0),
    ("v_proj", 2.0),
    ("o_proj", 2.0),
    ("out_proj", 2.0),
    ("down_proj", 2.0),
)


def role_weight(t: Target) -> float:
    name = t.path if t.layer is None else t.role
    for key, w in ROLE_WEIGHTS:
        if name == key or name.endswith(key):
            return w
    return 1.0


def position_weight(t: Target, n_layers: int) -> float:
    if t.layer is None or n_layers <= 0:
        return 1.0
    edge = max(1, n_layers // 8)
    return 1.5 if (t.layer < edge or t.layer >= n_layers - edge) else 1.0


def static_priors(
    weights: dict[str, mx.array],
    targets: list[Target],
    candidate_bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    n_layers: int,
) -> dict[str, dict[int, float]]:
    """Predicted-KL stand-ins for every quantizable leaf and candidate width.

    ``weights`` is a fresh lazy dictionary (:class:`.source.WeightSource`): each leaf's
    weight is read, its groups sampled (:func:`sampled_groups`) and measured chunk by chunk,
    so memory holds one weight at a time, never the model.
    """
    out = {}
    for t in targets:
        if not t.quantizable:
            continue
        w = sampled_groups(weights.pop(f"{t.path}.weight"), t.group_size)
        bits = (t.pinned["bits"],) if t.pinned else candidate_bits
        err, norm = clip_errors(w, tuple(bits), t.group_size, out_dtype)
        del w
        scale = role_weight(t) * position_weight(t, n_layers)
        out[t.path] = {b: scale * e / (norm or 1.0) for b, e in err.items()}
    return out


def floor_bits(options: dict, budget: int) -> int:
    """The widest width every (unpinned) leaf can have within ``budget``."""
    widths = sorted({o.bits for opts in options.values() for o in opts})
    best = widths[0]
    for w in widths:
        cost = 0
        for opts in options.values():
            ok = [o for o in opts if o.bits >= w] or opts
            cost += min(o.cost for o in ok)
        if cost <= budget:
            best = w
    return best
