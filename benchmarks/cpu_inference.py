"""Prefill and decode speed on the CPU: stock mlx-lm vs OptiQ's CPU layer path.

Rows: float and 4-bit (group 64) versions of one model, each run through the same
``mlx_lm.stream_generate`` loop. "stock" is what ``mlx_lm.load`` (+ ``quantize_model``)
gives: the checkpoint's dtype (bf16 for the bundled model) and MLX's quantized matmul
for every input. "optiq" is ``optiq.core.cpu.prepare_for_cpu``: fp32 compute,
dequantize + BLAS GEMM for multi-row inputs, and ``optiq-kernels``' quantized matmul
for a few rows (decode) when it is installed; "optiq, pure MLX" is the same without
``optiq.kernels`` (MLX's quantized matmul for a few rows). OpenBLAS is preloaded for
every row (import optiq.core first), so the comparison isolates the layer path.
``--llama HIDDEN`` runs a random-weight Llama of that width instead (4 layers; the
bundled model is only 128 wide, so its decode is dominated by per-op overhead, not by
the weight matrices).

    uv run python benchmarks/cpu_inference.py [--model DIR | --llama 1024] [--prompt-tokens 1024] [--gen-tokens 128]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import optiq.core  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load, quantize_model

from optiq.core.blas import loaded_openblas
from optiq.core.cpu import cast_floats, kernels, pure_mlx, swap_quantized_layers
from optiq.core.model_io import validate_model_dir
from optiq.core.tiny_models import make_random_llama


PATHS = (
    # name, cast to fp32 before quantizing, swap in OptiQ's CPU layers, use optiq.kernels
    ("stock mlx-lm", False, False, False),
    ("stock, fp32 cast", True, False, False),
    ("optiq", True, True, True),
    ("optiq, pure MLX", True, True, False),
)


def build(path, bits: int | None, fp32: bool, swap: bool):
    model, tok = load(str(path))
    if fp32:
        cast_floats(model, mx.float32)  # quantize from fp32 so scales are fp32 too
    if bits:
        quantize_model(model, {}, group_size=64, bits=bits)
    if swap:
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
    ap.add_argument("--llama", type=int, default=None, metavar="HIDDEN", help="random-weight Llama of this width")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()
    if args.llama:
        args.model = str(make_random_llama(Path(tempfile.mkdtemp(prefix="optiq-cpu-")) / "llama", args.llama))
    path, config = validate_model_dir(args.model)
    print(f"model: {path}\nOpenBLAS: {loaded_openblas() or 'not found (reference BLAS)'}")
    k = kernels()
    print(f"optiq.kernels: {f'loaded, {k.threads()} threads' if k else 'not installed'}")
    print(f"device: {mx.default_device()}; prompt {args.prompt_tokens} tokens, {args.gen_tokens} decoded (greedy)\n")
    heldout = path / "heldout.txt"

    rows = []
    for bits in (None, 4):
        results = {}
        for name, fp32, swap, use_kernels in PATHS:
            if swap and not use_kernels and k is None:
                continue  # without optiq.kernels "optiq" already is the pure-MLX path
            with contextlib.nullcontext() if use_kernels else pure_mlx():
                model, tok = build(path, bits, fp32, swap)
                text = heldout.read_text() if heldout.exists() else "The quick brown fox. " * 400
                ids = (tok.encode(text) * 8)[: args.prompt_tokens]
                run(model, tok, ids[:64], 4)  # warm-up (JIT, caches)
                pre, dec, toks = run(model, tok, ids, args.gen_tokens)
                results[name] = (pre, dec, toks, logits(model, ids[:256]))
        label = "float" if bits is None else f"{bits}-bit"
        base = results["stock mlx-lm"]
        same_math = results["stock, fp32 cast"]
        for name, (pre, dec, toks, lg) in results.items():
            diff = float(mx.abs(lg - same_math[3]).max())
            agree = sum(a == b for a, b in zip(toks, same_math[2])) / max(len(toks), 1)
            rows.append((label, name, pre, pre / base[0], dec, dec / base[1], diff, agree))

    hdr = f"{'weights':<8} {'path':<17} {'prefill tok/s':>13} {'x stock':>8} {'decode tok/s':>13} {'x stock':>8} {'max|dlogit|':>12} {'greedy =':>9}"
    print(hdr)
    print("-" * len(hdr))
    for label, name, pre, rp, dec, rd, diff, agree in rows:
        print(f"{label:<8} {name:<17} {pre:>13.0f} {rp:>7.1f}x {dec:>13.1f} {rd:>7.1f}x {diff:>12.2e} {agree:>9.0%}")
    dtype = config.get("torch_dtype") or config.get("dtype") or "checkpoint dtype"
    print(f"\nstock mlx-lm = mlx_lm.load (+ quantize_model) as is ({dtype} weights/activations/scales);")
    print("stock, fp32 cast = same model cast to fp32 first, MLX's own kernels; optiq = fp32 + dequantize/GEMM for >= 6 rows")
    print("and optiq.kernels' quantized matmul for fewer (decode); optiq, pure MLX = the same with MLX's quantized matmul.")
    print("max|dlogit| and 'greedy =' compare each row with 'stock, fp32 cast' (same math): logits on 256 held-out tokens,")
    print("and the share of identical greedy tokens.")


if __name__ == "__main__":
    main()
