"""Serving benchmark: `optiq serve` over gRPC and HTTP/SSE vs in-process mlx-lm.

    uv run python benchmarks/serve.py [--model M] [--max-tokens 128] [--concurrency 1,4,8]
    uv run python benchmarks/serve.py --soak 500          # + mixed-traffic soak

For each concurrency level c, rounds of c fixed-length requests (``ignore_eos``)
start together; in-process, gRPC and HTTP rounds alternate so machine noise hits all
alike. HTTP rows stream ``/v1/completions`` (SSE, same prompt and settings as gRPC) from
the same server (``--http-port``), read by a plain ``http.client`` reader so the
client's own cost stays small. Reported per level (medians over requests and rounds):

* TTFT: request sent -> first token received (client side), median; the TTFT
  overhead check uses a separate probe: alternating in-process / gRPC / HTTP 2-token
  requests, median of the paired differences;
* TPOT / ITL: mean time per output token after the first (per stream), median over
  requests; ITL p50 is the median gap between consecutive messages;
* stream tok/s: output tokens per second of one stream (1 / TPOT);
* total tok/s: all output tokens / wall time of the level.

The baseline runs in this process with no gRPC: ``mlx_lm.stream_generate`` (the stock
single-stream path) at concurrency 1, and mlx-lm's ``BatchGenerator`` (the engine the
server uses, without the service around it) at higher concurrency. Targets (issue 5):
stream tok/s at c=1 >= 95% of in-process; TTFT overhead <= 10 ms; total tok/s at c=8
>= 3x the c=1 stream. Issue 13: HTTP stream tok/s >= 0.9x gRPC at every level; HTTP
TTFT overhead over gRPC (both to the first text) <= 15 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import optiq.core  # noqa: F401  (OpenBLAS before MLX)

PROMPT = (
    "Once upon a time there was a little cat who lived in a small house near the river. "
    "Every morning the cat"
)


class InProcess:
    """The baselines, on one model loaded in this process (OptiQ CPU path applied)."""

    def __init__(self, model_dir: Path):
        from optiq.core.model_io import load_model

        self.lm = load_model(model_dir)
        self.lm.tokenizer.eos_token_ids = set()  # fixed-length runs, like ignore_eos

    def single(self, prompt_ids: list[int], max_tokens: int) -> dict:
        """Stock mlx-lm single stream (``stream_generate``)."""
        from mlx_lm.generate import stream_generate

        t0 = time.perf_counter()
        times = []
        for _ in stream_generate(self.lm.model, self.lm.tokenizer, prompt_ids,
                                 max_tokens=max_tokens):
            times.append(time.perf_counter())
        return {"t0": t0, "end": times[-1], "ttft": times[0] - t0, "n": len(times),
                "tpot": (times[-1] - times[0]) / (len(times) - 1),
                "gaps": [b - a for a, b in zip(times, times[1:])]}

    def batch(self, prompt_ids: list[int], max_tokens: int, conc: int) -> list[dict]:
        """mlx-lm ``BatchGenerator`` with ``conc`` streams started together."""
        from mlx_lm.generate import BatchGenerator

        bg = BatchGenerator(self.lm.model, completion_batch_size=conc,
                            prefill_batch_size=min(conc, 8))
        t0 = time.perf_counter()
        bg.insert([list(prompt_ids)] * conc, max_tokens=[max_tokens] * conc)
        times: dict[int, list[float]] = {}
        done = 0
        while done < conc:
            _, rs = bg.next()
            now = time.perf_counter()
            for r in rs:
                times.setdefault(r.uid, []).append(now)
                done += r.finish_reason is not None
        bg.close()
        return [{"t0": t0, "end": t[-1], "ttft": t[0] - t0, "n": len(t),
                 "tpot": (t[-1] - t[0]) / (len(t) - 1),
                 "gaps": [b - a for a, b in zip(t, t[1:])]} for t in times.values()]


def grpc_round(client, max_tokens: int, conc: int) -> list[dict]:
    """``conc`` streams started together over gRPC; one record per request."""
    records: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(conc)

    def worker():
        barrier.wait()
        t0 = time.perf_counter()
        arrivals = []
        for r in client.generate(prompt=PROMPT, max_tokens=max_tokens, ignore_eos=True,
                                 temperature=0.0):
            if r.HasField("delta") and r.delta.token_ids:
                arrivals.append((time.perf_counter(), len(r.delta.token_ids)))
        n = sum(k for _, k in arrivals)
        first, last = arrivals[0][0], arrivals[-1][0]
        with lock:
            records.append({"t0": t0, "end": last, "ttft": first - t0, "n": n,
                            "tpot": (last - first) / max(n - 1, 1),
                            "gaps": [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]})

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


class SSE:
    """A lean client of ``/v1/completions`` streaming: one keep-alive connection."""

    def __init__(self, url: str, model: str):
        u = urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
        self.model = model

    def stream(self, max_tokens: int) -> tuple[float, list[float], int]:
        """(t0, arrival time of each chunk with text, completion tokens from usage)."""
        body = json.dumps({"model": self.model, "prompt": PROMPT, "max_tokens": max_tokens,
                           "temperature": 0.0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}})
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = self.conn.getresponse()
        arrivals, n = [], 0
        while line := resp.readline():
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
        resp.read()
        return t0, arrivals, n

    def close(self) -> None:
        self.conn.close()


def http_round(url: str, model: str, max_tokens: int, conc: int) -> list[dict]:
    """``conc`` SSE streams started together; one record per request."""
    records: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(conc)

    def worker():
        c = SSE(url, model)
        barrier.wait()
        t0, arrivals, n = c.stream(max_tokens)
        c.close()
        first, last = arrivals[0], arrivals[-1]
        with lock:
            records.append({"t0": t0, "end": last, "ttft": first - t0, "n": n,
                            "tpot": (last - first) / max(n - 1, 1),
                            "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])]})

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def ttft_probe(base_model: "InProcess", client, sse: SSE, prompt_ids: list[int], n: int
               ) -> list[tuple[float, float, float, float]]:
    """Per round of ``n`` alternating short requests: in-process time to first token,
    gRPC time to the first delta and to the first delta with text, HTTP time to the
    first chunk with text. (SSE chunks carry text only; mlx-lm's BPE detokenizer
    releases a word when the next one starts, so text comes a token after the ids.)"""
    out = []
    for _ in range(n + 1):
        a = base_model.single(prompt_ids, 2)["ttft"]
        t0 = time.perf_counter()
        first = first_text = None
        for r in client.generate(prompt=PROMPT, max_tokens=2, ignore_eos=True, temperature=0.0):
            if not r.HasField("delta"):
                continue
            now = time.perf_counter() - t0
            first = first if first is not None else now
            if first_text is None and r.delta.text:
                first_text = now
        h0, arrivals, _ = sse.stream(2)
        out.append((a, first, first_text if first_text is not None else first, arrivals[0] - h0))
    return out[1:]  # the first round warms up


def summarize(rounds: list[list[dict]]) -> dict:
    """Medians over requests; total tok/s = median over rounds of tokens / round wall."""
    recs = [r for rnd in rounds for r in rnd]
    tpot = statistics.median(r["tpot"] for r in recs)
    gaps = [g for r in recs for g in r["gaps"]]
    totals = [sum(r["n"] for r in rnd) / (max(r["end"] for r in rnd) - min(r["t0"] for r in rnd))
              for rnd in rounds]
    return {
        "ttft": statistics.median(r["ttft"] for r in recs),
        "tpot": tpot,
        "itl": statistics.median(gaps),
        "stream_tps": 1 / tpot,
        "total_tps": statistics.median(totals),
    }


def fmt_row(name: str, conc: int, m: dict) -> str:
    return (f"| {name:<28} | {conc:>3} | {m['ttft'] * 1e3:8.1f} | {m['tpot'] * 1e3:8.2f} | "
            f"{m['itl'] * 1e3:8.2f} | {m['stream_tps']:8.1f} | {m['total_tps']:9.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: bundled)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--requests", type=int, default=5, help="measured rounds per level")
    ap.add_argument("--ttft-probes", type=int, default=20, help="alternating TTFT pairs")
    ap.add_argument("--soak", type=int, default=0, help="also run N mixed soak requests")
    args = ap.parse_args(argv)

    from optiq.core.model_io import resolve_model_path
    from optiq.runtime.client import Client
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from serving import ServerProcess, soak  # the test suite's server harness

    model_dir = resolve_model_path(args.model)
    levels = [int(x) for x in args.concurrency.split(",")]
    max_c = max(levels)
    base_model = InProcess(model_dir)
    prompt_ids = base_model.lm.tokenizer.encode(PROMPT)
    print(f"model {model_dir.name}, prompt {len(prompt_ids)} tokens, {args.max_tokens} output "
          f"tokens per request, {args.requests} rounds per level (in-process and gRPC "
          f"rounds interleaved)\n")

    base: dict[int, dict] = {}
    served: dict[int, dict] = {}
    over_http: dict[int, dict] = {}
    soak_result = None
    with ServerProcess("--max-concurrency", str(max_c), "--temp", "0", "--http-port", "0",
                       model=str(model_dir)) as srv:
        client = Client(srv.target)
        client.wait_serving(120)
        model_id = client.model_info().model_id
        for c in levels:
            b_rounds, s_rounds, h_rounds = [], [], []
            for i in range(args.requests + 1):  # round 0 warms all up
                b = ([base_model.single(prompt_ids, args.max_tokens)] if c == 1
                     else base_model.batch(prompt_ids, args.max_tokens, c))
                s_ = grpc_round(client, args.max_tokens, c)
                h = http_round(srv.http_url, model_id, args.max_tokens, c)
                if i:
                    b_rounds.append(b)
                    s_rounds.append(s_)
                    h_rounds.append(h)
            base[c], served[c] = summarize(b_rounds), summarize(s_rounds)
            over_http[c] = summarize(h_rounds)
        sse = SSE(srv.http_url, model_id)
        probes = ttft_probe(base_model, client, sse, prompt_ids, args.ttft_probes)
        sse.close()
        if args.soak:
            soak(client, n=min(100, args.soak), concurrency=8, seed=1)
            rss0 = srv.rss_bytes()
            t0 = time.perf_counter()
            outcomes = soak(client, n=args.soak, concurrency=8, seed=2)
            soak_result = (outcomes, time.perf_counter() - t0, rss0, srv.rss_bytes(),
                           client.health(), client.load())
        client.close()

    print("| path                         |   c | TTFT ms  | TPOT ms  | ITL ms   | stream/s | total tok/s |")
    print("|------------------------------|-----|----------|----------|----------|----------|-----------|")
    for c in levels:
        label = "in-process stream_generate" if c == 1 else "in-process BatchGenerator"
        print(fmt_row(label, c, base[c]))
        print(fmt_row("optiq serve (gRPC)", c, served[c]))
        print(fmt_row("optiq serve (HTTP SSE)", c, over_http[c]))

    def ms(values) -> str:
        values = list(values)
        return f"median {statistics.median(values) * 1e3:.1f} ms (min {min(values) * 1e3:.1f})"

    overhead = statistics.median(g - a for a, g, _, _ in probes) * 1e3
    overhead_h = statistics.median(h - gt for _, _, gt, h in probes) * 1e3
    print(f"\nTTFT probe ({len(probes)} alternating 2-token requests, prompt {len(prompt_ids)} "
          f"tokens): in-process {ms(p[0] for p in probes)}; gRPC first delta "
          f"{ms(p[1] for p in probes)}, first text {ms(p[2] for p in probes)}; HTTP first text "
          f"{ms(p[3] for p in probes)}. Median paired difference: gRPC - in-process "
          f"{overhead:+.1f} ms; HTTP - gRPC (first text) {overhead_h:+.1f} ms")
    print("(the HTTP rows' TTFT is to the first chunk with text, the gRPC rows' to the first "
          "delta: about one token apart)")

    s1, b1 = served[1], base[1]
    checks = [
        ("stream tok/s at c=1 vs in-process", s1["stream_tps"] / b1["stream_tps"], ">= 0.95",
         s1["stream_tps"] / b1["stream_tps"] >= 0.95),
        ("TTFT overhead at c=1 (ms)", overhead, "<= 10", overhead <= 10),
    ]
    if max_c >= 8 and 8 in served:
        r = served[8]["total_tps"] / s1["stream_tps"]
        checks.append(("total tok/s at c=8 / c=1 stream", r, ">= 3", r >= 3))
    for c in levels:
        r = over_http[c]["stream_tps"] / served[c]["stream_tps"]
        checks.append((f"HTTP / gRPC stream tok/s at c={c}", r, ">= 0.9", r >= 0.9))
    checks.append(("HTTP TTFT over gRPC at c=1 (ms)", overhead_h, "<= 15", overhead_h <= 15))
    print("\n| check                              |   value | target  | ok  |")
    print("|------------------------------------|---------|---------|-----|")
    for name, v, target, ok in checks:
        print(f"| {name:<34} | {v:7.2f} | {target:<7} | {'yes' if ok else 'NO':<3} |")

    if soak_result:
        outcomes, secs, rss0, rss1, health, load = soak_result
        print(f"\nsoak: {args.soak} requests at concurrency 8 in {secs:.1f} s: {outcomes}")
        print(f"server RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB "
              f"({(rss1 - rss0) / 2**20:+.1f}); health {'SERVING' if health == 1 else health}; "
              f"active {load.active_requests}, queued {load.queued_requests}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
