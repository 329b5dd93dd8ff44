"""``optiq kv-cache``: measure KV sensitivity and write a mixed-precision KV config."""

from __future__ import annotations

import click

from .options import model_argument


@click.command("kv-cache")
@model_argument
@click.option("--target-bits", type=float, default=4.5, show_default=True,
              help="Budget: mean stored bits per K/V element, fp16 scale+bias overhead included.")
@click.option("--candidate-bits", default="4,8", show_default=True,
              help="Comma-separated widths to choose from (2,3,4,5,6,8).")
@click.option("--group-size", type=int, default=64, show_default=True,
              help="Quantization group size along head_dim (32, 64 or 128; must divide head_dim).")
@click.option("--rotation", type=click.Choice(["hadamard", "none"]), default="hadamard", show_default=True,
              help="Rotate K/V by a Hadamard block per group before quantizing (spreads outlier "
                   "channels; same bytes), or store them as they are.")
@click.option("--seq-len", type=int, default=None, help="Tokens per calibration sequence [default: 512].")
@click.option("--n-samples", type=int, default=None, help="Number of calibration sequences [default: 4].")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Calibration text file [default: the model's calibration.txt/heldout.txt].")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), required=True,
              help="Directory for kv_config.json, kv_sensitivity.json and kv_sensitivity.png.")
@click.option("--quiet", is_flag=True, help="Print only the output paths.")
def kv_cache(
    model: str | None,
    target_bits: float,
    candidate_bits: str,
    group_size: int,
    rotation: str,
    seq_len: int | None,
    n_samples: int | None,
    data: str | None,
    output: str,
    quiet: bool,
) -> None:
    """Measure per-layer K and V sensitivity of MODEL's KV cache and allocate bits.

    Only layers with a real per-token KV cache are configured (in Qwen3.5's hybrid stack:
    the full-attention layers); linear-attention layers keep their fixed-size state in
    full precision and are reported as skipped.
    """
    from optiq.core.kv.pipeline import DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN, run_kv_cache

    echo = (lambda s: None) if quiet else click.echo
    # progress: one line per decoder block / sequence, to stderr (a log keeps it)
    progress = None if quiet else (lambda s: click.echo(s, err=True))

    run = run_kv_cache(
        model,
        output,
        target_bits=target_bits,
        candidate_bits=candidate_bits,
        group_size=group_size,
        seq_len=seq_len or DEFAULT_SEQ_LEN,
        n_samples=n_samples or DEFAULT_N_SAMPLES,
        data=data,
        log=echo,
        progress=progress,
        rotation=rotation,
    )
    cfg, sens = run.config, run.sensitivity
    bits = sorted(sens.candidate_bits)
    echo("")
    echo(f"sensitivity: KL vs full-precision KV (nats/token), {sens.n_samples} x {sens.seq_len} tokens, "
         f"{sens.seconds:.1f} s ({sens.cpu_seconds:.1f} CPU s)")
    head = "".join(f"{f'K@{b}':>10}" for b in bits) + "".join(f"{f'V@{b}':>10}" for b in bits)
    echo(f"{'layer':>5}{head}   K bits  V bits")
    for i, d in sorted(sens.kl.items()):
        row = "".join(f"{d['k'][b]:>10.2e}" for b in bits) + "".join(f"{d['v'][b]:>10.2e}" for b in bits)
        kb, vb = cfg.layers[i]
        echo(f"{i:>5}{row}   {kb:>6}  {vb:>6}")
    echo("")
    echo(f"bits: target {cfg.target_bits:g}, achieved {cfg.achieved_bits:.3f} = mean over KV bytes actually "
         f"stored per K/V element (codes + fp16 scale and bias per group of {cfg.group_size})")
    echo(f"KV bytes/token: {cfg.bytes_per_token:g} (fp16 KV: {cfg.model.fp16_bytes_per_token()}, "
         f"{100 * cfg.fp16_ratio:.1f}%)")
    m = run.measured
    others = ", ".join(f"{k.replace('_', ' ')} {v:.2e}" for k, v in m.items() if k != "chosen")
    echo(f"KL of the whole config: measured {m['chosen']:.2e} (predicted {cfg.extra['predicted_kl']:.2e}); "
         f"{others}")
    echo(f"total time {run.seconds:.1f} s")
    for f in run.files.values():
        click.echo(f"wrote {f}")
