"""The memory a convert will need, estimated from shapes before any work starts.

A process that outgrows memory is killed by the kernel with no message, minutes into a
run. So the peak is estimated from the model's shapes (largest block in fp32, the
vocabulary-sized head as stored plus its tiles, the saved block inputs, Hessians) and
compared with the memory available (or ``--max-memory``): over it, the run stops at once
with one line naming the estimate and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mlx.utils import tree_flatten

from ..errors import MemoryBudgetError
from ..memory import BASE_BYTES, GB, describe_parts, memory_limit
from .blocks import BlockModel
from .options import ConvertOptions
from .source import CHUNK_ELEMENTS
from .states import BoundaryStates
from .targets import Target

# Block inputs are written to disk when they would take more than this share of the limit.
SPILL_SHARE = 0.25
# [n, n] fp64 arrays alive at once while GPTQ inverts a Hessian (rounding._gptq_inverse).
GPTQ_INVERSE_COPIES = 7


@dataclass
class MemoryPlan:
    parts: dict[str, int]  # what the peak is made of, bytes
    peak: int
    limit: int
    spill: bool  # block inputs live on disk

    def describe(self) -> str:
        spill = "; block inputs on disk" if self.spill else ""
        return f"about {self.peak / GB:.2f} GB peak ({describe_parts(self.parts)}){spill}; limit {self.limit / GB:.2f} GB"


def _sizes(bm: BlockModel) -> tuple[list[int], int, int, int, int]:
    """(params per block, vocabulary, hidden, bytes per stored head element, all params)."""
    per_block = [sum(int(v.size) for _, v in tree_flatten(layer.parameters())) for layer in bm.layers]
    params = dict(tree_flatten(bm.model.parameters()))
    head = params[bm.head.weight_name]
    total = sum(int(v.size) for v in params.values())
    return per_block, int(head.shape[0]), int(head.shape[1]), head.dtype.size, total


def plan_memory(bm: BlockModel, active: list[Target], opts: ConvertOptions, n_tokens: int) -> MemoryPlan:
    """Estimate the peak of this convert (see module doc) and check it against the limit."""
    limit = memory_limit(opts.max_memory_gb)
    per_block, V, H, s, total = _sizes(bm)
    n = len(opts.candidate_bits)
    L = len(per_block)
    P = max(per_block) if per_block else 0
    leaves = [t for t in active if t.layer is not None]
    big_leaf = max((t.n_params for t in leaves), default=0)
    # per block: sum of leaf (in + out) dims, for activations of one batch
    dims: dict[int, int] = {}
    for t in leaves:
        dims[t.layer] = dims.get(t.layer, 0) + t.shape[-1] + t.shape[-2]
    act = max(dims.values(), default=H) * min(n_tokens, opts.batch_size * opts.seq_len) * 4
    hess = max(
        (sum(t.shape[-1] ** 2 for t in leaves if t.layer == k) for k in range(L)), default=0,
    ) * 8 * 2
    # GPTQ's inverse of the largest input Hessian: fp64 copies of H, H + damping, its
    # Cholesky factor, that factor's inverse, H^-1 and H^-1's factor, plus the identity
    # the damping adds (measured at the 0.8B shape's down_proj, 3584 inputs: 0.72 GB)
    n_in = max((t.shape[-1] for t in leaves), default=0)
    inverse = GPTQ_INVERSE_COPIES * n_in**2 * 8 if opts.rounding == "gptq" else 0
    head_table = V * H * s
    chunk = CHUNK_ELEMENTS * 4 * 8
    parts: dict[str, int] = {"runtime": BASE_BYTES}
    spill = False
    if opts.method == "static":
        parts["largest tensor"] = max(head_table, big_leaf * s)
        parts["rounding chunk"] = CHUNK_ELEMENTS * 4 * 6 * n
    else:
        states = BoundaryStates.nbytes(L + 1, n_tokens, H)
        spill = states > SPILL_SHARE * limit
        parts["block inputs"] = 0 if spill else states
        parts["probes"] = opts.n_probes * n_tokens * ((V + 7) // 8)
        tile = opts.head_tile_mb << 20
        stage = {
            "head": head_table + tile + n_tokens * H * 4 * (2 + 2 * opts.n_probes),
            "block": P * 4 + P * n * 2 + 3 * act + n_tokens * H * 4 * 2 * opts.n_probes,
            # the block in fp32, its Hessians, then the larger of the Hessian replay (the
            # block's forward over one batch, as in the block stage) and GPTQ's temporaries
            "rounding": P * 4 + hess + max(2 * act, inverse + big_leaf * 4 * 4),
            "head rounding": head_table + chunk + (GPTQ_INVERSE_COPIES * H**2 * 8 if opts.rounding == "gptq" else 0),
        }
        worst = max(stage, key=stage.get)
        parts[f"{worst} stage"] = stage[worst]
        if not opts.streamed_estimate:
            parts["whole model fp32"] = total * 4 + total * n * 2 + n_tokens * V * 4 * 2
    peak = int(sum(parts.values()))
    plan = MemoryPlan(parts=parts, peak=peak, limit=limit, spill=spill)
    if peak > limit:
        raise MemoryBudgetError(_advice(plan, opts))
    return plan


def _advice(plan: MemoryPlan, opts: ConvertOptions) -> str:
    tips = []
    if opts.method != "static":
        if not opts.streamed_estimate:
            tips.append("use the default estimator (fisher, no --estimate-rounding, no --measure-above)")
        tips += ["lower --n-calibration or --seq-len", "lower --head-tile-mb", "use --method static"]
    tips.append("raise --max-memory" if opts.max_memory_gb is not None else "free memory")
    return f"convert needs {plan.describe()}: {', '.join(tips)}"


def tokens_planned(n_calibration: int, seq_len: int) -> int:
    return int(np.int64(n_calibration) * seq_len)
