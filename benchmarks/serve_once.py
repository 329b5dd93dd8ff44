"""Time requests against a real ``optiq serve``: prefill seconds and decode tok/s.

Starts ``optiq serve MODEL`` (a child process: its memory counts in the caller's
process tree), waits for its ready line, sends one raw-text request over gRPC with
``ignore_eos`` (random-weight models emit EOS at random), then stops the server. Prints
the server's ready line and one JSON line with what the request's usage reported:

    {"prefill_s": 14.2, "decode_tok_s": 6.1, "prompt_tokens": 256, "completion_tokens": 64, ...}

``prefill_s`` is the time to the first token (the prompt's prefill and one sampling
step); ``decode_tok_s`` counts the tokens after the first over the time after it.
With ``--concurrency N``, N identical requests are sent at once (the server batches
them: ``--max-concurrency N``) and the line gives the slowest request's ``prefill_s``
and the aggregate ``decode_tok_s``: all requests' tokens after their first, over the
time from the last first token to the last final message.

    uv run python benchmarks/serve_once.py MODEL --prompt-file p.txt --max-tokens 64
    uv run python benchmarks/serve_once.py MODEL --prompt-file p.txt --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt-file", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=1, help="requests sent at once")
    ap.add_argument("serve_args", nargs="*", help="more `optiq serve` flags (after --)")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "optiq.cli.main", "serve", args.model, "--port", "0",
           "--max-concurrency", str(args.concurrency), *args.serve_args]
    t0 = time.monotonic()
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        port = None
        for line in server.stderr:
            sys.stderr.write(line)
            m = re.search(r"listening on \S+:(\d+) ", line)
            if m:
                port = int(m.group(1))
                print(line.strip(), flush=True)
                break
        if port is None:
            sys.exit(f"optiq serve exited before it was ready (exit {server.wait()})")
        ready_s = time.monotonic() - t0
        from optiq.runtime.client import Client

        results = run_requests(Client, f"127.0.0.1:{port}", args)
        errors = [u.error for u, _, _ in results if u.error]
        usage = [u.usage for u, _, _ in results]
        firsts = [t for _, t, _ in results]
        ends = [t for _, _, t in results]
        decoded = sum(u.completion_tokens - 1 for u in usage)
        if args.concurrency == 1:
            u = usage[0]
            prefill_s = u.time_to_first_token_ms / 1e3
            decode_s = u.decode_time_ms / 1e3
        else:
            prefill_s = max(u.time_to_first_token_ms for u in usage) / 1e3
            decode_s = max(ends) - max(firsts)
        print(json.dumps(dict(
            prefill_s=round(prefill_s, 3),
            decode_tok_s=round(decoded / decode_s, 3) if decode_s > 0 else None,
            prompt_tokens=usage[0].prompt_tokens, completion_tokens=usage[0].completion_tokens,
            concurrency=args.concurrency, ready_s=round(ready_s, 1), error="; ".join(errors) or None,
        )), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def run_requests(client_cls, target: str, args) -> list[tuple]:
    """Send ``args.concurrency`` identical requests at once; for each, its final message
    and the monotonic times of its first token and of its final message."""
    results: list = [None] * args.concurrency
    prompt = args.prompt_file.read_text()

    def one(i: int) -> None:
        client = client_cls(target)
        first = None
        for r in client.generate(prompt=prompt, max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0):
            if first is None and r.HasField("delta"):
                first = time.monotonic()
            if r.HasField("finished"):
                results[i] = (r.finished, first, time.monotonic())
        client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        sys.exit(f"requests {missing} ended without a final message")
    return results


if __name__ == "__main__":
    main()
