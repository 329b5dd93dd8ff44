"""``optiq convert``: sensitivity-aware mixed-precision weight quantization."""

from __future__ import annotations

import json

import click

from .options import model_argument


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def summary_lines(result) -> list[str]:
    """The final table printed after a conversion."""
    hist = result.bits_histogram()
    total = sum(n for _, n in hist.values()) or 1
    lines = [
        "",
        f"{'bits':>5} {'layers':>7} {'weights':>12} {'share':>7}",
    ]
    for b, (count, n) in hist.items():
        lines.append(f"{b:>5} {count:>7} {n:>12,} {100 * n / total:>6.1f}%")
    lines.append("")
    lines.append(
        f"bits per weight: {result.weight_bpw:.3f} (quantized weights, scales excluded; "
        f"target {result.target_bpw} {result.bpw_kind})"
    )
    lines.append(
        f"effective bpw:   {result.effective_bpw:.3f} (mlx_lm.utils.compute_bits_per_weight: "
        "scales, biases and unquantized parameters included)"
    )
    ratio = result.source_size_bytes / max(result.size_bytes, 1)
    lines.append(
        f"size on disk:    {_human(result.size_bytes)} (source {_human(result.source_size_bytes)}, {ratio:.2f}x smaller)"
    )
    unit = "nats/token, sum of per-layer KLs" if result.method == "optiq" else "static prior units"
    lines.append(f"predicted KL:    {result.predicted_kl:.5f} ({unit})")
    lines.append(f"method:          {result.method} (rounding: {result.rounding}, group size {result.group_size})")
    if result.calibration:
        c = result.calibration
        lines.append(f"calibration:     {c['tokens']} tokens ({c['sequences']} x {c['seq_len']}) from {c['source']}")
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items() if k != "passes")
    lines.append(f"time:            {secs}")
    if result.not_quantized:
        lines.append(f"not quantized ({len(result.not_quantized)}):")
        for p, why in result.not_quantized.items():
            lines.append(f"  {p}: {why}")
    for lr in result.layers:
        if lr.bits is not None and lr.notes:
            lines.append(f"note: {lr.path}: {'; '.join(lr.notes)}")
    for w in result.warnings:
        lines.append(f"warning: {w}")
    lines.append(f"wrote {result.out_dir} (optiq_metadata.json, sensitivity.png)")
    return lines


@click.command()
@model_argument
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output model directory.")
@click.option("--target-bpw", type=float, default=4.5, show_default=True,
              help="Target bits per weight (see --bpw-kind).")
@click.option("--candidate-bits", default="3,4,5,6,8", show_default=True,
              help="Comma-separated bit widths to choose from (MLX affine: any of 2,3,4,5,6,8).")
@click.option("--group-size", type=int, default=64, show_default=True, help="Quantization group size (32, 64, 128).")
@click.option("--calibration", type=click.Path(), default=None,
              help="Calibration jsonl of {\"text\"} or {\"messages\"} records (default: bundled set).")
@click.option("--n-calibration", type=int, default=8, show_default=True,
              help="Number of calibration sequences.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per calibration sequence.")
@click.option("--method", type=click.Choice(["optiq", "static"]), default="optiq", show_default=True,
              help="optiq: measured KL sensitivities; static: architecture rules, no forward passes.")
@click.option("--bpw-kind", type=click.Choice(["weights", "effective"]), default="weights", show_default=True,
              help="weights: mean bits of quantized weights (scales excluded); "
                   "effective: mlx_lm's bits per weight (scales, biases, float params included).")
@click.option("--estimator", type=click.Choice(["fisher", "measured"]), default="fisher", show_default=True,
              help="fisher: second-order KL from probe backward passes, large ones measured; "
                   "measured: one forward pass per layer and width.")
@click.option("--rounding", type=click.Choice(["gptq", "clip", "rtn"]), default=None,
              help="Rounding inside MLX's format (default: gptq for optiq, clip for static).")
@click.option("--estimate-rounding", type=click.Choice(["rtn", "clip", "gptq"]), default=None,
              help="Fake-quantization the sensitivities are computed with (default: rtn for fisher -- "
                   "fast, data-free; GPTQ then runs once per layer at its chosen width -- and "
                   "--rounding for measured).")
@click.option("--sensitivities", "sensitivities_file", type=click.Path(), default=None,
              help="Save measured sensitivities to FILE and reuse them on later runs "
                   "(same model, calibration and settings): convert at several sizes, measure once.")
@click.option("--max-memory", "max_memory_gb", type=float, default=None,
              help="Memory cap in GB for the plan check (default: the memory available at start). "
                   "Convert stops at once, naming its estimate, when the plan exceeds it.")
@click.option("--head-tile-mb", type=int, default=256, show_default=True,
              help="MB of vocabulary-sized temporaries (logit tiles) the streamed head may use at once.")
@click.option("--force", is_flag=True, help="Overwrite the output directory if it exists.")
@click.option("--no-resume", is_flag=True, help="Ignore a checkpoint left by an interrupted run.")
@click.option("--no-plot", is_flag=True, help="Do not write sensitivity.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (optiq_metadata.json).")
def convert(model, output, target_bpw, candidate_bits, group_size, calibration, n_calibration, seq_len,
            method, bpw_kind, estimator, rounding, estimate_rounding, sensitivities_file, max_memory_gb,
            head_tile_mb, force, no_resume, no_plot, as_json) -> None:
    """Quantize MODEL to mixed precision at --target-bpw, bits chosen by measured sensitivity.

    MODEL is a local HF-style directory with bf16/fp16/fp32 safetensors (default: the
    bundled model). The result loads with stock mlx_lm.load.
    """
    from optiq.core.quant.convert import convert as run_convert
    from optiq.core.quant.convert import metadata

    result = run_convert(
        model, output, target_bpw=target_bpw, candidate_bits=candidate_bits, group_size=group_size,
        calibration=calibration, n_calibration=n_calibration, method=method, force=force,
        bpw_kind=bpw_kind, rounding=rounding, seq_len=seq_len, resume=not no_resume, plot=not no_plot,
        estimator=estimator, sensitivities_file=sensitivities_file, estimate_rounding=estimate_rounding,
        max_memory_gb=max_memory_gb, head_tile_mb=head_tile_mb, progress=not as_json, log=None if as_json else (lambda s: click.echo(s, err=True)),
    )
    if as_json:
        click.echo(json.dumps(metadata(result), indent=2))
        return
    for line in summary_lines(result):
        click.echo(line)
