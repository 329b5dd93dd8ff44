"""Time one request against a real ``optiq serve``: prefill seconds and decode tok/s.

Starts ``optiq serve MODEL`` (a child process: its memory counts in the caller's
process tree), waits for its ready line, sends one raw-text request over gRPC with
``ignore_eos`` (random-weight models emit EOS at random), then stops the server. Prints
the server's ready line and one JSON line with what the request's usage reported:

    {"prefill_s": 14.2, "decode_tok_s": 6.1, "prompt_tokens": 256, "completion_tokens": 64, ...}

``prefill_s`` is the time to the first token (the prompt's prefill and one sampling
step); ``decode_tok_s`` counts the tokens after the first over the time after it.

    uv run python benchmarks/serve_once.py MODEL --prompt-file p.txt --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prompt-file", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("serve_args", nargs="*", help="more `optiq serve` flags (after --)")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "optiq.cli.main", "serve", args.model, "--port", "0",
           "--max-concurrency", "1", *args.serve_args]
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

        client = Client(f"127.0.0.1:{port}")
        final = None
        for r in client.generate(prompt=args.prompt_file.read_text(), max_tokens=args.max_tokens,
                                 ignore_eos=True, temperature=0.0):
            if r.HasField("finished"):
                final = r.finished
        client.close()
        u = final.usage
        decoded = u.completion_tokens - 1
        print(json.dumps(dict(
            prefill_s=round(u.time_to_first_token_ms / 1e3, 3),
            decode_tok_s=round(decoded / (u.decode_time_ms / 1e3), 3) if u.decode_time_ms else None,
            prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
            ready_s=round(ready_s, 1), error=final.error or None,
        )), flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
