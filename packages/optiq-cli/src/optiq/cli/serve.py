"""``optiq serve``: run the gRPC generation service (and, with ``--http-port``, the
OpenAI / Anthropic HTTP API on the same engine)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .options import model_argument


def parse_adapters(values: tuple[str, ...]) -> dict[str, Path]:
    """``NAME=DIR`` pairs; names are what clients may ask for (never paths)."""
    from optiq.core.errors import ConfigError

    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ConfigError(f"--adapter expects NAME=DIR, got '{v}'")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"adapter name '{name}' may use letters, digits, '-', '_', '.'")
        if name in out:
            raise ConfigError(f"adapter name '{name}' given twice")
        out[name] = Path(path).expanduser()
    return out


@click.command()
@model_argument
@click.option("--model", "model_opt", default=None, metavar="M",
              help="Model directory or cached Hugging Face id (same as MODEL; default: the bundled model).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback requires an API key.")
@click.option("--port", default=50051, show_default=True, type=int, help="0 picks a free port.")
@click.option("--http-port", type=int, default=None, metavar="PORT",
              help="Also serve the OpenAI (/v1/chat/completions, /v1/completions, /v1/models) "
                   "and Anthropic (/v1/messages) HTTP APIs on PORT, same engine, auth and TLS "
                   "(0 picks a free port) [off].")
@click.option("--max-context", type=int, default=None, metavar="N",
              help="Most tokens (prompt + output) per request [the model's context length].")
@click.option("--max-tokens", type=int, default=None,
              help="Default max_tokens per request [generation_config.json or 256].")
@click.option("--temp", "temperature", type=float, default=None,
              help="Default temperature [generation_config.json or 0 = greedy].")
@click.option("--top-p", type=float, default=None, help="Default top_p [generation_config.json or 1].")
@click.option("--max-concurrency", type=int, default=8, show_default=True,
              help="Requests decoded together in one batch.")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests waiting for a slot; beyond that clients get RESOURCE_EXHAUSTED.")
@click.option("--kv-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Mixed-precision KV-cache config (from `optiq kv-cache`).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="Register a LoRA adapter clients can select by NAME (repeatable).")
@click.option("--prompt-cache-bytes", default=None, metavar="SIZE",
              help="Memory for prompt prefixes kept across requests (e.g. 2GiB; 0: off) "
                   "[1/8 of memory].")
@click.option("--max-memory", "max_memory_gb", type=float, default=None, metavar="GB",
              help="Refuse to start when the estimated peak memory (weights as the compute path "
                   "holds them: fp32 floats on the CPU; cache; prefix cache) is over GB "
                   "[the memory available].")
@click.option("--api-key", envvar="OPTIQ_API_KEY", default=None,
              help="Bearer token required on every RPC except health [env OPTIQ_API_KEY].")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM certificate chain (with --tls-key) to serve TLS.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PEM private key.")
@click.option("--max-message-mb", type=float, default=16.0, show_default=True,
              help="Largest gRPC message accepted or sent.")
@click.option("--shutdown-grace", type=float, default=30.0, show_default=True,
              help="Seconds running requests may finish after SIGTERM.")
@click.option("-v", "--verbose", is_flag=True, help="Log requests and engine events.")
def serve(
    model: str | None,
    model_opt: str | None,
    host: str,
    port: int,
    http_port: int | None,
    max_context: int | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    max_concurrency: int,
    max_queue: int,
    kv_config: Path | None,
    adapters: tuple[str, ...],
    prompt_cache_bytes: str | None,
    max_memory_gb: float | None,
    api_key: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    max_message_mb: float,
    shutdown_grace: float,
    verbose: bool,
) -> None:
    """Serve MODEL over gRPC (optiq.v1.GenerationService, health, reflection), and over
    OpenAI / Anthropic-compatible HTTP with --http-port.

    Stops gracefully on SIGTERM / Ctrl-C: health turns NOT_SERVING, new requests are
    refused and running ones get --shutdown-grace seconds to finish.
    """
    from optiq.core.errors import ConfigError

    if model and model_opt and model != model_opt:
        raise ConfigError(f"two models given: {model} and --model {model_opt}")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    from optiq.runtime.config import ServeConfig, parse_bytes
    from optiq.runtime.server import serve as run

    config = ServeConfig(
        model=model or model_opt,
        host=host,
        port=port,
        http_port=http_port,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        max_tokens=max_tokens,
        max_context=max_context,
        temperature=temperature,
        top_p=top_p,
        kv_config=kv_config,
        adapters=parse_adapters(adapters),
        prompt_cache_bytes=parse_bytes(prompt_cache_bytes) if prompt_cache_bytes else None,
        max_memory_gb=max_memory_gb,
        api_key=api_key or None,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_message_bytes=int(max_message_mb * 1024 * 1024),
        shutdown_grace=shutdown_grace,
    )

    def ready(server) -> None:
        s = server.engine.summary
        scheme = "TLS" if tls_cert else "plaintext"
        auth = ", bearer auth" if config.api_key else ""
        from optiq.core.cpu import compute_summary, describe_compute

        http = f"; HTTP API on {server.http.url} (OpenAI, Anthropic)" if server.http else ""
        click.echo(
            f"optiq serve: listening on {server.address} ({scheme}{auth}){http}; model {s.model_id} "
            f"({s.architecture}, {s.quant_summary}); max concurrency {max_concurrency}; "
            f"compute: {describe_compute(compute_summary())}; memory: {server.footprint.describe()}",
            err=True,
        )
        sys.stderr.flush()

    run(config, on_ready=ready)
    click.echo("optiq serve: stopped", err=True)
    # Everything is drained and stopped. MLX used from a non-main thread can abort in its
    # C++ teardown at interpreter exit (ml-explore/mlx#3126), turning a clean stop into
    # SIGABRT; end the process here instead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
