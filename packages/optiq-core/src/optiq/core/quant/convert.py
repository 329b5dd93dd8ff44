"""``optiq convert``: the best mixed-precision quantization of a model for a given size.

    result = convert("path/to/hf-model", "out", target_bpw=4.5, candidate_bits=(4, 8))

The model never sits in memory whole: it is loaded lazily and each stage brings one
decoder block at a time in fp32 (:mod:`.blocks`), so a model converts in a fraction of
its own size. Four stages over one :class:`.options.ConvertOptions`:

1. plan (:func:`plan`, :mod:`.plan`): every check, the lazy model, a memory estimate
   checked against the memory available (or ``--max-memory``) before any work;
2. measure (:func:`measure`): each quantizable leaf's KL at each candidate width --
   the streamed Fisher estimate by default (:mod:`.streamed_fisher`), measured passes on
   the whole model when asked (:mod:`.measure`); or data-free priors (``static``);
3. choose bits (:mod:`.choose`): per-leaf widths minimizing the summed KL under the budget;
4. write (:func:`write`, :mod:`.round_write`): block by block, each leaf rounded (GPTQ by
   default) from that block's Hessians and written into pre-planned shards
   (:mod:`.shards`); a directory stock ``mlx_lm.load`` loads, with ``optiq_metadata.json``
   and ``sensitivity.png``, renamed into place atomically. Sensitivities checkpoint and
   resume.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from ..calibration import build_calibration, load_records
from ..errors import ConfigError, ModelLoadError
from ..model_io import read_config, resolve_model_path, text_config, validate_model_dir
from .blocks import BlockModel
from .choose import SizeFacts, check_effective_target, choose_bits
from .formats import DTYPE_BITS, dtype_name
from .options import DEFAULT_CANDIDATE_BITS, ConvertOptions
from .plan import MemoryPlan, plan_memory
from .sensitivity import Checkpoint, LeafSensitivity, fingerprint
from .targets import Target, find_targets

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
    memory_plan_bytes: int = 0  # the plan stage's peak estimate

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


@dataclass
class Source:
    """The plan stage's result: the lazily loaded model and what the later stages need."""

    path: Path
    config: dict[str, Any]
    model: Any  # lazy: never evaluate its parameters (see blocks.py)
    tokenizer: Any
    blocks: BlockModel
    targets: list[Target]
    active: list[Target]
    dtypes: dict[str, mx.Dtype]
    out_dtype: mx.Dtype
    facts: SizeFacts
    records: list[dict[str, Any]] | None
    memory: MemoryPlan


def plan(opts: ConvertOptions, log: Callable[[str], None]) -> Source:
    """Stage 1: every check, the lazy model, its leaves, and the memory plan."""
    from mlx_lm.utils import get_total_parameters

    from ..model_io import load_model
    from .writer import check_output_dir, param_dtypes

    check_output_dir(opts.out_dir, opts.force)
    records = load_records(opts.calibration) if (opts.calibration is not None and opts.method == "optiq") else None
    path, config = validate_model_dir(opts.model)
    if opts.out_dir.resolve() == path.resolve():
        raise ConfigError("the output directory must differ from the model directory")
    if config.get("quantization") or config.get("quantization_config") or text_config(config).get("quantization"):
        raise ModelLoadError(f"{path} is already quantized: convert from the full-precision (bf16/fp16/fp32) model")
    loaded = load_model(path, fast_cpu=False, lazy=True)
    model = loaded.model
    dtypes = param_dtypes(model)
    out_dtype = _source_dtype(config, dtypes)
    targets = find_targets(model, opts.group_size)
    active = [t for t in targets if t.quantizable]
    if not active:
        raise ModelLoadError(f"{path} has no quantizable layers")
    quant_weight_names = {f"{t.path}.weight" for t in active}
    fixed_bits = sum(
        v.size * DTYPE_BITS.get(dtype_name(dtypes.get(k, v.dtype)), 32)
        for k, v in tree_flatten(model.parameters())
        if k not in quant_weight_names
    )
    facts = SizeFacts(int(get_total_parameters(model)), int(fixed_bits), DTYPE_BITS[dtype_name(out_dtype)])
    if opts.bpw_kind == "effective":
        check_effective_target(opts.target_bpw, active, opts.candidate_bits, facts)
    blocks = BlockModel(path, model, targets)
    memory = plan_memory(blocks, active, opts, opts.n_calibration * opts.seq_len)
    log(f"memory plan: {memory.describe()}")
    return Source(path, config, model, loaded.tokenizer, blocks, targets, active, dtypes, out_dtype, facts, records, memory)


@dataclass
class Measured:
    """The measure stage's result."""

    kl: dict[str, dict[int, float]]
    sens: dict[str, LeafSensitivity]
    calibration: dict[str, Any] | None = None
    states: Any = None  # BoundaryStates: block inputs, replayed by the write stage
    batches: list[mx.array] | None = None
    checkpoint: Checkpoint | None = None
    resumed: int = 0
    passes: int = 0
    warnings: list[str] = field(default_factory=list)


def measure(
    opts: ConvertOptions, src: Source, log: Callable[[str], None],
    on_pass: Callable[[str, int, int], None] | None, progress: bool,
) -> Measured:
    """Stage 2: sensitivities (streamed by default), or static priors."""
    if opts.method == "static":
        from .source import WeightSource
        from .static import static_priors

        kl = static_priors(WeightSource(src.path, src.model).fresh(), src.active, opts.candidate_bits,
                           src.out_dtype, len(src.blocks.layers))
        return Measured(kl=kl, sens={})
    calib = build_calibration(src.tokenizer, opts.calibration, opts.n_calibration, opts.seq_len, records=src.records)
    out = Measured(kl={}, sens={})
    if calib.tokens.shape[0] < opts.n_calibration:
        out.warnings.append(
            f"calibration data gave {calib.tokens.shape[0]} sequences of {opts.seq_len} tokens "
            f"(asked for {opts.n_calibration})"
        )
    out.calibration = {
        "source": calib.source, "sequences": int(calib.tokens.shape[0]), "seq_len": int(calib.tokens.shape[1]),
        "tokens": calib.n_tokens, "records": calib.records,
    }
    log(f"calibration: {calib.n_tokens} tokens ({out.calibration['sequences']} x {opts.seq_len}) from {calib.source}")
    fp = fingerprint(
        FORMAT_VERSION, str(src.path.resolve()), read_config(src.path), _weights_fingerprint(src.path),
        calib.fingerprint(), opts.rounding, opts.group_size, list(opts.candidate_bits), opts.measure_floor,
        dtype_name(src.out_dtype), opts.estimator, opts.n_probes, opts.measure_above, opts.est_rounding,
    )
    keep_file = opts.sensitivities_file is not None
    ckpt = Checkpoint(
        Path(opts.sensitivities_file) if keep_file else _checkpoint_path(opts.out_dir), fp,
        resume=opts.resume or keep_file,
    )
    out.resumed = ckpt.resumed
    if ckpt.resumed:
        log(f"reusing {ckpt.resumed} layers' sensitivities from {ckpt.path}")
    from .streamed_fisher import forward_states, streamed_fisher

    spill = src.memory.spill
    batches = [mx.array(calib.tokens[s : s + opts.batch_size]) for s in range(0, len(calib.tokens), opts.batch_size)]
    missing = [t for t in src.active if t.path not in ckpt.results]
    if opts.streamed_estimate and missing:
        est, out.states, out.batches = streamed_fisher(
            src.blocks, calib.tokens, src.active, opts.candidate_bits, src.out_dtype, batch_size=opts.batch_size,
            n_probes=opts.n_probes, spill=spill, tile_budget=opts.head_tile_mb << 20, log=log,
        )
        ckpt.results.update({p: r for p, r in est.items() if p not in ckpt.results})
        ckpt.save()
    elif missing:
        _measure_whole_model(opts, src, calib.tokens, ckpt, out, log, on_pass, progress)
    out.sens = {t.path: ckpt.results[t.path] for t in src.active}
    out.kl = {p: s.kl for p, s in out.sens.items()}
    if out.states is None and opts.rounding != "rtn":  # resumed, or measured whole: block inputs for Hessians
        out.states, out.batches = forward_states(src.blocks, batches, spill, log), batches
    if keep_file:
        ckpt.save()
        ckpt = None  # keep the user's sensitivities file
    out.checkpoint = ckpt
    return out


def _measure_whole_model(
    opts: ConvertOptions, src: Source, tokens: Any, ckpt: Checkpoint, out: Measured,
    log: Callable[[str], None], on_pass: Callable[[str, int, int], None] | None, progress: bool,
) -> None:
    """The estimators that hold the whole model in fp32 (the plan checked it fits)."""
    from ..cpu import cast_floats
    from ..model_io import load_model
    from .measure import sensitivity_pass

    full = load_model(src.path, fast_cpu=False).model
    cast_floats(full, mx.float32)
    active = [t for t in find_targets(full, opts.group_size) if t.quantizable]

    def tick(path_: str, b: int) -> None:
        out.passes += 1
        if on_pass is not None:
            on_pass(path_, b, out.passes)

    ref, _ = sensitivity_pass(
        full, tokens, active, opts.candidate_bits, src.out_dtype, str(opts.rounding), estimator=opts.estimator,
        estimate_rounding=opts.est_rounding, n_probes=opts.n_probes, batch_size=opts.batch_size,
        measure_above=opts.measure_above, measure_floor=opts.measure_floor, checkpoint=ckpt,
        on_pass=tick, progress=progress, log=log,
    )
    if not ref.replay_ok and ref.replay_checked:
        out.warnings.append("layer replay did not reproduce the reference: every pass ran the full model")
    del ref, full
    gc.collect()


def write(
    opts: ConvertOptions, src: Source, alloc: Any, measured: Measured, result: "ConvertResult",
    log: Callable[[str], None],
) -> None:
    """Stage 4: round and write into a temporary directory renamed into place."""
    from .round_write import output_specs, round_and_write
    from .shards import ShardWriter
    from .writer import atomic_dir, quantization_config, write_side_files

    specs = output_specs(src.blocks, src.active, alloc.bits, src.out_dtype, src.dtypes)
    result.effective_bpw = sum(s.nbytes for s in specs) * 8 / src.facts.total_params
    new_config = dict(src.config)
    qcfg = quantization_config({t.path: (alloc.bits[t.path], t.group_size) for t in src.active}, opts.group_size)
    new_config["quantization"] = qcfg
    new_config["quantization_config"] = qcfg
    with atomic_dir(opts.out_dir, opts.force) as tmp:
        writer = ShardWriter(tmp, specs)
        try:
            round_and_write(
                src.blocks, writer, src.active, alloc.bits, src.out_dtype, str(opts.rounding), src.dtypes,
                measured.states, measured.batches, log,
            )
        except BaseException:
            writer.abort()
            raise
        writer.close(src.facts.total_params)
        if measured.states is not None:
            measured.states.close()
        extra = {PLOT_FILE: _plot(result)} if opts.plot else {}
        write_side_files(tmp, new_config, src.path, None, extra)
        result.size_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        result.seconds["write"] = time.time() - result.seconds.pop("_write_start")
        result.seconds["total"] = time.time() - result.seconds.pop("_start")
        (tmp / METADATA_FILE).write_text(metadata_json(result))


def _plot(result: "ConvertResult") -> bytes:
    from .plot import sensitivity_png

    title = (
        f"{result.source.name}: {result.method} ({result.rounding}), target {result.target_bpw} bpw "
        f"({result.bpw_kind}), achieved {result.weight_bpw:.3f} (effective {result.effective_bpw:.3f})"
    )
    layers = [
        {"path": lr.path, "bits": lr.bits, "kl": {str(b): v for b, v in lr.kl.items()}, "measured": lr.measured}
        for lr in result.layers
        if lr.bits is not None
    ]
    return sensitivity_png(layers, title, static=result.method == "static")


def convert(
    model_path: str | Path | None,
    out_dir: str | Path,
    target_bpw: float = 4.5,
    candidate_bits: Any = DEFAULT_CANDIDATE_BITS,
    group_size: int = 64,
    calibration: str | Path | None = None,
    n_calibration: int | None = None,
    method: str = "optiq",
    force: bool = False,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_pass: Callable[[str, int, int], None] | None = None,
    **options: Any,
) -> ConvertResult:
    """Convert a full-precision model directory into a mixed-precision MLX model at ``out_dir``.

    Keyword options are :class:`.options.ConvertOptions` fields. Stages: :func:`plan`
    (checks, lazy load, memory plan), :func:`measure` (sensitivities, streamed block by
    block by default), :func:`.choose.choose_bits` (knapsack under the budget),
    :func:`write` (round and write block by block). ``log`` gets progress lines;
    ``on_pass(leaf_path, bits, passes_done)`` is called after every measured pass
    (raising from it interrupts the run, leaving a checkpoint).
    """
    if n_calibration is not None:
        options["n_calibration"] = n_calibration
    opts = ConvertOptions.checked(
        model_path, out_dir, target_bpw=target_bpw, candidate_bits=candidate_bits, group_size=group_size,
        calibration=calibration, method=method, force=force, **options,
    )
    return run(opts, log=log, on_pass=on_pass, progress=progress)


def run(
    opts: ConvertOptions,
    log: Callable[[str], None] | None = None,
    on_pass: Callable[[str, int, int], None] | None = None,
    progress: bool = False,
) -> ConvertResult:
    """The convert pipeline over one :class:`ConvertOptions` (see :func:`convert`)."""
    say = log or (lambda s: None)
    seconds: dict[str, float] = {"_start": time.time()}
    t0 = time.time()
    src = plan(opts, say)
    seconds["load"] = time.time() - t0
    t0 = time.time()
    measured = measure(opts, src, say, on_pass, progress)
    seconds["sensitivity"] = time.time() - t0
    if opts.method == "optiq":
        seconds["passes"] = float(measured.passes)  # measured forward passes (0: estimated or resumed)
    alloc = choose_bits(src.active, measured.kl, opts.candidate_bits, opts.target_bpw, opts.bpw_kind, src.facts,
                        static=opts.method == "static")
    warnings = list(measured.warnings)
    if not alloc.feasible:
        warnings.append(f"target {opts.target_bpw} bpw is below what pinned layers allow: wrote the smallest model instead")
    weight_bpw = sum(alloc.bits[t.path] * t.n_params for t in src.active) / sum(t.n_params for t in src.active)
    layers = []
    for t in src.targets:
        s = measured.sens.get(t.path)
        layers.append(LayerResult(
            path=t.path, kind=t.kind, role=t.role, layer=t.layer, params=t.n_params,
            bits=alloc.bits.get(t.path), group_size=t.group_size if t.quantizable else None,
            kl=dict(measured.kl.get(t.path, {})), measured=list(s.measured) if s else [],
            pinned=bool(t.pinned), notes=list(t.notes) + ([t.skip_reason] if t.skip_reason else []),
        ))
    result = ConvertResult(
        out_dir=opts.out_dir, source=src.path, method=opts.method, rounding=str(opts.rounding),
        target_bpw=opts.target_bpw, bpw_kind=opts.bpw_kind, candidate_bits=opts.candidate_bits,
        group_size=opts.group_size, weight_bpw=weight_bpw, effective_bpw=0.0, size_bytes=0,
        source_size_bytes=sum(f.stat().st_size for f in src.path.glob("*.safetensors")),
        predicted_kl=alloc.predicted_kl, layers=layers,
        not_quantized={t.path: t.skip_reason for t in src.targets if not t.quantizable},
        calibration=measured.calibration, seconds=seconds, warnings=warnings, resumed_layers=measured.resumed,
        memory_plan_bytes=src.memory.peak,
    )
    seconds["_write_start"] = time.time()
    write(opts, src, alloc, measured, result, say)
    if measured.checkpoint is not None:
        measured.checkpoint.remove()
    return result


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
        "memory_plan_bytes": result.memory_plan_bytes,
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
