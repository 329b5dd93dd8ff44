"""Sensitivity-pass time: OptiQ vs ``mlx_lm.quant.dynamic_quant`` on the same tokens.

    uv run python benchmarks/sensitivity_speed.py [--model DIR] [--n 8] [--seq-len 256] [--repeat 3]

Both get the same calibration tokens (the bundled calibration set, tokenized by the
model's tokenizer) and the same model. ``dynamic_quant`` runs as a user would run it
(``mlx_lm.load``: bf16 weights) and, for fairness, also on an fp32 copy; it looks at two
widths (``--bits``, default 4,8). OptiQ's pass is timed from the loaded model to the
finished sensitivity table, exactly as ``optiq convert`` runs it
(``optiq.core.quant.measure.sensitivity_pass``): for ``fisher`` (the default) one
forward+backward pass per batch that records the reference (layer outputs, Hessians,
reference distribution) and the probe gradients, RTN weight errors of every layer at
every width, the second-order estimate, and measured passes for the layers whose
estimate is large; for ``measured``, the reference pass and one forward pass per layer
and width (GPTQ-rounded). Rows ``optiq-fisher`` (same two widths as dynamic_quant) and
``optiq-fisher@3/4/5/6/8`` (convert's default five widths) are both shown. Each row runs
in a fresh process, in turn, ``--repeat`` rounds (default 3; the median time is
reported), so the machine's load hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optiq.core  # noqa: F401  (OpenBLAS preload before mlx)


def _tokens(model_path, n, seq_len):
    from mlx_lm.utils import load

    from optiq.core.calibration import build_calibration

    _, tok = load(str(model_path), lazy=True)
    return build_calibration(tok, None, n, seq_len).tokens


def run_one(kind: str, model_path: str, n: int, seq_len: int, bits: str) -> dict:
    import mlx.core as mx

    tokens = _tokens(model_path, n, seq_len)
    candidate = tuple(int(b) for b in bits.split(","))
    if kind.startswith("dynamic_quant"):
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities
        from mlx_lm.utils import load

        from optiq.core.cpu import cast_floats

        model, _ = load(model_path)
        if kind.endswith("fp32"):
            cast_floats(model, mx.float32)
        mx.random.seed(0)
        t0 = time.perf_counter()
        estimate_sensitivities(model, mx.array(tokens), candidate[0], 64, candidate[-1], 64)
        return {"seconds": time.perf_counter() - t0}

    from optiq.core.cpu import cast_floats
    from optiq.core.model_io import load_model
    from optiq.core.quant.measure import sensitivity_pass
    from optiq.core.quant.targets import find_targets

    lm = load_model(model_path, fast_cpu=False)
    model = lm.model
    cast_floats(model, mx.float32)
    targets = [t for t in find_targets(model, 64) if t.quantizable]
    passes = []
    estimator = "measured" if kind == "optiq-measured" else "fisher"
    t0 = time.perf_counter()
    sensitivity_pass(
        model, tokens, targets, candidate, mx.bfloat16, "gptq", estimator=estimator,
        on_pass=lambda p, b: passes.append(p),
    )
    return {"seconds": time.perf_counter() - t0, "passes": len(passes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: bundled)")
    ap.add_argument("--n", type=int, default=8, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process runs per row; the median is reported")
    ap.add_argument("--bits", default="4,8", help="low,high bit widths (dynamic_quant uses two)")
    ap.add_argument("--rows", default="dynamic_quant,dynamic_quant-fp32,optiq-fisher,optiq-fisher@3/4/5/6/8,optiq-measured",
                    help="comma-separated; KIND@B1/B2/... overrides --bits for one row")
    ap.add_argument("--llama", type=int, default=None, metavar="HIDDEN",
                    help="instead: a random-weight bf16 Llama-style model with this hidden size "
                         "(4 layers, MLP 3x hidden, vocab 2048): a matmul-bound shape")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    from optiq.core.model_io import resolve_model_path

    tmp = None
    if args.llama and not args.one:
        import tempfile

        from optiq.core.tiny_models import make_random_llama

        tmp = tempfile.mkdtemp(prefix="optiq-speed-")
        make_random_llama(Path(tmp) / "llama", args.llama)
        args.model = str(Path(tmp) / "llama")
    model = str(resolve_model_path(args.model))
    if args.one:
        print(json.dumps(run_one(args.one, model, args.n, args.seq_len, args.bits)))
        return
    rows: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    for rnd in range(args.repeat):  # rounds interleave the rows: load hits every row alike
        for row in args.rows.split(","):
            kind, _, bits = row.partition("@")
            bits = bits.replace("/", ",") or args.bits
            cmd = [sys.executable, __file__, "--one", kind, "--model", model, "--n", str(args.n),
                   "--seq-len", str(args.seq_len), "--bits", bits]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{row} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            times.setdefault(row, []).append(r["seconds"])
            rows[row] = {**r, "bits": bits, "seconds": statistics.median(times[row])}
            print(f"  round {rnd + 1}: {row}: {r['seconds']:.1f}s", file=sys.stderr)
    base = rows.get("dynamic_quant", next(iter(rows.values())))["seconds"]
    toks = args.n * args.seq_len
    print(f"\nSensitivity pass on {model} ({toks} calibration tokens: {args.n} x {args.seq_len}; "
          f"median of {args.repeat} fresh-process runs per row)")
    print(f"{'method':<20} {'bits':<10} {'seconds':>8} {'vs dynamic_quant':>17}  notes")
    for row, r in rows.items():
        note = f"{r['passes']} measured forward passes" if "passes" in r else ""
        print(f"{row.partition('@')[0]:<20} {r['bits']:<10} {r['seconds']:>8.1f} {base / r['seconds']:>16.2f}x  {note}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
