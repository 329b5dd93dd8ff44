"""Prefix cache benchmark: TTFT per turn of a scripted chat and an agent loop, on
`optiq serve` with its prefix cache, without it, and on `mlx_lm.server`'s prompt cache.

    uv run python benchmarks/prefix_cache.py [--model M] [--prompt-cache-bytes SIZE]

Three servers run side by side on the same model: `optiq serve` (default prefix cache,
or ``--prompt-cache-bytes``), `optiq serve --prompt-cache-bytes 0`, and
``python -m mlx_lm server`` (its own LRU prompt cache, default flags; OpenAI HTTP API,
streaming). Every request of the script goes to the three in turn (rotating who goes
first), so machine noise hits all alike. Each request asks for one token at
temperature 0: TTFT is the time from sending it to the first streamed message (gRPC
delta / SSE ``data:`` chunk), seen by the client.

The script, deterministic text from optiq-core's bundled calibration set:

* chat: a short system prompt, then 10 user turns (a passage and a question each); the
  assistant replies in the history are the data set's (with their ``<think>`` blocks,
  which the template drops from earlier turns), so the history reaches > 2k tokens;
* agent: a system prompt with tool schemas and guidelines (> 1k tokens), then two
  sessions (different first user messages) of 6 steps each; every step appends an
  assistant tool call and its tool result.

Targets (issue 14): chat turn 10 TTFT >= 5x lower with the cache than without; agent
loop total TTFT <= 1.2x mlx_lm.server's; the cache's counted bytes within its budget.
Also printed: wall time of the run and the peak RSS of each server's process tree
(sampled every 0.1 s).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "packages/optiq-core/src/optiq/core/data/calibration.jsonl"
CHAT_TURNS = 10
AGENT_SESSIONS, AGENT_STEPS = 2, 6


# ------------------------------------------------------------------------ the script


def _rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def chat_script() -> list[list[dict]]:
    """The message list of each chat turn (turn t extends turn t-1 by the scripted
    assistant reply and the next user message)."""
    rows = _rows()
    prose = [r["text"] for r in rows if r["kind"] == "prose"]
    chats = [r["messages"] for r in rows if r["kind"] in ("chat", "chat-code", "chat-math")]
    msgs = [{"role": "system", "content": "You are a careful assistant. Answer briefly."}]
    turns = []
    for t in range(CHAT_TURNS):
        user = (f"Read this passage:\n\n{prose[2 * t]}\n\n{prose[2 * t + 1]}\n\n"
                f"{chats[t][0]['content']}")
        msgs = msgs + [{"role": "user", "content": user}]
        turns.append(msgs)
        msgs = msgs + [{"role": "assistant", "content": chats[t][1]["content"]}]
    return turns


def agent_script() -> list[list[dict]]:
    """The message list of each agent step, session after session."""
    import re

    rows = _rows()
    tool_rows = [r["messages"] for r in rows if r["kind"] == "tool"]
    schemas: list[str] = []
    for m in tool_rows:
        for s in re.findall(r'\{"name": .*\}', m[0]["content"]):
            if s not in schemas:
                schemas.append(s)
    prose = [r["text"] for r in rows if r["kind"] == "prose"]
    system = ("You are an assistant that can call tools. Available tools:\n<tools>\n"
              + "\n".join(schemas) + "\n</tools>\nTo call a tool, reply with <tool_call>"
              '{"name": ..., "arguments": {...}}</tool_call> and wait for the result.\n\n'
              "Background you may need:\n\n" + "\n\n".join(prose[-10:]))
    steps = []
    for s in range(AGENT_SESSIONS):
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": tool_rows[s][1]["content"]}]
        for j in range(AGENT_STEPS):
            ex = tool_rows[(s * AGENT_STEPS + j) % len(tool_rows)]
            msgs = msgs + [ex[2], ex[3]]  # assistant tool call, tool result
            steps.append(msgs)
    return steps


# --------------------------------------------------------------------------- servers


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


class PeakRSS:
    """Samples the process tree of ``pid`` every 0.1 s until stopped."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(0.1)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class Optiq:
    """`optiq serve` in a child process, reached over gRPC."""

    def __init__(self, name: str, model: Path, cache_args: list[str]):
        sys.path.insert(0, str(REPO / "tests"))
        from serving import ServerProcess  # the test suite's server harness

        from optiq.runtime.client import Client

        self.name = name
        self.srv = ServerProcess("--temp", "0", *cache_args, model=str(model)).start()
        self.client = Client(self.srv.target)
        self.client.wait_serving(300)
        self.rss = PeakRSS(self.srv.pid)

    def ttft(self, messages: list[dict]) -> tuple[float, int, int]:
        """(seconds to the first streamed message, prompt tokens, cached tokens)."""
        t0 = time.perf_counter()
        first, usage = None, None
        for r in self.client.generate(messages=messages, max_tokens=1, temperature=0.0):
            if first is None:
                first = time.perf_counter() - t0
            if r.HasField("finished"):
                usage = r.finished.usage
        return first, usage.prompt_tokens, usage.cached_tokens

    def close(self) -> None:
        self.client.close()
        self.srv.terminate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlxLmServer:
    """``python -m mlx_lm server`` (default prompt cache), reached over its OpenAI API."""

    def __init__(self, model: Path, log: Path):
        self.name = "mlx_lm.server"
        self.port = free_port()
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(self.port), "--temp", "0"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        give_up = time.monotonic() + 300
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"mlx_lm.server did not start; see {log}")
            time.sleep(0.2)
        self.rss = PeakRSS(self.proc.pid)

    def _healthy(self) -> bool:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            c.request("GET", "/health")
            ok = c.getresponse().status == 200
            c.close()
            return ok
        except OSError:
            return False

    def ttft(self, messages: list[dict]) -> tuple[float, int, int]:
        body = json.dumps({"messages": messages, "max_tokens": 1, "temperature": 0.0,
                           "stream": True, "stream_options": {"include_usage": True}})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = c.getresponse()
        first, prompt, cached = None, 0, 0
        while line := resp.readline():
            if not line.startswith(b"data:"):
                continue  # blank separators, ": keepalive" comments
            if first is None:
                first = time.perf_counter() - t0
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            usage = json.loads(data).get("usage")
            if usage:
                prompt = usage.get("prompt_tokens", 0)
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        c.close()
        return first, prompt, cached

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ----------------------------------------------------------------------------- run


def run_script(servers: list, script: list[list[dict]]) -> list[dict]:
    """One row per request: each server's (TTFT, prompt tokens, cached tokens)."""
    rows = []
    for i, msgs in enumerate(script):
        order = servers[i % len(servers):] + servers[:i % len(servers)]
        rows.append({s.name: s.ttft(msgs) for s in order})
    return rows


def print_rows(title: str, label: str, rows: list[dict], names: list[str]) -> None:
    print(f"\n{title}\n")
    head = " | ".join(f"{n} TTFT ms (cached/prompt)" for n in names)
    print(f"| {label} | {head} | no cache / cache | cache / mlx_lm |")
    print("|" + "---|" * (len(names) + 3))
    for i, r in enumerate(rows, 1):
        cells = " | ".join(f"{r[n][0] * 1e3:8.1f} ({r[n][2]}/{r[n][1]})" for n in names)
        print(f"| {i} | {cells} | {r[names[1]][0] / r[names[0]][0]:5.1f}x | "
              f"{r[names[0]][0] / r[names[2]][0]:5.2f}x |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: bundled)")
    ap.add_argument("--prompt-cache-bytes", default=None,
                    help="budget of the cached optiq server (default: its own default)")
    args = ap.parse_args(argv)

    import optiq.core  # noqa: F401  (OpenBLAS before MLX)
    from optiq.core.model_io import resolve_model_path

    t_start = time.perf_counter()
    model = resolve_model_path(args.model)
    chat, agent = chat_script(), agent_script()
    cache_args = (["--prompt-cache-bytes", args.prompt_cache_bytes]
                  if args.prompt_cache_bytes else [])
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "prefix_cache_mlx_lm_server.log"
    hot = Optiq("optiq cache", model, cache_args)
    servers = [hot]
    try:
        servers.append(Optiq("optiq no cache", model, ["--prompt-cache-bytes", "0"]))
        servers.append(MlxLmServer(model, log))
        names = [s.name for s in servers]
        warm = [{"role": "user", "content": "Hello, who are you?"}]
        for s in servers:  # JIT and first-request costs out of the measurement
            s.ttft(warm)
        chat_rows = run_script(servers, chat)
        agent_rows = run_script(servers, agent)
        load = hot.client.load()
        budget = hot.client.model_info().prompt_cache_max_bytes
    finally:
        peaks = {}
        for s in servers:
            peaks[s.name] = s.rss.stop() if hasattr(s, "rss") else 0
            s.close()
    wall = time.perf_counter() - t_start

    print(f"model {model.name}; chat: {CHAT_TURNS} turns, last prompt "
          f"{chat_rows[-1][names[0]][1]} tokens; agent: {AGENT_SESSIONS} sessions x "
          f"{AGENT_STEPS} steps, system prompt + tools "
          f"{_system_tokens(model, agent[0][0])} tokens; one token per request, "
          f"temperature 0")
    print_rows("Chat (TTFT per turn)", "turn", chat_rows, names)
    print_rows("Agent loop (TTFT per step; session 2 starts at step "
               f"{AGENT_STEPS + 1})", "step", agent_rows, names)

    last = chat_rows[-1]
    speedup = last[names[1]][0] / last[names[0]][0]
    total = {n: sum(r[n][0] for r in agent_rows) for n in names}
    vs_mlx = total[names[0]] / total[names[2]]
    print("\nagent loop total TTFT: " + ", ".join(f"{n} {total[n] * 1e3:.0f} ms" for n in names))
    print(f"prefix cache: {load.prompt_cache_hits}/{load.prompt_cache_lookups} hits, "
          f"{load.prompt_cache_tokens_total} tokens reused, {load.prompt_cache_entries} "
          f"entries, {load.prompt_cache_bytes / 2**20:.1f} MiB of {budget / 2**20:.0f} MiB, "
          f"{load.prompt_cache_evictions} evictions")
    print("\n| check | value | target | ok |\n|---|---|---|---|")
    checks = [
        ("chat turn 10: TTFT without / with cache", f"{speedup:.1f}x", ">= 5x", speedup >= 5),
        ("agent loop: TTFT optiq cache / mlx_lm.server", f"{vs_mlx:.2f}x", "<= 1.2x",
         vs_mlx <= 1.2),
        ("prefix cache bytes within budget", f"{load.prompt_cache_bytes / 2**20:.1f} MiB",
         f"<= {budget / 2**20:.0f} MiB", load.prompt_cache_bytes <= budget),
    ]
    for name, v, target, ok in checks:
        print(f"| {name} | {v} | {target} | {'yes' if ok else 'NO'} |")
    print("\n| server | peak RSS of process tree MiB |\n|---|---|")
    for n in names:
        print(f"| {n} | {peaks[n] / 2**20:.0f} |")
    print(f"\nwall time {wall:.1f} s (servers running side by side; cpus: {os.cpu_count()})")
    return 0


def _system_tokens(model: Path, system: dict) -> int:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model)
    return len(tok.apply_chat_template([system], tokenize=True))


if __name__ == "__main__":
    sys.exit(main())
