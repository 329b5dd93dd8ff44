"""Runs the HTTP app with uvicorn on its own thread and event loop, beside gRPC."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

from optiq.core.errors import ConfigError

from ..config import Defaults, ServeConfig
from ..engine import Engine
from .app import build_app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a busy port is a ConfigError at start and
    port 0 resolves before anyone asks for it."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets that
    # say so, and with Nagle on, each small SSE write waits for a delayed ACK (~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen for HTTP on {host}:{port}: {e.strerror or e}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class HttpFront:
    """``--http-port``: the OpenAI / Anthropic HTTP API of one engine."""

    def __init__(self, engine: Engine, defaults: Defaults, config: ServeConfig):
        import uvicorn

        self.config = config
        self.tls = config.tls_cert is not None
        self._sock = _bind(config.host, config.http_port or 0)
        self.port: int = self._sock.getsockname()[1]
        app = build_app(engine, defaults, config.api_key, config.max_message_bytes)
        self._server = uvicorn.Server(uvicorn.Config(
            app,
            log_level="warning" if not logging.getLogger("optiq.runtime").isEnabledFor(
                logging.INFO) else "info",
            access_log=False,
            lifespan="off",
            ssl_certfile=str(Path(config.tls_cert)) if self.tls else None,
            ssl_keyfile=str(Path(config.tls_key)) if self.tls else None,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=30,
        ))
        self._thread = threading.Thread(target=self._run, name="optiq-http", daemon=True)

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self) -> int:
        """Serve on the bound socket (connections queue in its backlog until uvicorn
        accepts them); returns the port."""
        self._thread.start()
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"
