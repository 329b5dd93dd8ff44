"""The gRPC server: generation service, health, reflection, auth, TLS, shutdown; and,
with ``http_port``, the OpenAI / Anthropic HTTP front on the same engine.

The port is bound and health answers NOT_SERVING while the model loads on the engine
thread; it turns SERVING once loaded and back to NOT_SERVING when draining.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from optiq.v1 import SERVICE_NAME
from optiq.v1 import generation_pb2 as pb
from optiq.v1 import generation_pb2_grpc as pb_grpc

from optiq.core.errors import ConfigError

from .auth import BearerAuthInterceptor
from .config import ServeConfig
from .engine import Engine, LoadedEngineModel
from .reflection import enable_reflection
from .service import GenerationService

log = logging.getLogger("optiq.runtime")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GenerationServer:
    """One model behind ``optiq.v1.GenerationService``.

    ``loader`` (run on the engine thread) defaults to :func:`optiq.runtime.loader.make_loader`.
    """

    def __init__(
        self,
        config: ServeConfig,
        loader: Callable[[], LoadedEngineModel] | None = None,
    ):
        from optiq.core.cpu import on_cpu
        from optiq.core.model_io import validate_model_dir

        from . import __version__
        from .footprint import estimate
        from .loader import make_loader

        config.check()
        self.config = config
        self.model_dir, model_config = validate_model_dir(config.model)
        # before anything is allocated: refuse a model that will not fit (MemoryBudgetError)
        self.footprint = estimate(self.model_dir, model_config, config, cpu=on_cpu())
        self.footprint.check()
        self.defaults = config.defaults(self.model_dir)
        self.engine = Engine(
            loader or make_loader(config, self.model_dir),
            max_concurrency=config.max_concurrency,
            max_queue=config.max_queue,
            prefill_step_size=config.prefill_step_size,
            prompt_cache_bytes=config.prompt_cache_budget(),
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._set_health(NOT_SERVING)
        workers = config.max_concurrency + config.max_queue + 16
        interceptors = [BearerAuthInterceptor(config.api_key)] if config.api_key else []
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="optiq-rpc"),
            interceptors=interceptors,
            options=grpc_options(config.max_message_bytes),
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_GenerationServiceServicer_to_server(
            GenerationService(self.engine, self.defaults, __version__), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        enable_reflection(
            (
                pb.DESCRIPTOR.services_by_name["GenerationService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ),
            self._server,
        )
        self.port: int | None = None
        self.http = None  # HttpFront once started with config.http_port
        self._stopped = threading.Event()
        self._shutdown_lock = threading.Lock()

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> int:
        """Bind and start answering (NOT_SERVING until loaded); returns the port."""
        c = self.config
        address = _address(c.host, c.port)
        try:
            if c.tls_cert is not None:
                creds = grpc.ssl_server_credentials(
                    [(Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes())]
                )
                port = self._server.add_secure_port(address, creds)
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {address}: {e}") from None
        if port == 0:
            raise ConfigError(f"cannot listen on {address} (in use or not a local address)")
        self.port = port
        if c.http_port is not None:
            from .http import HttpFront

            self.http = HttpFront(self.engine, self.defaults, c)
        self._server.start()
        if self.http is not None:
            self.http.start()
        self.engine.start()
        threading.Thread(target=self._mark_ready, name="optiq-ready", daemon=True).start()
        return port

    def _mark_ready(self) -> None:
        try:
            self.engine.wait_ready()
        except BaseException:
            return  # health stays NOT_SERVING; wait_ready() reports the error to serve()
        if self.engine.serving:
            self._set_health(SERVING)
        self.engine.wait_stopped()
        self._set_health(NOT_SERVING)  # the engine thread ended (shutdown or crash)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once the model is loaded (raises the load error if loading failed)."""
        return self.engine.wait_ready(timeout)

    def shutdown(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new requests, finish running ones for ``grace``
        seconds (default: the config's), then cancel the rest and stop."""
        with self._shutdown_lock:
            if self._stopped.is_set():
                return
            grace = self.config.shutdown_grace if grace is None else grace
            self._set_health(NOT_SERVING)
            self.engine.drain(grace)
            self._server.stop(1.0).wait()
            if self.http is not None:
                self.http.stop()
            self.engine.stop()
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    @property
    def address(self) -> str:
        return _address(self.config.host, self.port or self.config.port)


def serve(
    config: ServeConfig,
    loader: Callable[[], LoadedEngineModel] | None = None,
    on_ready: Callable[[GenerationServer], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully. Raises load/config errors."""
    server = GenerationServer(config, loader)
    stop = threading.Event()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
        try:
            while not server.wait_ready(0.2):
                if stop.is_set():
                    break
        except BaseException:
            server.shutdown(0)
            raise
        if on_ready is not None and not stop.is_set():
            on_ready(server)
        while not stop.wait(0.5):
            pass
        server.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
