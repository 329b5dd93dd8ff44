"""The training ceiling map (``optiq lora train --plan``): measured, not estimated.

How long a sequence a model trains at depends on everything at once (the architecture's
activations, attention's quadratic scores, Gated DeltaNet's chunked recurrence, the
chunked head, grad checkpointing), so the map runs real training steps at growing
sequence lengths and records peak memory and tokens/s at each. Lengths double from
``start``; before each, the next peak is extrapolated from the measured ones
(conservatively: the memory above the model grows at least linearly, at the steepest
power measured so far, plus a margin), and a length predicted to pass the budget is
not run, so the map stops before the process would be OOM-killed. Between the last
length that fit and the first predicted not to, one refined length is measured.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from optiq.core.errors import ConfigError
from optiq.core.head import OutputHead

from .trainer import TrainArgs, make_step, training_context

MARGIN = 1.15  # extrapolated peaks are raised by this factor before comparing to the budget
START = 128
ROUND = 32  # lengths are multiples of the batch padding (data.PAD_MULTIPLE)


@dataclass
class CeilingRow:
    length: int
    peak_mlx: int  # bytes, mx.get_peak_memory() during the step
    peak_process: int  # bytes: the process's resident memory outside MLX + the MLX peak
    tokens_per_second: float
    seconds: float


@dataclass
class CeilingMap:
    budget: int
    batch_size: int
    rows: list[CeilingRow] = field(default_factory=list)
    stopped: str = ""  # why the map ended

    @property
    def longest(self) -> CeilingRow | None:
        fit = [r for r in self.rows if r.peak_process <= self.budget]
        return max(fit, key=lambda r: r.length) if fit else None

    def lines(self) -> list[str]:
        out = [f"training ceiling map: batch {self.batch_size}, budget {self.budget / 1e9:.2f} GB",
               "  seq len   peak MLX GB   peak process GB    tok/s   step s"]
        for r in self.rows:
            over = "  over budget" if r.peak_process > self.budget else ""
            out.append(f"  {r.length:>7}   {r.peak_mlx / 1e9:>11.2f}   {r.peak_process / 1e9:>15.2f}"
                       f"   {r.tokens_per_second:>6.1f}   {r.seconds:>6.1f}{over}")
        best = self.longest
        out.append(f"longest sequence length under {self.budget / 1e9:.2f} GB: "
                   + (f"{best.length} (measured peak {best.peak_process / 1e9:.2f} GB)" if best else "none measured fits"))
        if self.stopped:
            out.append(f"stopped: {self.stopped}")
        return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def predict(rows: list[CeilingRow], fixed: int, length: int) -> int:
    """Conservative peak at ``length`` from the measured rows (see module doc)."""
    last = rows[-1]
    var = max(last.peak_process - fixed, 1)
    power = 2.0 if len(rows) < 2 else 1.0  # one point: assume quadratic growth
    for a, b in zip(rows, rows[1:]):
        va, vb = max(a.peak_process - fixed, 1), max(b.peak_process - fixed, 1)
        power = max(power, math.log(vb / va) / math.log(b.length / a.length))
    return int(fixed + MARGIN * var * (length / last.length) ** power)


def _fits_up_to(rows: list[CeilingRow], fixed: int, budget: int) -> int:
    """The longest length (multiple of ROUND) :func:`predict` keeps under ``budget``."""
    lo, hi = rows[-1].length, rows[-1].length * 2
    while hi - lo > ROUND:
        mid = (lo + hi) // 2 // ROUND * ROUND
        if mid <= lo:
            break
        lo, hi = (mid, hi) if predict(rows, fixed, mid) <= budget else (lo, mid)
    return lo


def measure_ceiling(
    model: nn.Module,
    tokens: list[int],
    args: TrainArgs,
    budget: int,
    *,
    head: OutputHead | None = None,
    blocks: list[nn.Module] | None = None,
    start: int = START,
    echo: Callable[[str], None] = print,
) -> CeilingMap:
    """Measure the ceiling map of a LoRA-wrapped ``model`` (see module doc).

    ``tokens``: text to train on, cycled to each length; lengths run from ``start`` to
    ``args.max_seq_length``; one training step per length (after one warm-up step at
    the first), at ``args.batch_size``.
    """
    if not tokens:
        raise ConfigError("the ceiling map needs some tokens to train on")
    if args.max_seq_length < start:
        raise ConfigError(f"--max-seq-length {args.max_seq_length} is below the map's first length {start}")
    optimizer = optim.Adam(learning_rate=args.learning_rate)
    optimizer.init(model.trainable_parameters())
    step, captured = make_step(model, optimizer, head, args.compile)
    model.train()
    mx.eval(model.parameters(), optimizer.state)
    mx.clear_cache()
    # memory outside MLX's buffers (interpreter, libraries, tokenizer) and the model itself
    other = max(_rss() - mx.get_active_memory(), 0)
    fixed = other + mx.get_active_memory()
    result = CeilingMap(budget=budget, batch_size=args.batch_size)
    if fixed > budget:
        result.stopped = f"the model alone takes {fixed / 1e9:.2f} GB"
        return result

    def run(length: int) -> CeilingRow:
        seq = [tokens[i % len(tokens)] for i in range(length + 1)]
        batch = mx.array([seq] * args.batch_size)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        mask = mx.ones(targets.shape, dtype=mx.float32)
        mx.eval(inputs, targets, mask)
        mx.clear_cache()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        loss, ntoks = step(inputs, targets, mask)
        mx.eval(captured, loss, ntoks)
        dt = time.perf_counter() - tic
        peak = mx.get_peak_memory()
        return CeilingRow(length, peak, other + peak, args.batch_size * length / dt, dt)

    lengths = []
    n = start
    while n <= args.max_seq_length:
        lengths.append(n)
        n *= 2
    if lengths[-1] != args.max_seq_length:
        lengths.append(args.max_seq_length)
    for line in result.lines()[:2]:
        echo(line)
    with training_context(args, blocks):
        # warm-up (first-call costs out of the first row); its peak is a measured point too,
        # so the first extrapolation has two points (a length-independent part shows as a
        # low power) instead of assuming quadratic growth
        warm = run(min(start, 32))
        for i, length in enumerate(lengths):
            if result.rows:
                points = [warm] + result.rows
                predicted = predict(points, fixed, length)
                if predicted > budget:
                    refined = _fits_up_to(points, fixed, budget)
                    result.stopped = (f"{length} tokens predicted to peak at {predicted / 1e9:.2f} GB")
                    if refined > result.rows[-1].length * 1.1:
                        row = run(refined)
                        result.rows.append(row)
                        echo(result.lines()[2 + len(result.rows) - 1])
                    break
            row = run(length)
            result.rows.append(row)
            echo(result.lines()[2 + len(result.rows) - 1])
            if row.peak_process > budget:
                result.stopped = f"{length} tokens peaked at {row.peak_process / 1e9:.2f} GB, over the budget"
                break
        else:
            result.stopped = f"reached --max-seq-length {args.max_seq_length}: raise it to measure longer sequences"
    return result
