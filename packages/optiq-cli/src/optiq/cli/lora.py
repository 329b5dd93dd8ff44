"""``optiq lora``: train LoRA adapters on (mixed-precision) quantized models, export, fuse."""

from __future__ import annotations

from pathlib import Path

import click

from .options import model_argument

SCALINGS = ["by_bits", "constant", "by_sensitivity"]


@click.group()
def lora() -> None:
    """LoRA training with rank following layer bits; PEFT / mlx-lm export; fusing."""


@lora.command("train")
@model_argument
@click.option("--data", "data", default=None, type=click.Path(path_type=Path),
              help="Directory with train.jsonl (and valid.jsonl): {text}, {messages} or {prompt, completion} "
                   "records. Required, except with --plan.")
@click.option("-o", "--output", "output", default="adapters", show_default=True, type=click.Path(path_type=Path),
              help="Adapter directory to write.")
@click.option("--max-seq-length", default=2048, show_default=True, type=int,
              help="Longest record in tokens; longer ones are an error unless --long-records says otherwise.")
@click.option("--long-records", type=click.Choice(["error", "truncate", "skip"]), default="error", show_default=True,
              help="What to do with records longer than --max-seq-length (truncated/skipped ones are counted).")
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank (the 4-bit rank for by_bits).")
@click.option("--rank-scaling", type=click.Choice(SCALINGS), default="by_bits", show_default=True,
              help="by_bits: rank = round(rank*4/bits) per module; by_sensitivity: rank ∝ convert "
                   "sensitivity; constant: plain LoRA.")
@click.option("--reference-bits", default=4, show_default=True, type=int,
              help="by_bits: the bit width that gets exactly --rank.")
@click.option("--target-modules", default="q_proj,v_proj", show_default=True,
              help="Comma-separated module names (matched as path suffixes), or all-linear. Gated DeltaNet "
                   "blocks have no q_proj/v_proj: name in_proj_qkv, in_proj_z, out_proj... to adapt them.")
@click.option("--num-layers", default=16, show_default=True, type=int,
              help="Adapt the last N decoder blocks (-1: all).")
@click.option("--train-experts", is_flag=True, help="Also adapt MoE expert pools that match the targets.")
@click.option("--scale", type=float, default=None, help="LoRA scale for every module (mlx-lm style; default 20).")
@click.option("--alpha", type=float, default=None, help="PEFT-style alpha: each module's scale is alpha / its rank.")
@click.option("--dropout", default=0.0, show_default=True, type=float, help="LoRA dropout.")
@click.option("--learning-rate", default=1e-5, show_default=True, type=float, help="Adam learning rate.")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--iters", default=1000, show_default=True, type=int, help="Training steps.")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute block activations in backward (less memory).")
@click.option("--mask-prompt", is_flag=True, help="Train only on the completion / final assistant turn.")
@click.option("--val-batches", default=25, show_default=True, type=int, help="Validation batches (-1: all).")
@click.option("--steps-per-eval", default=200, show_default=True, type=int)
@click.option("--steps-per-report", default=10, show_default=True, type=int)
@click.option("--save-every", default=100, show_default=True, type=int, help="Checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in the output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter already in the output directory.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="mx.compile the training step (slow to compile for Gated DeltaNet on CPU).")
@click.option("--dry-run", is_flag=True, help="Print targets, ranks and parameter count, then stop.")
@click.option("--plan", "plan", is_flag=True,
              help="Measure the training ceiling map: real steps at doubling sequence lengths up to "
                   "--max-seq-length, peak memory and tokens/s each; the longest that fits --max-memory. "
                   "Trains nothing to disk.")
@click.option("--max-memory", type=float, default=None,
              help="--plan: memory budget in GB (default: 80%% of the memory available now).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(model, data, output, max_seq_length, long_records, rank, rank_scaling, reference_bits,
              target_modules, num_layers, train_experts, scale, alpha, dropout, learning_rate, batch_size,
              iters, grad_checkpoint, mask_prompt, val_batches, steps_per_eval, steps_per_report,
              save_every, resume, overwrite, seed, compile_, dry_run, plan, max_memory, quiet) -> None:
    """Train a LoRA adapter on MODEL.

    MODEL is a local model directory, float or quantized (e.g. by optiq convert), or
    "bundled" / "bundled-quant". Default: the bundled model's OptiQ quant (mixed 3-8 bit,
    so by_bits ranks vary by layer), or the bundled float model when the quant is not
    installed. The model used is printed first.
    """
    import optiq.core  # noqa: F401  (OpenBLAS before MLX)
    from optiq.train.lora import LoraOptions, plan_lora, train_lora
    from optiq.train.progress import ProgressBar
    from optiq.train.trainer import TrainArgs

    if scale is not None and alpha is not None:
        raise click.UsageError("give either --scale or --alpha, not both")
    opts = LoraOptions(
        data=data,
        output=output,
        model=model,
        rank=rank,
        rank_scaling=rank_scaling,
        reference_bits=reference_bits,
        target_modules=target_modules,
        num_layers=num_layers,
        train_experts=train_experts,
        scale=scale,
        alpha=alpha,
        dropout=dropout,
        mask_prompt=mask_prompt,
        long_records=long_records,
        resume=resume,
        overwrite=overwrite,
        dry_run=dry_run,
        train=TrainArgs(
            iters=iters,
            batch_size=batch_size,
            learning_rate=learning_rate,
            max_seq_length=max_seq_length,
            val_batches=val_batches,
            steps_per_eval=steps_per_eval,
            steps_per_report=steps_per_report,
            save_every=save_every,
            grad_checkpoint=grad_checkpoint,
            seed=seed,
            compile=compile_,
        ),
    )
    if plan:
        if dry_run:
            raise click.UsageError("give either --plan or --dry-run")
        ceiling = plan_lora(opts, None if max_memory is None else max_memory * 1e9, echo=click.echo)
        for line in ceiling.lines()[2 + len(ceiling.rows):]:  # the rows were printed as measured
            click.echo(line)
        return
    if max_memory is not None:
        raise click.UsageError("--max-memory is for --plan")
    if data is None:
        raise click.UsageError("--data DIR is required (a directory with train.jsonl), except with --plan")
    result = train_lora(opts, echo=click.echo, reporter=ProgressBar(echo=click.echo, disable=quiet))
    if result is None:
        click.echo("dry run: nothing trained")
        return
    best = (f"best validation loss {result.best_val_loss:.4f} at step {result.best_step}"
            if result.best_val_loss is not None else "no validation set")
    click.echo(
        f"done: {result.steps} steps, {result.tokens_per_second:,.0f} tok/s, peak memory "
        f"{result.peak_memory / 1e9:.3f} GB, {best}\nadapter: {result.output_dir}"
    )


def _weights_file(best: bool) -> str:
    from optiq.train.adapters import ADAPTER_WEIGHTS
    from optiq.train.trainer import BEST_WEIGHTS

    return BEST_WEIGHTS if best else ADAPTER_WEIGHTS


@lora.command("export")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["peft", "mlx-lm"]), default="peft", show_default=True,
              help="peft: Hugging Face PEFT adapter; mlx-lm: one padded rank that stock mlx-lm loads.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
@click.option("--base-model", default=None, help="base_model_name_or_path to record (peft).")
@click.option("--layout", type=click.Choice(["causal-lm", "conditional-generation"]), default="causal-lm",
              show_default=True, help="Hugging Face module naming: *ForCausalLM or *ForConditionalGeneration.")
@click.option("--best", is_flag=True, help="Export best_adapters.safetensors instead of the last weights.")
def export_cmd(adapter, fmt, output, base_model, layout, best) -> None:
    """Export the adapter in ADAPTER (a directory written by optiq lora train)."""
    import optiq.core  # noqa: F401

    if fmt == "peft":
        from optiq.train.peft_export import export_peft

        cfg = export_peft(adapter, output, base_model=base_model, layout=layout,
                          weights_file=_weights_file(best))
        click.echo(
            f"PEFT adapter written to {output}: r={cfg['r']}, lora_alpha={cfg['lora_alpha']:g}, "
            f"{len(cfg['target_modules'])} modules, {len(cfg['rank_pattern'])} in rank_pattern"
        )
    else:
        if best:
            raise click.UsageError("--best is only for --format peft; fuse or copy best_adapters.safetensors")
        from optiq.train.adapters import export_mlx_lm

        cfg = export_mlx_lm(adapter, output)
        click.echo(f"mlx-lm adapter written to {output}: rank {cfg['lora_parameters']['rank']} "
                   "(smaller ranks zero-padded: same outputs)")


@lora.command("fuse")
@model_argument
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="Adapter directory.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Fused model directory.")
@click.option("--dequantize", is_flag=True, help="Write a float model (keeps the whole update).")
@click.option("--best", is_flag=True, help="Fuse best_adapters.safetensors instead of the last weights.")
def fuse_cmd(model, adapter, output, dequantize, best) -> None:
    """Merge ADAPTER into MODEL and save it to -o.

    MODEL defaults to the base model the adapter records; when that cannot be read here
    (moved, or trained on another machine) it is an error: give MODEL.
    """
    import optiq.core  # noqa: F401
    from optiq.train.fuse import fuse_adapter

    r = fuse_adapter(model, adapter, output, dequantize=dequantize, weights_file=_weights_file(best))
    click.echo(f"fused {r.modules} modules into {r.output}")
    if r.mean_update_error is not None:
        click.echo(
            f"re-quantized {r.requantized} modules: the fused update differs from the adapter's by "
            f"{100 * r.mean_update_error:.0f}% on average (worst module {100 * r.worst_update_error:.0f}%)"
        )
        if r.mean_update_error > 0.5:
            click.echo("warning: most of the update is lost in re-quantization: use --dequantize, "
                       "or serve the adapter unfused", err=True)
