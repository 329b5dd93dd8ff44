"""``optiq info``: describe a model."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from .options import model_argument


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@click.command()
@model_argument
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(model: str | None, as_json: bool) -> None:
    """Describe MODEL: architecture, layer kinds, parameters, quantization, size, and
    where this machine computes (device, BLAS, optiq-kernels)."""
    from optiq.core.cpu import compute_summary, describe_compute
    from optiq.core.info import model_info
    from optiq.core.mlx_lm_seam import mlx_lm_version, run_checks

    mi = model_info(model)
    compute = compute_summary()
    seam = run_checks()
    problems = [p for p in seam.values() if p]
    if as_json:
        data = asdict(mi)
        data["path"] = str(mi.path)
        data["layer_kind_counts"] = mi.layer_kind_counts
        data["compute"] = compute
        data["mlx_lm"] = {"version": mlx_lm_version(), "checks": seam}
        click.echo(json.dumps(data, indent=2, default=str))
        return
    kinds = ", ".join(f"{n} {k}" for k, n in mi.layer_kind_counts.items())
    click.echo(f"model:        {mi.path}")
    click.echo(f"architecture: {mi.architecture} (model_type {mi.model_type})")
    click.echo(f"layers:       {mi.num_layers} ({kinds})")
    if mi.num_experts:
        click.echo(f"experts:      {mi.num_experts} per MoE block, {mi.experts_per_token} active per token")
    click.echo(f"hidden size:  {mi.hidden_size}   vocab: {mi.vocab_size}   context: {mi.context_length}")
    click.echo(f"parameters:   {mi.parameters:,}")
    click.echo(f"dtype:        {mi.dtype}")
    click.echo(f"size on disk: {human_bytes(mi.disk_bytes)} (weights {human_bytes(mi.weight_bytes)})")
    click.echo(f"compute:      {describe_compute(compute)}")
    verdict = "; ".join(problems) if problems else f"the {len(seam)} internals OptiQ patches or reads are as expected"
    click.echo(f"mlx-lm:       {mlx_lm_version()}: {verdict}")
    if mi.quantization:
        glob = {k: v for k, v in mi.quantization.items() if not isinstance(v, dict)}
        per_layer = sum(isinstance(v, dict) for v in mi.quantization.values())
        hist = ", ".join(f"{b}-bit: {n}" for b, n in mi.bits_histogram.items())
        click.echo(f"quantization: {glob} + {per_layer} per-layer overrides; leaves {hist}")
    else:
        click.echo("quantization: none (full precision)")
    click.echo("")
    click.echo(f"{'layer':>5}  {'kind':<17} {'cache':<13} {'params':>10}  bits")
    for layer in mi.layers:
        bits = "/".join(map(str, layer.bits)) or "float"
        click.echo(f"{layer.index:>5}  {layer.kind:<17} {layer.cache:<13} {layer.params:>10,}  {bits}")
