"""optiq-kernels against what MLX does on the CPU without them, one operation at a time.

Rows (4-bit unless --bits, groups of 64, one decode step's inputs):
  matmul      x [1, K] @ W.T, W [N, K]: fp32 BLAS GEMV (W unquantized) vs MLX's
              ``quantized_matmul`` vs ``optiq.kernels.quantized_matmul``
  moe         one token through top-k of E experts [N, K]: MLX's ``gather_qmm`` vs
              ``optiq.kernels.gather_quantized_matmul``
  attention   decode attention over L cached positions (1 KV head, 2 query rows,
              head_dim 64): ``mx.fast.scaled_dot_product_attention`` on an fp32 cache vs
              OptiQ's pure-MLX packed-code path vs ``optiq.kernels.quantized_decode_attention``

Each cell is the median of --repeat timed calls (``mx.eval`` per call), the rows' calls
interleaved round by round; ratios are against the first column of each row.

    uv run python benchmarks/cpu_kernels.py [--bits 4] [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import optiq.core  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx

from optiq.core.cpu import kernels, pure_mlx
from optiq.core.kv import MixedKVCache
from optiq.core.kv.attention import quantized_attention


def time_interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved."""
    for f in fns.values():  # warm up
        for _ in range(5):
            mx.eval(f())
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, f in fns.items():
            tic = time.perf_counter()
            mx.eval(f())
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_row(N: int, K: int, bits: int, k):
    w_full = 0.02 * mx.random.normal((N, K), key=mx.random.key(0))
    w, s, b = mx.quantize(w_full, group_size=64, bits=bits)
    x = mx.random.normal((1, K), key=mx.random.key(1))
    mx.eval(w_full, w, s, b, x)
    return f"matmul {N}x{K}", {
        "fp32 GEMV": lambda: x @ w_full.T,
        "MLX quantized": lambda: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=bits),
        "optiq.kernels": lambda: k.quantized_matmul(x, w, s, b, bits=bits, group_size=64),
    }


def moe_row(E: int, top: int, N: int, K: int, bits: int, k):
    w, s, b = mx.quantize(0.02 * mx.random.normal((E, N, K), key=mx.random.key(2)), group_size=64, bits=bits)
    x = mx.random.normal((1, 1, 1, 1, K), key=mx.random.key(3))
    idx = mx.array([[list(range(0, E, E // top))[:top]]], dtype=mx.uint32)
    xb = mx.broadcast_to(x, (1, 1, top, 1, K)).reshape(top, 1, K)
    mx.eval(w, s, b, x, idx, xb)
    return f"moe top-{top}/{E} {N}x{K}", {
        "MLX gather_qmm": lambda: mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=bits),
        "optiq.kernels": lambda: k.gather_quantized_matmul(xb, w, s, b, idx.reshape(top), bits=bits, group_size=64),
    }


def attention_row(L: int, bits: int):
    keys, values = (mx.random.normal((1, 1, L, 64), key=mx.random.key(i)) for i in (4, 5))
    cache = MixedKVCache(bits, bits, 64, rotation="none")
    cache.update_and_fetch(keys, values)
    q = mx.random.normal((1, 2, 1, 64), key=mx.random.key(6))
    mx.eval(keys, values, q, *cache.keys, *cache.values)

    def pure():
        with pure_mlx():
            return quantized_attention(q, cache, 0.125, None)

    return f"attention L={L}", {
        "fp32 SDPA": lambda: mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.125),
        "MLX packed": pure,
        "optiq.kernels": lambda: quantized_attention(q, cache, 0.125, None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    k = kernels()
    if k is None or mx.default_device() != mx.cpu:
        raise SystemExit("optiq.kernels is not loaded (or MLX's default device is not the CPU): nothing to compare")
    print(f"optiq.kernels: {k.threads()} threads; {args.bits}-bit, groups of 64; median of {args.repeat} calls\n")
    rows = [
        matmul_row(1024, 1024, args.bits, k),
        matmul_row(4096, 1024, args.bits, k),
        matmul_row(2048, 2048, args.bits, k),
        moe_row(64, 8, 768, 2048, args.bits, k),
        attention_row(1024, args.bits),
        attention_row(8192, args.bits),
    ]
    print(f"{'operation':<28} {'baseline':<16} {'us':>8}   {'others (us, x baseline speed)'}")
    print("-" * 96)
    for name, fns in rows:
        t = time_interleaved(fns, args.repeat)
        base_name, *others = fns
        cells = "   ".join(f"{o} {t[o] * 1e6:.0f} ({t[base_name] / t[o]:.2f}x)" for o in others)
        print(f"{name:<28} {base_name:<16} {t[base_name] * 1e6:>8.0f}   {cells}")


if __name__ == "__main__":
    main()
