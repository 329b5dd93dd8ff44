"""Run ``optiq serve`` in a child process (integration tests, benchmarks/serve.py).

Lives with the tests, not in optiq-runtime: it starts the CLI (``python -m
optiq.cli.main``), which the runtime package does not depend on.

    with ServerProcess("--max-concurrency", "4") as srv:
        client = Client(srv.target)

The server binds a free loopback port (``--port 0``) and the port is read from its
"listening on" line; with ``--http-port`` the HTTP API's address is read from the same
line (``srv.http_url``, e.g. ``http://127.0.0.1:PORT``). No MLX is imported in the
calling process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_HTTP = re.compile(r"HTTP API on (https?)://(\S+):(\d+)")
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # a wildcard bind is reached via loopback
# Only a hang guard for waits on events: never reached on a merely slow machine.
HANG_S = 300.0


def wait_until(predicate: Any, what: str, hang_s: float = HANG_S) -> Any:
    """Poll ``predicate()`` until it returns something truthy and return that.

    Tests wait on states the server reports (GetLoad, health), never on a fixed time;
    ``hang_s`` only turns a real hang into a failure that says what never happened.
    """
    give_up = time.monotonic() + hang_s
    while not (value := predicate()):
        if time.monotonic() > give_up:
            raise AssertionError(f"after {hang_s:.0f} s still waiting for {what}")
        time.sleep(0.02)
    return value


class ServerProcess:
    def __init__(self, *args: str, model: str | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 180.0):
        self.args = list(args)
        self.model = model
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.http_url: str | None = None
        self.log: list[str] = []
        self._listening = threading.Event()

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m and not self._listening.is_set():
                host = m.group(1).strip("[]")
                self.host = _WILDCARD.get(host, host)
                self.port = int(m.group(2))
                h = _HTTP.search(line)
                if h:
                    hh = _WILDCARD.get(h.group(2).strip("[]"), h.group(2).strip("[]"))
                    hh = f"[{hh}]" if ":" in hh else hh
                    self.http_url = f"{h.group(1)}://{hh}:{h.group(3)}"
                self._listening.set()

    def start(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "optiq.cli.main", "serve"]
        if self.model:
            cmd.append(str(self.model))
        if "--port" not in self.args:
            cmd += ["--port", "0"]
        cmd += self.args
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=self.env,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    "optiq serve did not start:\n" + "\n".join(self.log[-40:])
                )
        return self

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain) and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        try:
            self.terminate(timeout=30)
        except Exception:
            self.kill()


# ---------------------------------------------------------------------------- soak traffic


def soak(client: Any, n: int = 500, concurrency: int = 8, seed: int = 0,
         context_length: int | None = None) -> dict[str, int]:
    """Send ``n`` mixed requests from ``concurrency`` threads: short generations with
    varied sampling, client cancels, tight deadlines, malformed requests and unary
    calls. Returns how each kind ended; raises if any ended unexpectedly."""
    import random
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    rng = random.Random(seed)
    ctx = context_length or client.model_info().context_length
    words = "the a cat dog ran sat on mat and then slept happily in sun".split()
    expected_invalid = grpc.StatusCode.INVALID_ARGUMENT

    def prompt() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))

    plans = []
    for i in range(n):
        r = rng.random()
        if r < 0.60:
            plans.append(("generate", dict(prompt=prompt(), max_tokens=rng.randint(1, 6),
                                           temperature=rng.choice([0.0, 0.7, 1.0]),
                                           top_p=rng.choice([None, 0.9]),
                                           top_k=rng.choice([None, 20]),
                                           seed=rng.choice([None, i]),
                                           logprobs=rng.random() < 0.2,
                                           stop=rng.choice([[], ["the"]]))))
        elif r < 0.70:
            plans.append(("chat", dict(messages=[{"role": "user", "content": prompt()}],
                                       enable_thinking=rng.random() < 0.5,
                                       max_tokens=rng.randint(1, 6))))
        elif r < 0.80:
            plans.append(("cancel", dict(prompt=prompt(), max_tokens=10_000, ignore_eos=True)))
        elif r < 0.85:
            plans.append(("deadline", dict(prompt=prompt(), max_tokens=10_000, ignore_eos=True)))
        elif r < 0.95:
            bad = rng.choice([
                dict(),
                dict(prompt="x", max_tokens=0),
                dict(prompt="x", messages=[{"role": "user", "content": "x"}]),
                dict(prompt="x", adapter="missing"),
                dict(token_ids=[1] * ctx),
                dict(prompt="x", temperature=-1.0),
            ])
            plans.append(("invalid", bad))
        else:
            plans.append(("unary", {}))

    def run(plan: tuple[str, dict]) -> str:
        kind, kw = plan
        try:
            if kind == "unary":
                client.tokenize("the cat sat")
                client.model_info()
                return "unary"
            if kind == "cancel":
                call = client.generate(**kw)
                next(call)
                call.cancel()
                return "cancelled"
            if kind == "deadline":
                try:
                    for _ in client.generate(timeout=0.05, **kw):
                        pass
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        return "deadline"
                    raise
                raise AssertionError("a 50 ms deadline did not expire")
            final = None
            for r in client.generate(**kw):
                if r.HasField("finished"):
                    final = r.finished
            if final is None:
                raise AssertionError("stream ended without a final event")
            return "invalid-accepted" if kind == "invalid" else "ok"
        except grpc.RpcError as e:
            if kind == "invalid" and e.code() == expected_invalid:
                return "invalid"
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "rejected"
            raise AssertionError(f"{kind} {kw}: {e.code()} {e.details()}") from None

    with ThreadPoolExecutor(concurrency) as ex:
        outcomes = Counter(ex.map(run, plans))
    return dict(outcomes)
