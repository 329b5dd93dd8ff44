"""``optiq convert``: the best mixed-precision quantization of a model for a given size.

    result = convert("path/to/hf-model", "out", target_bpw=4.5, candidate_bits=(4, 8))

1. measure: each quantizable leaf's KL to the full-precision model at each candidate
   width, with only that leaf quantized (:mod:`.sensitivity`); or, with
   ``method="static"``, data-free priors from architecture rules (:mod:`.static`);
2. allocate: per-leaf widths minimizing the summed KL under the size budget
   (:mod:`.allocate`);
3. write: each leaf rounded with the chosen method (GPTQ by default, :mod:`.rounding`)
   into MLX's affine format; a model directory stock ``mlx_lm.load`` loads, with
   ``optiq_metadata.json`` and ``sensitivity.png``, renamed into place atomically
   (:mod:`.writer`). A long measurement checkpoints after every leaf and resumes.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..errors import ConfigError, ModelLoadError
from ..model_io import read_config, resolve_model_path, text_config, validate_model_dir
from .allocate import Option, allocate, check_target, leaf_options
from .calibration import (
    DEFAULT_N_CALIBRATION,
    DEFAULT_SEQ_LEN,
    build_calibration,
    load_records,
)
from .formats import DTYPE_BITS, check_group_size, dtype_name, parse_bits
from .rounding import ROUNDING_METHODS, Quantized, quantize_in_chunks
from .source import WeightSource, take_fp32
from .fisher import ESTIMATE_ROUNDING
from .sensitivity import (
    MEASURE_FLOOR,
    Checkpoint,
    LeafSensitivity,
    capture_reference,
    fingerprint,
    measure_sensitivities,
    quantize_targets,
)
from .targets import Target, find_targets

METHODS = ("optiq", "static")
ESTIMATORS = ("fisher", "measured")
# A spread of widths lets the allocation trade 3-bit layers for 5/6/8-bit ones at equal size;
# on the bundled model that halves the KL of a 4/8-only allocation at the same budget.
DEFAULT_CANDIDATE_BITS = (3, 4, 5, 6, 8)
# Fisher estimates at or above this (nats) are re-measured by forward passes (one full
# forward per leaf and width). Off by default: with RTN estimate errors, measuring the large
# ones did not improve held-out KL on the bundled model (benchmarks/convert_quality.py), and
# it costs as much as the whole estimate per pass. Pass e.g. 0.02 to turn it on.
MEASURE_ABOVE = float("inf")
METADATA_FILE = "optiq_metadata.json"
PLOT_FILE = "sensitivity.png"
FORMAT_VERSION = 1


@dataclass
class LayerResult:
    """One quantizable leaf: its chosen width and measured (or prior) sensitivities."""

    path: str
    kind: str
    role: str
    layer: int | None
    params: int
    bits: int | None
    group_size: int | None
    kl: dict[int, float] = field(default_factory=dict)
    measured: list[int] = field(default_factory=list)
    pinned: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class ConvertResult:
    out_dir: Path
    source: Path
    method: str
    rounding: str
    target_bpw: float
    bpw_kind: str
    candidate_bits: tuple[int, ...]
    group_size: int
    weight_bpw: float  # mean bits of quantized weights, scales excluded
    effective_bpw: float  # mlx_lm.utils.compute_bits_per_weight of the written model
    size_bytes: int  # safetensors bytes on disk
    source_size_bytes: int
    predicted_kl: float  # sum of per-leaf KLs at the chosen widths (static: prior units)
    layers: list[LayerResult]
    not_quantized: dict[str, str]
    calibration: dict[str, Any] | None
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    resumed_layers: int = 0

    def bits_histogram(self) -> dict[int, tuple[int, int]]:
        """bits -> (number of leaves, number of weights)."""
        out: dict[int, list[int]] = {}
        for lr in self.layers:
            if lr.bits is None:
                continue
            c = out.setdefault(lr.bits, [0, 0])
            c[0] += 1
            c[1] += lr.params
        return {b: (c[0], c[1]) for b, c in sorted(out.items())}


def _source_dtype(config: dict[str, Any], dtypes: dict[str, mx.Dtype]) -> mx.Dtype:
    """The model dtype mlx-lm would use for scales and biases (as ``mlx_lm.convert``)."""
    cfg = text_config(config)
    name = config.get("torch_dtype") or config.get("dtype") or cfg.get("torch_dtype") or cfg.get("dtype")
    if name in DTYPE_BITS:
        return getattr(mx, name)
    counts: Counter = Counter()
    for d in dtypes.values():
        if mx.issubdtype(d, mx.floating):
            counts[d] += 1
    return counts.most_common(1)[0][0] if counts else mx.float32


def _checkpoint_path(out: Path) -> Path:
    return out.parent / f".{out.name}.optiq-checkpoint.json"


def _weights_fingerprint(path: Path) -> list[Any]:
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(path.glob("*.safetensors"))]


def validate_request(
    model_path: str | Path | None,
    out_dir: str | Path,
    target_bpw: float,
    candidate_bits: Any,
    group_size: int,
    calibration: str | Path | None,
    n_calibration: int,
    method: str,
    force: bool,
    bpw_kind: str,
    rounding: str | None,
    seq_len: int,
) -> tuple[Path, dict[str, Any], tuple[int, ...], str, list[dict[str, Any]] | None]:
    """Every check that can run before loading weights; raises typed errors."""
    from .writer import check_output_dir

    if method not in METHODS:
        raise ConfigError(f"unknown --method '{method}': use 'optiq' or 'static'")
    bits = parse_bits(candidate_bits)
    check_group_size(group_size)
    check_target(float(target_bpw), bits, bpw_kind)
    if rounding is None:
        rounding = "gptq" if method == "optiq" else "clip"
    if rounding not in ROUNDING_METHODS:
        raise ConfigError(f"unknown rounding '{rounding}': use one of {', '.join(ROUNDING_METHODS)}")
    if method == "static" and rounding == "gptq":
        raise ConfigError("--method static runs no forward passes, so it cannot use GPTQ rounding: use clip or rtn")
    if n_calibration < 1:
        raise ConfigError("--n-calibration must be at least 1")
    if seq_len < 8:
        raise ConfigError("--seq-len must be at least 8")
    out = Path(out_dir).expanduser()
    check_output_dir(out, force)
    records = load_records(calibration) if (calibration is not None and method == "optiq") else None
    path, config = validate_model_dir(model_path)
    if out.resolve() == path.resolve():
        raise ConfigError("the output directory must differ from the model directory")
    if config.get("quantization") or config.get("quantization_config") or text_config(config).get("quantization"):
        raise ModelLoadError(
            f"{path} is already quantized: convert from the full-precision (bf16/fp16/fp32) model"
        )
    return path, config, bits, rounding, records


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="pass", file=sys.stderr, dynamic_ncols=True, leave=True)


def convert(
    model_path: str | Path | None,
    out_dir: str | Path,
    target_bpw: float = 4.5,
    candidate_bits: Any = DEFAULT_CANDIDATE_BITS,
    group_size: int = 64,
    calibration: str | Path | None = None,
    n_calibration: int = DEFAULT_N_CALIBRATION,
    method: str = "optiq",
    force: bool = False,
    *,
    bpw_kind: str = "weights",
    rounding: str | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int = 8,
    measure_floor: float = MEASURE_FLOOR,
    resume: bool = True,
    plot: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_pass: Callable[[str, int, int], None] | None = None,
    estimator: str = "fisher",
    n_probes: int = 1,
    measure_above: float = MEASURE_ABOVE,
    sensitivities_file: str | Path | None = None,
    estimate_rounding: str | None = None,
) -> ConvertResult:
    """Convert a full-precision model directory into a mixed-precision MLX model at ``out_dir``.

    ``estimator``: ``"measured"`` runs one forward pass per leaf and width (the KL with
    only that leaf quantized); ``"fisher"`` estimates all of them to second order from a
    few probe backward passes (:mod:`.fisher`) and measures exactly the leaves whose
    estimate reaches ``measure_above`` (where a second-order estimate is least exact).
    ``estimate_rounding``: the fake-quantization the sensitivities are computed with
    (default: ``rtn`` for ``fisher`` -- data-free and fast; GPTQ then runs only once per
    leaf, at its chosen width -- and ``rounding`` for ``measured``).
    ``sensitivities_file``: reuse / save sensitivities across runs (e.g. several targets).
    ``on_pass(leaf_path, bits, passes_done)`` is called after every measurement pass
    (progress reporting; raising from it interrupts the run, leaving a checkpoint).
    """
    from mlx_lm.utils import compute_bits_per_weight, get_total_parameters

    from ..cpu import cast_floats
    from ..model_io import load_model
    from .writer import apply_quantization, atomic_dir, param_dtypes, quantization_config, restore_dtypes, write_model_dir

    say = log or (lambda s: None)
    t_start = time.time()
    out = Path(out_dir).expanduser()
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator '{estimator}': use 'fisher' or 'measured'")
    if estimate_rounding is not None and estimate_rounding not in ROUNDING_METHODS:
        raise ConfigError(f"unknown estimate rounding '{estimate_rounding}': use one of {', '.join(ROUNDING_METHODS)}")
    path, config, bits, rounding, records = validate_request(
        model_path, out, target_bpw, candidate_bits, group_size, calibration,
        n_calibration, method, force, bpw_kind, rounding, seq_len,
    )
    seconds: dict[str, float] = {}
    warnings: list[str] = []

    t0 = time.time()
    # static streams: the model stays lazy and each weight is read once per stage
    # (source.WeightSource); measuring still holds the whole model in fp32.
    loaded = load_model(path, fast_cpu=False, lazy=method == "static")
    model, tokenizer = loaded.model, loaded.tokenizer
    dtypes = param_dtypes(model)
    out_dtype = _source_dtype(config, dtypes)
    scale_bits = DTYPE_BITS[dtype_name(out_dtype)]
    if method != "static":
        cast_floats(model, mx.float32)
    seconds["load"] = time.time() - t0

    targets = find_targets(model, group_size)
    active = [t for t in targets if t.quantizable]
    not_quantized = {t.path: t.skip_reason for t in targets if not t.quantizable}
    if not active:
        raise ModelLoadError(f"{path} has no quantizable layers")
    total_params = get_total_parameters(model)
    quant_weight_names = {f"{t.path}.weight" for t in active}
    fixed_bits = sum(
        v.size * DTYPE_BITS.get(dtype_name(dtypes.get(k, v.dtype)), 32)
        for k, v in tree_flatten(model.parameters())
        if k not in quant_weight_names
    )
    if bpw_kind == "effective":
        lo = (fixed_bits + sum(
            min(t.n_params * b + (t.n_params // t.group_size) * 2 * scale_bits
                for b in ((t.pinned["bits"],) if t.pinned else bits))
            for t in active)) / total_params
        hi = (fixed_bits + sum(
            max(t.n_params * b + (t.n_params // t.group_size) * 2 * scale_bits
                for b in ((t.pinned["bits"],) if t.pinned else bits))
            for t in active)) / total_params
        if not (lo - 1e-6 <= target_bpw <= hi + 1e-6):
            raise ConfigError(
                f"effective target {target_bpw} bpw is outside what candidates {list(bits)} can reach "
                f"for this model ({lo:.3f} to {hi:.3f} bpw)"
            )

    # ---------------------------------------------------------------- measure
    calib_info = None
    ref = None
    sens: dict[str, LeafSensitivity] = {}
    resumed = 0
    ckpt = None
    if method == "optiq":
        t0 = time.time()
        calib = build_calibration(tokenizer, calibration, n_calibration, seq_len, records=records)
        if calib.tokens.shape[0] < n_calibration:
            warnings.append(
                f"calibration data gave {calib.tokens.shape[0]} sequences of {seq_len} tokens "
                f"(asked for {n_calibration})"
            )
        calib_info = {
            "source": calib.source,
            "sequences": int(calib.tokens.shape[0]),
            "seq_len": int(calib.tokens.shape[1]),
            "tokens": calib.n_tokens,
            "records": calib.records,
        }
        say(f"calibration: {calib.n_tokens} tokens ({calib_info['sequences']} x {seq_len}) from {calib.source}")
        seconds["calibration"] = time.time() - t0
        est_rounding = estimate_rounding or (ESTIMATE_ROUNDING if estimator == "fisher" else rounding)
        fp = fingerprint(
            FORMAT_VERSION, str(path.resolve()), read_config(path), _weights_fingerprint(path),
            calib.fingerprint(), rounding, group_size, list(bits), measure_floor, dtype_name(out_dtype),
            estimator, n_probes, measure_above, est_rounding,
        )
        keep_file = sensitivities_file is not None
        ckpt = Checkpoint(Path(sensitivities_file) if keep_file else _checkpoint_path(out), fp, resume=resume or keep_file)
        resumed = ckpt.resumed
        if resumed:
            say(f"reusing {resumed} layers' sensitivities from {ckpt.path}")
        done = [0]

        def tick(path_: str, b: int) -> None:
            done[0] += 1
            if on_pass is not None:
                on_pass(path_, b, done[0])

        t0 = time.time()
        ref, sens = sensitivity_pass(
            model, calib.tokens, active, bits, out_dtype, rounding, estimator=estimator,
            estimate_rounding=est_rounding, n_probes=n_probes, batch_size=batch_size,
            measure_above=measure_above, measure_floor=measure_floor, checkpoint=ckpt,
            on_pass=tick, progress=progress, log=say,
        )
        if not ref.replay_ok and ref.replay_checked:
            warnings.append("layer replay did not reproduce the reference: every pass ran the full model")
        seconds["sensitivity"] = time.time() - t0
        seconds["passes"] = float(done[0])
        kl_of = {p: s.kl for p, s in sens.items()}
        if keep_file:
            ckpt.save()
            ckpt = None  # keep the user's sensitivities file
    else:
        from .static import static_priors

        t0 = time.time()
        kl_of = static_priors(WeightSource(path, model).fresh(), active, bits, out_dtype, len(getattr(model, "layers", [])))
        seconds["sensitivity"] = time.time() - t0

    # ---------------------------------------------------------------- allocate
    options: dict[str, list[Option]] = {}
    for t in active:
        tb = (t.pinned["bits"],) if t.pinned else bits
        options[t.path] = leaf_options(t.n_params, tb, kl_of[t.path], t.group_size, scale_bits, bpw_kind)
    if bpw_kind == "weights":
        budget = int(np.floor(target_bpw * sum(t.n_params for t in active)))
    else:
        # a byte of slack: a target copied from another model's reported bpw must admit it
        budget = int(np.floor(target_bpw * total_params - fixed_bits + 8))
    if method == "static":
        # Rules cannot know which layers tolerate fewer bits, so static allocation only
        # upgrades: every leaf keeps at least the widest width the budget allows for all.
        from .static import floor_bits

        floor = floor_bits(options, budget)
        options = {p: [o for o in opts if o.bits >= floor] or opts for p, opts in options.items()}
    alloc = allocate(options, budget)
    if not alloc.feasible:
        warnings.append(
            f"target {target_bpw} bpw is below what pinned layers allow: wrote the smallest model instead"
        )

    # ---------------------------------------------------------------- write
    t0 = time.time()
    if method == "static":  # one weight at a time, read fresh, rounded in chunks
        fresh = WeightSource(path, model).fresh()
        for t in active:
            b = alloc.bits[t.path]
            w = take_fp32(fresh, f"{t.path}.weight")
            apply_quantization(model, {t.path: quantize_in_chunks(w, (b,), t.group_size, out_dtype, rounding)[b]}, out_dtype)
            del w
        del fresh
    else:
        chosen = quantize_targets(model, active, {t.path: (alloc.bits[t.path],) for t in active}, out_dtype, rounding, ref)
        quantized: dict[str, Quantized] = {p: q[alloc.bits[p]] for p, q in chosen.items()}
        del chosen
        apply_quantization(model, quantized, out_dtype)
    del ref
    restore_dtypes(model, dtypes)
    mx.eval(model.parameters())
    effective = float(compute_bits_per_weight(model))
    weight_bpw = sum(alloc.bits[t.path] * t.n_params for t in active) / sum(t.n_params for t in active)

    layers = []
    for t in targets:
        s = sens.get(t.path)
        layers.append(
            LayerResult(
                path=t.path, kind=t.kind, role=t.role, layer=t.layer, params=t.n_params,
                bits=alloc.bits.get(t.path), group_size=t.group_size if t.quantizable else None,
                kl=dict(kl_of.get(t.path, {})), measured=list(s.measured) if s else [],
                pinned=bool(t.pinned), notes=list(t.notes) + ([t.skip_reason] if t.skip_reason else []),
            )
        )
    new_config = dict(config)
    qcfg = quantization_config({t.path: (alloc.bits[t.path], t.group_size) for t in active}, group_size)
    new_config["quantization"] = qcfg
    new_config["quantization_config"] = qcfg
    source_size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    result = ConvertResult(
        out_dir=out, source=path, method=method, rounding=rounding, target_bpw=float(target_bpw),
        bpw_kind=bpw_kind, candidate_bits=bits, group_size=group_size, weight_bpw=weight_bpw,
        effective_bpw=effective, size_bytes=0, source_size_bytes=source_size,
        predicted_kl=alloc.predicted_kl, layers=layers, not_quantized=not_quantized,
        calibration=calib_info, seconds=seconds, warnings=warnings, resumed_layers=resumed,
    )
    with atomic_dir(out, force) as tmp:
        extra = {}
        if plot:
            from .plot import sensitivity_png

            title = (
                f"{path.name}: {method} ({rounding}), target {target_bpw} bpw ({bpw_kind}), "
                f"achieved {weight_bpw:.3f} (effective {effective:.3f})"
            )
            ylabel_layers = [
                {"path": lr.path, "bits": lr.bits, "kl": {str(b): v for b, v in lr.kl.items()},
                 "measured": lr.measured}
                for lr in layers
                if lr.bits is not None
            ]
            extra[PLOT_FILE] = sensitivity_png(ylabel_layers, title, static=method == "static")
        write_model_dir(tmp, model, new_config, path, {}, extra)
        result.size_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        result.seconds["write"] = time.time() - t0
        result.seconds["total"] = time.time() - t_start
        (tmp / METADATA_FILE).write_text(metadata_json(result))
    if ckpt is not None:
        ckpt.remove()
    return result


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


def metadata(result: ConvertResult) -> dict[str, Any]:
    """The ``optiq_metadata.json`` document (schema in docs/convert.md)."""
    return {
        "format": "optiq-convert",
        "version": FORMAT_VERSION,
        "method": result.method,
        "rounding": result.rounding,
        "source_model": str(result.source),
        "target_bpw": result.target_bpw,
        "bpw_kind": result.bpw_kind,
        "candidate_bits": list(result.candidate_bits),
        "group_size": result.group_size,
        "achieved": {
            "weight_bpw": round(result.weight_bpw, 6),
            "effective_bpw": round(result.effective_bpw, 6),
            "size_bytes": result.size_bytes,
            "source_size_bytes": result.source_size_bytes,
        },
        "predicted_kl": result.predicted_kl,
        "sensitivity_unit": "mean KL (nats/token)" if result.method == "optiq" else "static prior (relative)",
        "calibration": result.calibration,
        "bits_histogram": {str(b): {"layers": c, "params": n} for b, (c, n) in result.bits_histogram().items()},
        "layers": {
            lr.path: {
                "bits": lr.bits,
                "group_size": lr.group_size,
                "params": lr.params,
                "kind": lr.kind,
                "role": lr.role,
                "layer": lr.layer,
                "pinned": lr.pinned,
                "sensitivity": {str(b): v for b, v in lr.kl.items()},
                "measured_bits": lr.measured,
                **({"notes": lr.notes} if lr.notes else {}),
            }
            for lr in result.layers
            if lr.bits is not None
        },
        "not_quantized": result.not_quantized,
        "warnings": result.warnings,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
    }


def metadata_json(result: ConvertResult) -> str:
    import json

    return json.dumps(metadata(result), indent=2) + "\n"


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """Read ``optiq_metadata.json`` of a converted model (for LoRA rank-by-bits, reports)."""
    import json

    p = Path(model_dir) / METADATA_FILE
    if not p.exists():
        raise ModelLoadError(f"{model_dir} has no {METADATA_FILE}: not written by optiq convert")
    return json.loads(p.read_text())


__all__ = [
    "ConvertResult",
    "LayerResult",
    "convert",
    "metadata",
    "read_metadata",
    "resolve_model_path",
    "Target",
]
