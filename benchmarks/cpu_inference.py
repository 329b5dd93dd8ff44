"""Prefill and decode speed on the CPU: stock mlx-lm vs OptiQ's CPU layer path.

Rows: fp32 and 4-bit (group 64) versions of one model, each run through the same
``mlx_lm.stream_generate`` loop. "stock" is what ``mlx_lm.load`` (+ ``quantize_model``)
gives: the checkpoint's dtype (bf16 for the bundled model) and MLX's quantized matmul
for every input. "optiq" is ``optiq.core.cpu.prepare_for_cpu``: fp32 compute, and
dequantize + BLAS GEMM for multi-row inputs. OpenBLAS is preloaded for every row
(import optiq.core first), so the comparison isolates the layer path.

    uv run python benchmarks/cpu_inference.py [--model DIR] [--prompt-tokens 1024] [--gen-tokens 128]
"""

from __future__ import annotations

import argparse
import copy

import optiq.core  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load, quantize_model

from optiq.core.blas import loaded_openblas
from optiq.core.cpu import cast_floats, swap_quantized_layers
from optiq.core.model_io import validate_model_dir


def build(path, bits: int | None, optiq_path: bool):
    model, tok = load(str(path))
    config = {}
    if optiq_path:
        cast_floats(model, mx.float32)  # quantize from fp32 so scales are fp32 too
    if bits:
        quantize_model(model, config, group_size=64, bits=bits)
    if optiq_path:
        swap_quantized_layers(model)
    mx.eval(model.parameters())
    return model, tok


def run(model, tok, prompt_ids: list[int], gen_tokens: int):
    last = None
    tokens = []
    for resp in stream_generate(model, tok, prompt_ids, max_tokens=gen_tokens, sampler=make_sampler(0.0)):
        last = resp
        tokens.append(resp.token)
    return last.prompt_tps, last.generation_tps, tokens


def logits(model, ids: list[int]) -> mx.array:
    out = model(mx.array(ids)[None]).astype(mx.float32)
    mx.eval(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()
    path, _ = validate_model_dir(args.model)
    print(f"model: {path}\nOpenBLAS: {loaded_openblas() or 'not found (reference BLAS)'}")
    print(f"device: {mx.default_device()}; prompt {args.prompt_tokens} tokens, {args.gen_tokens} decoded (greedy)\n")

    rows = []
    for bits in (None, 4):
        results = {}
        for name, optiq_path in (("stock", False), ("optiq", True)):
            model, tok = build(path, bits, optiq_path)
            vocab = model.args.text_config["vocab_size"] if hasattr(model.args, "text_config") else tok.vocab_size
            ids = [(i * 7919 + 13) % (vocab - 10) + 5 for i in range(args.prompt_tokens)]
            run(model, tok, ids[:64], 4)  # warm-up (JIT, caches)
            pre, dec, toks = run(model, tok, ids, args.gen_tokens)
            results[name] = (pre, dec, toks, logits(model, ids[:256]))
        label = "fp32" if bits is None else f"{bits}-bit"
        s, o = results["stock"], results["optiq"]
        diff = float(mx.abs(s[3] - o[3]).max())
        agree = sum(a == b for a, b in zip(s[2], o[2])) / max(len(s[2]), 1)
        rows.append((label, s[0], o[0], s[1], o[1], diff, agree))

    hdr = f"{'weights':<8} {'prefill stock':>14} {'prefill optiq':>14} {'ratio':>6} {'decode stock':>13} {'decode optiq':>13} {'ratio':>6} {'max|dlogit|':>12} {'greedy agree':>13}"
    print(hdr)
    print("-" * len(hdr))
    for label, ps, po, ds, do, diff, agree in rows:
        print(f"{label:<8} {ps:>10.0f} t/s {po:>10.0f} t/s {po / ps:>5.1f}x {ds:>9.1f} t/s {do:>9.1f} t/s {do / ds:>5.1f}x {diff:>12.4f} {agree:>12.0%}")
    print("\nstock = mlx_lm.load (+quantize_model) as is; optiq = fp32 + dequantize/GEMM for multi-row inputs.")
    print("max|dlogit| compares the two paths' logits on 256 prompt tokens (stock runs in the checkpoint dtype).")


if __name__ == "__main__":
    main()
