"""Server settings and request defaults (from generation_config.json and the CLI)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optiq.core.errors import ConfigError

API_KEY_ENV = "OPTIQ_API_KEY"
DEFAULT_PORT = 50051
DEFAULT_MAX_TOKENS = 256
# Requests larger than this are refused by gRPC itself (both directions, both sides).
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Defaults:
    """Values applied to unset request fields."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS


def read_generation_config(model_dir: Path) -> Defaults:
    """Defaults from ``generation_config.json`` (HF semantics: ``do_sample: false``
    means greedy); missing file or fields keep the built-in defaults."""
    f = model_dir / "generation_config.json"
    if not f.exists():
        return Defaults()
    try:
        g = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f} is not valid JSON: {e}") from None
    d = Defaults()
    kw: dict[str, Any] = {}
    for key, cast in (
        ("temperature", float),
        ("top_p", float),
        ("top_k", int),
        ("min_p", float),
        ("repetition_penalty", float),
    ):
        if isinstance(g.get(key), (int, float)) and not isinstance(g.get(key), bool):
            kw[key] = cast(g[key])
    if isinstance(g.get("max_new_tokens"), int) and g["max_new_tokens"] > 0:
        kw["max_tokens"] = g["max_new_tokens"]
    if g.get("do_sample") is False:
        kw["temperature"] = 0.0
    return replace(d, **kw)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    model: str | Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    # OpenAI / Anthropic HTTP front on this port (None: off; 0: a free port)
    http_port: int | None = None
    max_concurrency: int = 8
    max_queue: int = 64
    max_tokens: int | None = None  # None: generation_config / built-in default
    max_context: int | None = None  # cap on prompt + output tokens (None: the model's)
    temperature: float | None = None
    top_p: float | None = None
    kv_config: Path | None = None
    adapters: dict[str, Path] = field(default_factory=dict)
    api_key: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    shutdown_grace: float = 30.0
    prefill_step_size: int = 512
    # Prefix-cache budget in bytes (None: a fraction of memory; 0: no prefix cache).
    prompt_cache_bytes: int | None = None
    # Cap on the server's estimated peak memory (None: the memory available at start).
    max_memory_gb: float | None = None

    def check(self) -> None:
        """Refuse unsafe or inconsistent settings before anything is loaded."""
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(
                f"binding {self.host} exposes the server beyond this machine: set an API key "
                f"(--api-key or ${API_KEY_ENV}) or bind 127.0.0.1"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        for f in (self.tls_cert, self.tls_key, self.kv_config):
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"{f} does not exist or is not a file")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} out of range 0-65535")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ConfigError(f"--http-port {self.http_port} out of range 0-65535")
        if self.http_port and self.http_port == self.port:
            raise ConfigError(f"--http-port {self.http_port} is also the gRPC --port: pick another")
        if self.max_concurrency < 1:
            raise ConfigError("--max-concurrency must be at least 1")
        if self.max_queue < 0:
            raise ConfigError("--max-queue must be >= 0")
        if self.max_context is not None and self.max_context < 2:
            raise ConfigError("--max-context must be at least 2 (one prompt + one new token)")
        if self.prompt_cache_bytes is not None and self.prompt_cache_bytes < 0:
            raise ConfigError("--prompt-cache-bytes must be >= 0 (0 turns the prefix cache off)")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise ConfigError("--max-memory must be a positive number of GB")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("--max-tokens must be at least 1")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError("--temp must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1]")
        for name, d in self.adapters.items():
            if not Path(d).is_dir():
                raise ConfigError(f"adapter '{name}': {d} is not a directory")

    def prompt_cache_budget(self) -> int | None:
        """The prefix cache's bytes: as given, else its default share of ``max_memory_gb``
        when that is set, else None (the engine's default share of the machine's memory)."""
        if self.prompt_cache_bytes is not None or self.max_memory_gb is None:
            return self.prompt_cache_bytes
        from .prefix_cache import DEFAULT_FRACTION

        return int(self.max_memory_gb * (1 << 30) * DEFAULT_FRACTION)

    def defaults(self, model_dir: Path) -> Defaults:
        d = read_generation_config(model_dir)
        kw: dict[str, Any] = {}
        if self.max_tokens is not None:
            kw["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        if self.top_p is not None:
            kw["top_p"] = self.top_p
        return replace(d, **kw)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
          "tb": 1000**4, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1.5g"``, ``"0"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ConfigError(f"'{text}' is not a size (examples: 0, 512MiB, 2GB, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None
