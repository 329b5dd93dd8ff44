"""The mlx-lm peer of ``optiq eval QUANT --reference MODEL``: what an mlx-lm user writes.

``mlx_lm.perplexity`` cannot be the peer: its ``--data-path`` is a Hugging Face dataset
(records sampled at random, not a local text's consecutive windows) and it scores one
model, no KL. So, as a user would: ``mlx_lm.load`` both models, ``model(inputs)`` per
window, cross-entropy and KL from the full logits. Stock mlx-lm on the CPU computes in
bf16 at 1-2 GFLOP/s, so only the first ``--tokens`` positions are scored (a prefix of
the first window: what a causal model predicts there does not depend on the rest); the
script prints the seconds per token to extrapolate from (the cost per token of these
short windows is the projections', nearly constant).

    python benchmarks/eval_mlx_lm.py QUANT MODEL TEXT [--seq-len 256] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("quant")
    ap.add_argument("reference")
    ap.add_argument("text")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64, help="score this many positions (whole windows, then a prefix)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = load(args.quant)
    ref, _ = load(args.reference)
    ids = tok.encode(open(args.text).read())
    w = args.seq_len + 1
    n = min(-(-args.tokens // args.seq_len), len(ids) // w)
    data = mx.array(ids[: n * w]).reshape(n, w)
    t1 = time.perf_counter()
    nll, ref_nll, kl = [], [], []
    tokens = 0
    for i in range(n):  # one window at a time: a window's full logits are 0.25 GB per model
        k = min(args.seq_len, args.tokens - tokens)
        x, y = data[i : i + 1, :k], data[i : i + 1, 1 : k + 1]
        tokens += k
        z = model(x).astype(mx.float32)
        r = ref(x).astype(mx.float32)
        lz, lr = z - mx.logsumexp(z, -1, keepdims=True), r - mx.logsumexp(r, -1, keepdims=True)
        nll.append(nn.losses.cross_entropy(z, y, reduction="none").reshape(-1))
        ref_nll.append(nn.losses.cross_entropy(r, y, reduction="none").reshape(-1))
        kl.append((mx.exp(lr) * (lr - lz)).sum(-1).reshape(-1))
        mx.eval(nll[-1], ref_nll[-1], kl[-1])
    t2 = time.perf_counter()
    print(json.dumps({
        "tokens": tokens,
        "perplexity": math.exp(mx.concatenate(nll).mean().item()),
        "reference_perplexity": math.exp(mx.concatenate(ref_nll).mean().item()),
        "mean_kl": mx.concatenate(kl).mean().item(),
        "load_s": t1 - t0,
        "score_s": t2 - t1,
        "s_per_token": (t2 - t1) / tokens,
    }))


if __name__ == "__main__":
    main()
