"""``optiq eval``: perplexity, KL against a reference model, GSM8K-style accuracy."""

from __future__ import annotations

import json

import click

from .options import model_argument


@click.command("eval")
@model_argument
@click.option("--reference", type=click.Path(), default=None,
              help="Reference model (e.g. the full-precision source) for mean KL.")
@click.option("--data", type=click.Path(), default=None,
              help="Text file (.txt) or jsonl of text/messages records (default: bundled held-out text).")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-tokens", type=int, default=None, help="Score at most this many tokens.")
@click.option("--kv-config", type=click.Path(), default=None,
              help="kv_config.json from `optiq kv-cache`: score through that mixed-precision KV cache "
                   "(without --reference, KL is against the same model with full-precision KV).")
@click.option("--gsm8k", "gsm8k", default=None, metavar="FILE|bundled",
              help="Also score a GSM8K-style jsonl of {question, answer} ('bundled': the small sample).")
@click.option("--gsm8k-limit", type=int, default=None, help="Score only the first N problems.")
@click.option("--gen-tokens", type=int, default=256, show_default=True, help="Max tokens generated per problem.")
@click.option("--thinking/--no-thinking", default=False, show_default=True,
              help="Let the model think (<think> blocks are stripped before scoring).")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def eval_cmd(model, reference, data, seq_len, max_tokens, kv_config, gsm8k, gsm8k_limit, gen_tokens, thinking, as_json) -> None:
    """Evaluate MODEL: perplexity (and mean KL vs --reference) on local text; GSM8K accuracy."""
    from optiq.core.evaluate import evaluate_model

    kv = make_cache = None
    if kv_config is not None:  # schema-checked before any model work
        from optiq.core.kv import kv_cache_factory, load_kv_config

        kv = load_kv_config(kv_config)
        make_cache = kv_cache_factory(kv)
    problems = None
    if gsm8k is not None:  # validate the file before any model work
        from optiq.core.gsm8k import load_problems

        problems = load_problems(None if gsm8k == "bundled" else gsm8k, limit=gsm8k_limit)

    rep = evaluate_model(
        model, reference=reference, data=data, seq_len=seq_len, max_tokens=max_tokens, make_cache=make_cache,
        log=None if as_json else (lambda s: click.echo(s, err=True)),
    )
    out = {
        "model": str(rep.model),
        "data": rep.data,
        "seq_len": rep.seq_len,
        "tokens": rep.perplexity.tokens,
        "perplexity": rep.perplexity.ppl,
    }
    if kv is not None:
        out.update(kv_config=str(kv_config), kv_bits=kv.achieved_bits)
    if rep.kl is not None:
        out.update(
            reference=str(rep.reference) + (f" ({rep.reference_cache})" if rep.reference_cache else ""),
            reference_perplexity=rep.kl.ref_ppl,
            mean_kl=rep.kl.mean_kl,
            p95_kl=rep.kl.p95_kl,
            max_kl=rep.kl.max_kl,
        )
    if problems is not None:
        from optiq.core.gsm8k import run_gsm8k

        from optiq.core.model_io import load_model

        lm = rep.loaded or load_model(rep.model)  # the streamed eval loads nothing whole
        if kv is not None:  # mlx-lm generation builds its caches with model.make_cache()
            from optiq.core.kv import apply_kv_config

            apply_kv_config(lm.model, kv)
        res = run_gsm8k(lm.model, lm.tokenizer, problems, max_tokens=gen_tokens, enable_thinking=thinking)
        out["gsm8k"] = {"accuracy": res.accuracy, "correct": res.correct, "total": res.total}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"model:       {out['model']}")
    click.echo(f"data:        {out['data']} ({out['tokens']} tokens, windows of {seq_len})")
    if kv is not None:
        click.echo(f"kv cache:    {out['kv_config']} (mean {out['kv_bits']:.2f} bits per stored K/V element)")
    click.echo(f"perplexity:  {out['perplexity']:.4f}")
    if rep.kl is not None:
        click.echo(f"reference:   {out['reference']} (perplexity {out['reference_perplexity']:.4f})")
        click.echo(f"mean KL:     {out['mean_kl']:.6f} nats/token (p95 {out['p95_kl']:.5f}, max {out['max_kl']:.4f})")
    if "gsm8k" in out:
        g = out["gsm8k"]
        click.echo(f"gsm8k:       {g['correct']}/{g['total']} correct ({100 * g['accuracy']:.1f}%)")
