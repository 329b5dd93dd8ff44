"""KV cache memory, quality and decode speed: full-precision KV vs mlx-lm's uniform
``kv_bits`` vs OptiQ's mixed-precision KV config, at several context lengths.

For each context length N the same text is prefilled (chunks of 2048 tokens, as mlx-lm
does), then continuation tokens are decoded teacher-forced (the true next token is fed,
so every row sees identical inputs): the KL is averaged over the first K (512) decoded
positions, the speed timed step by step over T (64) of them in every round.

Rows:
  fp32 KV      stock ``KVCache``. On the CPU OptiQ runs the model in fp32, so keys and
               values arrive (and are stored) in fp32: this is the speed baseline.
               The *memory* reference is fp16 storage of the same K/V ("fp16 bytes"),
               i.e. what an fp16/bf16 model's KVCache holds on a GPU.
  mlx kv8/kv4  stock ``QuantizedKVCache`` via mlx-lm's own policy (``kv_bits``,
               ``kv_group_size=64``, ``quantized_kv_start=0``: the cache is converted
               after the first prefill chunk). Its scales are stored in the compute
               dtype (fp32 here).
  optiq <cfg>  ``MixedKVCache`` from a kv_config.json (quantized from the first token,
               fp16 scales, Hadamard-rotated K/V), with OptiQ's packed-code decode
               attention: the ``optiq-kernels`` CPU kernel when it is installed.
  ... no-rot   the first config without the rotation (same bits and bytes).
  ... MLX      the first config decoded without ``optiq.kernels`` (pure-MLX attention).

Columns: KV bytes/token and total at N (measured from the cache arrays, allocation
slack excluded), ratio to fp16 KV, mean KL(fp32 KV || row) over the K decoded
positions, and decode tok/s = 1 / median step time over R rounds, the rows' steps
interleaved one by one so that load from other processes on a shared machine hits
every row alike.

    uv run python benchmarks/kv_cache.py [--model DIR] [--contexts 1024,4096,8192]
        [--decode-tokens 64] [--kl-tokens 512] [--rounds 3] [--kv-config PATH ...] [--target-bits 4.5,5.5]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import optiq.core  # noqa: F401  (OpenBLAS preload: must come before any mlx import)
import mlx.core as mx
import numpy as np
from mlx import nn
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from optiq.core.kv import kv_layout, load_kv_config, make_kv_cache
from optiq.core.cpu import kernels as cpu_kernels
from optiq.core.cpu import pure_mlx
from optiq.core.kv.allocate import allocate_kv_bits
from optiq.core.kv.cache import MixedKVCache
from optiq.core.kv.config import KVConfig
from optiq.core.kv.layers import base_cache
from optiq.core.kv.pipeline import run_kv_cache
from optiq.core.model_io import load_model, resolve_model_path
from optiq.core.calibration import BUNDLED_CALIBRATION, load_records, render_record

PREFILL_STEP = 2048


def fast_prefill():
    from optiq.core.kv.pipeline import _fast_prefill

    return _fast_prefill()


def kv_bytes(cache: list) -> int:
    """Bytes holding the cached positions of the KV layers (step-allocation slack excluded)."""
    total = 0
    for c in cache:
        if isinstance(c, MixedKVCache):
            total += c.stored_nbytes()
        elif isinstance(c, (KVCache, QuantizedKVCache)) and c.keys is not None:
            arrays = [c.keys, c.values] if isinstance(c, KVCache) else [*c.keys, *c.values]
            total += sum(a.nbytes // a.shape[2] * c.offset for a in arrays)
    return total


def prefill(model, cache: list, ids: list[int], kv_bits: int | None) -> None:
    for s in range(0, len(ids), PREFILL_STEP):
        model(mx.array(ids[s : s + PREFILL_STEP])[None], cache=cache)
        if kv_bits:
            maybe_quantize_kv_cache(cache, 0, 64, kv_bits)
        mx.eval([c.state for c in cache])


def decode_interleaved(model, caches: dict[str, list], ids: list[int], pure: set[str]) -> tuple[dict, dict]:
    """Teacher-forced decode of ``ids`` through every cache, one step of each in turn.

    Interleaving step by step exposes every row equally to load from other processes;
    returns each row's logits and per-step times. Rows named in ``pure`` decode without
    ``optiq.kernels``."""
    logits = {name: [] for name in caches}
    times = {name: [] for name in caches}
    for t in ids:
        for name, cache in caches.items():
            tic = time.perf_counter()
            with pure_mlx() if name in pure else contextlib.nullcontext():
                out = model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)
                mx.eval(out)
            times[name].append(time.perf_counter() - tic)
            logits[name].append(out)
    return logits, times


def mean_kl(ref: list[mx.array], out: list[mx.array]) -> float:
    r = nn.log_softmax(mx.stack(ref), axis=-1)
    o = nn.log_softmax(mx.stack(out), axis=-1)
    per_token = mx.maximum((mx.exp(r) * (r - o)).sum(-1), 0)  # fp32 rounding can dip below 0
    return float(per_token.mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir (default: bundled)")
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--decode-tokens", type=int, default=64, help="timed decode steps per round")
    ap.add_argument("--kl-tokens", type=int, default=512,
                    help="decode steps the KL is averaged over (first round only; per-token KL is heavy-tailed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-config", action="append", default=[], help="extra kv_config.json to compare")
    ap.add_argument("--only-sensitivity", action="store_true", help="time the sensitivity pass and stop")
    ap.add_argument("--target-bits", default="4.5,5.5",
                    help="comma-separated; the first is the one the targets are checked for, the others are "
                         "allocated from the same sensitivity pass for comparison")
    ap.add_argument("--candidate-bits", default="4,8")
    ap.add_argument("--data", default=None,
                    help="text for the prompts (default: the model's heldout.txt, then the bundled calibration "
                         "records, so long contexts need no repetition)")
    ap.add_argument("--calibration", default=None, help="calibration data for the sensitivity pass (--data of optiq kv-cache)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    T = args.decode_tokens
    K = max(args.kl_tokens, T)  # the first round decodes K tokens: KL over all of them, timing over T

    targets = [float(t) for t in args.target_bits.split(",")]

    # 1) The sensitivity pass itself (timed), with the CLI's defaults.
    tmp = Path(tempfile.mkdtemp(prefix="optiq-kv-bench-"))
    run = run_kv_cache(args.model, tmp, target_bits=targets[0], candidate_bits=args.candidate_bits,
                       data=args.calibration)
    sens_s, sens_only_s = run.seconds, run.sensitivity.seconds
    configs = {f"optiq {targets[0]:g}b": run.config}
    for t in targets[1:]:
        alloc = allocate_kv_bits(run.sensitivity, run.config.model, t)
        configs[f"optiq {t:g}b"] = KVConfig(model=run.config.model, group_size=run.config.group_size,
                                            layers=alloc.bits, target_bits=t, rotation=run.config.rotation)
    for p in args.kv_config:
        c = load_kv_config(p)
        configs[f"optiq {Path(p).parent.name or p}"] = c

    if args.only_sensitivity:
        print(f"sensitivity pass: {sens_only_s:.1f} s measuring, {sens_s:.1f} s end to end")
        return
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    layout = kv_layout(model)
    configs[next(iter(configs))] = load_kv_config(run.files["config"], model)  # the file, validated
    fp16_per_token = layout.fp16_bytes_per_token()
    text_file = Path(args.data) if args.data else resolve_model_path(args.model) / "heldout.txt"
    ids = tok.encode(text_file.read_text())
    need = max(contexts) + K
    source = text_file.name
    if len(ids) < need and not args.data:
        for rec in load_records(BUNDLED_CALIBRATION):
            ids += tok.encode(render_record(rec, tok))
        source += f" + {BUNDLED_CALIBRATION.name}"
    if len(ids) < need:
        reps = -(-need // len(ids))
        print(f"note: the prompt text has {len(ids)} tokens; repeating it {reps}x to fill {need} tokens")
        ids = ids * reps
    ids = ids[:need]

    print(f"model: {lm.path} ({layout.describe()}); device {mx.default_device()}; prompt text: {source}")
    k = cpu_kernels()
    print(f"optiq.kernels: {f'loaded, {k.threads()} threads' if k else 'not installed: pure-MLX decode attention'}; "
          f"KV rotation of the optiq rows: {next(iter(configs.values())).rotation}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})")
    print(f"sensitivity pass (optiq kv-cache, defaults: {run.sensitivity.n_samples} x {run.sensitivity.seq_len} "
          f"tokens, candidates {args.candidate_bits}, target {targets[0]:g}): "
          f"{sens_only_s:.1f} s measuring ({run.sensitivity.cpu_seconds:.1f} CPU s), "
          f"{sens_s:.1f} s end to end (load, allocate, verify, write)")
    for name, c in configs.items():
        bits = ", ".join(f"L{i}: K{kb}/V{vb}" for i, (kb, vb) in sorted(c.layers.items()))
        print(f"  {name}: {bits}; achieved {c.achieved_bits:.3f} stored bits/element")
    print()

    rows = [("fp32 KV", None, None), ("mlx kv8", 8, None), ("mlx kv4", 4, None)]
    rows += [(name, None, c) for name, c in configs.items()]
    main_name, main_c = next(iter(configs.items()))
    if main_c.rotation != "none":  # the same bits without the Hadamard rotation: what it buys
        rows.append((f"{main_name} no-rot", None, dataclasses.replace(main_c, rotation="none")))
    pure = set()
    if cpu_kernels() is not None and mx.default_device() == mx.cpu:  # the same cache without optiq.kernels
        pure.add(f"{main_name} MLX")
        rows.append((f"{main_name} MLX", None, main_c))
    results = []
    hdr = (f"{'context':>7}  {'cache':<18} {'KV B/token':>10} {'KV total':>10} {'vs fp16':>8} "
           f"{'KL vs fp32 KV':>14} {'decode tok/s':>12}")
    print(hdr)
    print("-" * len(hdr))
    for n in contexts:
        prompt, cont = ids[:n], ids[n : n + K]
        states = {}
        with fast_prefill():
            for name, kv_bits, cfg in rows:
                cache = make_kv_cache(model, cfg) if cfg is not None else base_cache(model)
                prefill(model, cache, prompt, kv_bits)
                states[name] = cache
        logits, step_times = None, {name: [] for name, _, _ in rows}
        for r in range(args.rounds):
            caches = {name: copy.deepcopy(states[name]) for name, _, _ in rows}
            out, times = decode_interleaved(model, caches, cont if r == 0 else cont[:T], pure)
            logits = logits or out
            for name in times:
                step_times[name] += times[name][2:T]  # first steps warm up
        speed = {name: 1.0 / float(np.median(ts)) for name, ts in step_times.items()}
        for name, _, _ in rows:
            b = kv_bytes(states[name])  # after prefill: n tokens
            per_tok = b / n
            kl = 0.0 if name == "fp32 KV" else mean_kl(logits["fp32 KV"], logits[name])
            results.append({
                "context": n, "cache": name, "kv_bytes_per_token": per_tok, "kv_bytes_total": b,
                "ratio_vs_fp16": per_tok / fp16_per_token, "kl_vs_fp32_kv": kl, "decode_tok_s": speed[name],
            })
            print(f"{n:>7}  {name:<18} {per_tok:>10.1f} {b / 2**20:>8.2f}MB {per_tok / fp16_per_token:>7.1%} "
                  f"{kl:>14.2e} {speed[name]:>12.1f}")
        print(f"{'':>7}  {'(fp16 KV ref)':<18} {fp16_per_token:>10.1f} {fp16_per_token * n / 2**20:>8.2f}MB {1:>7.1%}")
    print()
    print(f"load average at end: {os.getloadavg()[0]:.1f} (decode speeds are only comparable on a quiet machine)")
    longest = max(contexts)
    by = {(r["context"], r["cache"]): r for r in results}
    main_cfg = next(iter(configs))
    m, base, u4 = by[(longest, main_cfg)], by[(longest, "fp32 KV")], by[(longest, "mlx kv4")]
    print(f"targets at {targets[0]:g} bits ({main_cfg}, context {longest}):")
    print(f"  KV memory <= 30% of fp16: {m['ratio_vs_fp16']:.1%} -> {'met' if m['ratio_vs_fp16'] <= 0.30 else 'NOT met'}")
    worst = max(by[(n, main_cfg)]["kl_vs_fp32_kv"] - by[(n, "mlx kv4")]["kl_vs_fp32_kv"] for n in contexts)
    print(f"  KL <= uniform 4-bit (mlx kv4) at every context: "
          f"{'met' if worst <= 0 else 'NOT met'} (at {longest}: {m['kl_vs_fp32_kv']:.2e} vs {u4['kl_vs_fp32_kv']:.2e})")
    ratio = m["decode_tok_s"] / base["decode_tok_s"]
    print(f"  decode tok/s >= fp32 KV baseline at {longest}: {m['decode_tok_s']:.1f} vs {base['decode_tok_s']:.1f} "
          f"({ratio:.2f}x) -> {'met' if ratio >= 1 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sensitivity_seconds": sens_only_s, "end_to_end_seconds": sens_s,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
