"""``optiq lora train`` as a library call: load, plan ranks, wrap, train, save.

Everything a run decides before training (targets, bits, ranks, parameter count, data
counts) is printed through ``echo`` first, so a user sees what will be trained and can
stop; ``dry_run`` stops there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from optiq.core.errors import ConfigError, DataError

from .ceiling import CeilingMap, measure_ceiling
from .adapters import ADAPTER_CONFIG, apply_plan, build_config, trainable_parameter_count, write_config
from .data import load_data_dir
from .ranks import REFERENCE_BITS, RankPlan, plan_ranks, read_quant_info
from .targets import TargetSelection, find_targets
from .trainer import TrainArgs, TrainResult, list_checkpoints, train, training_head


@dataclass
class LoraOptions:
    data: Path | None
    output: Path
    model: str | Path | None = None  # None: default_model()
    rank: int = 8
    rank_scaling: str = "by_bits"
    reference_bits: int = REFERENCE_BITS
    target_modules: str | list[str] | None = None
    num_layers: int = 16
    train_experts: bool = False
    scale: float | None = None
    alpha: float | None = None
    dropout: float = 0.0
    mask_prompt: bool = False
    long_records: str = "error"
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    train: TrainArgs = field(default_factory=TrainArgs)


def default_model() -> tuple[Path, str]:
    """The model ``optiq lora train`` uses without MODEL, and why: the bundled model's OptiQ
    quant (QLoRA on what ``optiq convert`` makes, with mixed bits for by_bits to follow)
    when it is installed, else the bundled float model."""
    from optiq.core import model_io

    if model_io.has_bundled_quant():
        return model_io.bundled_quant_path(), "default: the bundled model's OptiQ quant"
    return model_io.bundled_model_path(), "default: the bundled float model; its OptiQ quant is not installed"


def format_plan(plan: RankPlan, selection: TargetSelection, total_params: int) -> list[str]:
    """Per-layer ranks (one line per adapted block) and the trainable-parameter count."""
    scales = set(plan.scales.values())
    scale = f"scale {next(iter(scales)):g}" if len(scales) == 1 else "scale = alpha / rank"
    lines = [
        f"rank scaling: {plan.scaling}"
        + (f" (asked: {plan.requested})" if plan.scaling != plan.requested else "")
        + f", base rank {plan.base_rank}, {scale}, bits from {plan.bits_source}"
    ]
    by_layer: dict[int, list] = {}
    for t in plan.targets:
        by_layer.setdefault(t.layer, []).append(t)
    for layer, targets in sorted(by_layer.items()):
        short = [t.name.rsplit(".", 1)[-1] for t in targets]
        if len(set(short)) != len(short):
            short = [t.name for t in targets]
        items = []
        for t, name in zip(targets, short, strict=True):
            bits = plan.bits[t.path]
            b = "float" if bits >= 16 else f"{bits}b"
            extra = f" s={plan.sensitivity[t.path]:.3g}" if t.path in plan.sensitivity else ""
            extra += f" x{t.num_experts} experts" if t.num_experts else ""
            items.append(f"{name} {b} r{plan.ranks[t.path]}{extra}")
        lines.append(f"  layer {layer:>3} {targets[0].layer_kind}: " + ", ".join(items))
    n = plan.trainable_parameters
    pct = 100.0 * n / total_params if total_params else 0.0
    lines.append(
        f"trainable parameters: {n:,} ({pct:.3f}% of {total_params:,}) in {len(plan.targets)} "
        f"modules of {len(selection.adapted_layers)} blocks"
    )
    lines += [f"note: {x}" for x in list(selection.notes) + list(plan.notes)]
    return lines


def _check_output(opts: LoraOptions, config: dict) -> None:
    out = Path(opts.output)
    existing = out / ADAPTER_CONFIG
    if opts.resume:
        if not existing.exists():
            raise ConfigError(f"--resume: {out} has no {ADAPTER_CONFIG} (nothing to resume)")
        old = json.loads(existing.read_text())
        old_modules = {p: m["rank"] for p, m in (old.get("optiq") or {}).get("modules", {}).items()}
        new_modules = {p: m["rank"] for p, m in config["optiq"]["modules"].items()}
        if old_modules != new_modules:
            raise ConfigError(
                f"--resume: the adapter in {out} has other target modules or ranks than these "
                "options give; resume with the options of the original run"
            )
        return
    if out.exists() and (existing.exists() or list_checkpoints(out)) and not opts.overwrite:
        raise ConfigError(
            f"{out} already holds an adapter: pass --resume to continue its training, "
            "--overwrite to replace it, or choose another -o directory"
        )


def _clear_previous_run(out: Path) -> None:
    """Remove the files an earlier run wrote there (only ours), for --overwrite."""
    import shutil

    from .adapters import ADAPTER_WEIGHTS
    from .trainer import BEST_WEIGHTS, CHECKPOINTS, STATE_FILE

    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BEST_WEIGHTS, STATE_FILE):
        (out / name).unlink(missing_ok=True)


@dataclass
class _Prepared:
    lm: Any
    train_set: Any
    valid_set: Any
    plan: RankPlan
    config: dict
    blocks: list


def _prepare(opts: LoraOptions, echo: Callable[[str], None], need_data: bool = True) -> _Prepared:
    """Load the model and data, plan the ranks and print them (everything before training)."""
    from optiq.core.architecture import decoder_layers, parameter_count
    from optiq.core.model_io import load_model

    data_dir = Path(opts.data) if opts.data is not None else None
    if data_dir is None and need_data:
        raise DataError("--data DIR is required (a directory with train.jsonl)")
    if data_dir is not None and not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    if data_dir is not None and not (data_dir / "train.jsonl").exists():
        raise DataError(f"{data_dir} has no train.jsonl (one JSON record per line)")
    if not 0.0 <= opts.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {opts.dropout}")
    opts.train.check()

    model, why = (opts.model, "") if opts.model is not None else default_model()
    lm = load_model(model, fast_cpu=True)
    echo(f"model: {lm.path}" + (f" ({why})" if why else ""))
    train_set = valid_set = None
    if data_dir is not None:
        train_set, valid_set = load_data_dir(
            data_dir,
            lm.tokenizer,
            max_seq_length=opts.train.max_seq_length,
            mask_prompt=opts.mask_prompt,
            long_records=opts.long_records,
        )
        echo("data: " + train_set.summary())
        echo("data: " + (valid_set.summary() if valid_set else "no valid.jsonl: no validation loss; "
                         "the best adapter is the last one"))

    selection = find_targets(lm.model, opts.target_modules, opts.num_layers, opts.train_experts)
    quant = read_quant_info(lm.path, lm.config)
    plan = plan_ranks(
        selection.targets,
        rank=opts.rank,
        scaling=opts.rank_scaling,
        scale=opts.scale,
        alpha=opts.alpha,
        quant=quant,
        reference_bits=opts.reference_bits,
    )
    total = parameter_count(lm.model)
    for line in format_plan(plan, selection, total):
        echo(line)
    blocks = decoder_layers(lm.model)
    config = build_config(
        plan,
        len(blocks),
        dropout=opts.dropout,
        alpha=opts.alpha,
        model_path=str(lm.path),
        extra={"training": {**asdict(opts.train), "mask_prompt": opts.mask_prompt,
                            "data": str(data_dir), "reference_bits": opts.reference_bits}},
    )
    return _Prepared(lm, train_set, valid_set, plan, config, blocks)


def _wrap(p: _Prepared, opts: LoraOptions, echo: Callable[[str], None], tokens: list[int]):
    """Wrap the model with the planned adapters; the output head for the chunked loss."""
    import mlx.core as mx

    mx.random.seed(opts.train.seed)
    apply_plan(p.lm.model, p.plan, opts.dropout)
    n = trainable_parameter_count(p.lm.model)
    if n != p.plan.trainable_parameters:  # the wrapped model must hold exactly the planned factors
        raise ConfigError(f"internal: planned {p.plan.trainable_parameters} trainable parameters, model has {n}")
    head = training_head(p.lm.model, mx.array([tokens[:4]]))
    if head is None:
        echo("note: the model transforms its logits after the output head (or has no single head): "
             "the loss uses full vocabulary-sized logits (more memory)")
    return head


def train_lora(opts: LoraOptions, echo: Callable[[str], None] = print, reporter=None) -> TrainResult | None:
    """Run a LoRA training as the CLI does; returns None for a dry run."""
    p = _prepare(opts, echo)
    if opts.dry_run:
        return None
    _check_output(opts, p.config)
    head = _wrap(p, opts, echo, list(p.train_set.records[0].tokens))
    if not opts.resume:
        _clear_previous_run(Path(opts.output))
        write_config(p.config, Path(opts.output))
    return train(
        p.lm.model,
        p.train_set,
        p.valid_set,
        opts.train,
        Path(opts.output),
        resume=opts.resume,
        reporter=reporter,
        blocks=p.blocks,
        head=head,
    )


def plan_lora(opts: LoraOptions, max_memory: float | None = None,
              echo: Callable[[str], None] = print) -> CeilingMap:
    """``optiq lora train --plan``: the measured training ceiling map (see
    :mod:`optiq.train.ceiling`) of this model with these options, under ``max_memory``
    bytes (default: 80% of the memory available now). Trains on ``opts.data``'s records
    when given, else on the bundled calibration text; writes nothing."""
    from optiq.core.calibration import BUNDLED_CALIBRATION, load_records, render_record

    p = _prepare(opts, echo, need_data=False)
    if p.train_set is not None:
        tokens = [t for r in p.train_set.records for t in r.tokens]
    else:
        tok = p.lm.tokenizer
        tokens = [t for r in load_records(BUNDLED_CALIBRATION) for t in tok.encode(render_record(r, tok))]
    budget = int(max_memory) if max_memory is not None else int(0.8 * available_memory())
    head = _wrap(p, opts, echo, tokens)
    return measure_ceiling(p.lm.model, tokens, opts.train, budget, head=head, blocks=p.blocks, echo=echo)


def available_memory() -> int:
    """Bytes the system can give this process now (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise ConfigError("cannot read the available memory (/proc/meminfo): give --max-memory")
