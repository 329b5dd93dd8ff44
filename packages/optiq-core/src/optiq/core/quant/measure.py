"""Measure stage of convert: each leaf's sensitivity at each candidate width.

The default (``fisher`` with RTN errors) streams block by block
(:mod:`.streamed_fisher`) and keeps the block inputs for the write stage. The other
estimators (``measured``, GPTQ/clip estimate errors, re-measuring large estimates) need
the whole model in fp32 (:func:`sensitivity_pass`); the memory plan says when that fits.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from .fisher import ESTIMATE_ROUNDING
from .options import MEASURE_ABOVE
from .sensitivity import (
    MEASURE_FLOOR,
    Checkpoint,
    LeafSensitivity,
    capture_reference,
    measure_sensitivities,
)
from .targets import Target


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pass", file=sys.stderr, dynamic_ncols=True, leave=True)


def sensitivity_pass(
    model: Any,
    tokens: np.ndarray,
    active: list[Target],
    bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    rounding: str,
    *,
    estimator: str = "fisher",
    estimate_rounding: str | None = None,
    n_probes: int = 1,
    batch_size: int = 8,
    measure_above: float = MEASURE_ABOVE,
    measure_floor: float = MEASURE_FLOOR,
    checkpoint: Checkpoint | None = None,
    on_pass: Callable[[str, int], None] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[Any, dict[str, LeafSensitivity]]:
    """Reference pass + sensitivities, as :func:`convert` runs them: ``(ref, sensitivities)``.

    With the ``fisher`` estimator and data-free (``rtn``) weight errors, the reference
    forward pass and the probe backward pass are one pass
    (:func:`.fisher.reference_and_estimate`); otherwise the reference comes first.
    """
    est_rounding = estimate_rounding or (ESTIMATE_ROUNDING if estimator == "fisher" else rounding)
    ckpt = checkpoint if checkpoint is not None else Checkpoint(None, "")
    if estimator == "fisher" and est_rounding == "rtn" and any(t.path not in ckpt.results for t in active):
        from .fisher import reference_and_estimate

        bar = _progress_bar(-(-len(tokens) // batch_size), "estimating sensitivity", progress)
        ref, est = reference_and_estimate(
            model, tokens, active, bits, out_dtype, batch_size=batch_size, n_probes=n_probes,
            progress=(lambda p, b: bar.update(1)) if bar is not None else None,
        )
        if bar is not None:
            bar.close()
        ckpt.results.update({p: r for p, r in est.items() if p not in ckpt.results})
        ckpt.save()
    else:
        ref = capture_reference(model, tokens, active, batch_size=batch_size, check_replay=False)
    sens = estimate_sensitivities(
        model, ref, active, bits, out_dtype, rounding, estimator=estimator, estimate_rounding=est_rounding,
        n_probes=n_probes, measure_above=measure_above, measure_floor=measure_floor, checkpoint=ckpt,
        on_pass=on_pass, progress=progress, log=log,
    )
    return ref, sens


def estimate_sensitivities(
    model: Any,
    ref: Any,
    active: list[Target],
    bits: tuple[int, ...],
    out_dtype: mx.Dtype,
    rounding: str,
    *,
    estimator: str = "fisher",
    estimate_rounding: str | None = None,
    n_probes: int = 1,
    measure_above: float = MEASURE_ABOVE,
    measure_floor: float = MEASURE_FLOOR,
    checkpoint: Checkpoint | None = None,
    on_pass: Callable[[str, int], None] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, LeafSensitivity]:
    """The sensitivity stage of :func:`convert` after a reference pass (see :func:`sensitivity_pass`).

    ``fisher``: second-order estimates for every leaf and width (weight errors of
    ``estimate_rounding``, default ``rtn``), then leaves whose estimate reaches
    ``measure_above`` are measured with the same rounding; ``measured``: every leaf
    measured (default: with ``rounding``, as written). Results go to ``checkpoint``
    (resumable) when given.
    """
    est_rounding = estimate_rounding or (ESTIMATE_ROUNDING if estimator == "fisher" else rounding)
    ckpt = checkpoint if checkpoint is not None else Checkpoint(None, "")
    say = log or (lambda s: None)
    bar = None

    def tick(path_: str, b: int) -> None:
        if bar is not None:
            if bar.n + 1 > bar.total:
                bar.total = bar.n + 1
            bar.update(1)
        if on_pass is not None:
            on_pass(path_, b)

    def tick_bar(path_: str, b: int) -> None:
        if bar is not None:
            bar.update(1)

    try:
        if estimator == "fisher":
            missing = [t for t in active if t.path not in ckpt.results]
            if missing:
                from .fisher import fisher_sensitivities

                bar = _progress_bar(len(ref.batches), "estimating sensitivity", progress)
                est = fisher_sensitivities(
                    model, ref, missing, bits, out_dtype, est_rounding, n_probes=n_probes, progress=tick_bar,
                )
                ckpt.results.update(est)
                ckpt.save()
                if bar is not None:
                    bar.close()
                    bar = None
            # where the second-order estimate is large it is least accurate: measure those
            verify = [
                t for t in active
                if not ckpt.results[t.path].measured and max(ckpt.results[t.path].kl.values()) >= measure_above
            ]
            if verify:
                say(f"measuring {len(verify)} layers whose estimated KL reaches {measure_above}")
                drop = {t.path for t in verify}
                ckpt.results = {p: r for p, r in ckpt.results.items() if p not in drop}
                bar = _progress_bar(len(verify) * len(bits), "measuring sensitivity", progress)
                ckpt.results.update(
                    measure_sensitivities(model, ref, verify, bits, out_dtype, est_rounding, measure_floor, ckpt, tick)
                )
            return {t.path: ckpt.results[t.path] for t in active}
        todo = [t for t in active if t.path not in ckpt.results]
        est_passes = sum(
            1 if t.pinned else len([b for b in bits if 4.0 ** (min(bits) - b) >= measure_floor]) for t in todo
        )
        bar = _progress_bar(est_passes, "measuring sensitivity", progress)
        return measure_sensitivities(model, ref, active, bits, out_dtype, est_rounding, measure_floor, ckpt, tick)
    finally:
        if bar is not None:
            bar.close()
