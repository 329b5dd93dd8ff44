"""The Starlette application: routes, bearer auth, errors in each API's shape.

Auth is the gRPC front's rule: with an API key, every route but ``/health`` needs it,
as ``Authorization: Bearer KEY`` (OpenAI SDKs) or ``x-api-key: KEY`` (Anthropic SDKs).

Counting is the gRPC front's rule too (GetLoad): a generation request (chat
completions, completions, messages) is counted once, by the engine when accepted or
refused at capacity (429), and here when refused as one the client must fix (400, or
404 for an unknown model: what gRPC calls INVALID_ARGUMENT) in ``requests_invalid``.
Not counted, as for gRPC: 401, 413 (body over the size limit) and 503 (loading,
draining).
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..config import Defaults
from ..engine import Engine
from .anthropic_api import AnthropicApi
from .bridge import EngineBridge
from .common import json_response
from .errors import AUTH, INVALID, NOT_FOUND, ApiError, anthropic_body, from_exception, openai_body
from .openai_api import OpenAIApi

log = logging.getLogger("optiq.runtime.http")

Handler = Callable[[Request], Awaitable[Response]]


class _Auth:
    def __init__(self, api_key: str | None):
        self._key = api_key.encode() if api_key else None

    def check(self, request: Request) -> None:
        if self._key is None:
            return
        h = request.headers
        bearer = h.get("authorization", "")
        got = bearer[7:] if bearer[:7].lower() == "bearer " else h.get("x-api-key", "")
        if not hmac.compare_digest(got.encode(), self._key):
            raise ApiError(401, "missing or invalid API key (header 'Authorization: Bearer "
                           "<key>' or 'x-api-key: <key>')", AUTH)


# A generation request refused with these was one the client must fix (GetLoad's
# requests_invalid); nothing after submission raises them.
_INVALID_STATUSES = (400, 404)


def _endpoint(handler: Handler, auth: _Auth, render: Callable[[ApiError], dict[str, Any]],
              generates: Engine | None = None) -> Handler:
    """``handler`` with auth and errors in the API's shape; ``generates``: the engine
    whose ``requests_invalid`` counts this generation endpoint's invalid requests."""

    async def run(request: Request) -> Response:
        try:
            auth.check(request)
            return await handler(request)
        except Exception as e:  # every failure answers in the API's own shape
            err = from_exception(e)
            if err.status >= 500:
                log.exception("%s %s failed", request.method, request.url.path)
            elif generates is not None and err.status in _INVALID_STATUSES:
                generates.count_invalid()
            return json_response(render(err), err.status)

    return run


def build_app(engine: Engine, defaults: Defaults, api_key: str | None,
              max_body: int) -> Starlette:
    bridge = EngineBridge(engine, defaults)
    auth = _Auth(api_key)
    oai = OpenAIApi(bridge, time.time(), max_body)
    ant = AnthropicApi(bridge, max_body)

    async def health(request: Request) -> Response:
        """200 when serving; 503 while loading or draining (no auth, like gRPC health)."""
        st = engine.load()
        status = "ok" if engine.serving else ("draining" if engine.loaded else "loading")
        body = {"status": status, "active_requests": st.active, "queued_requests": st.queued,
                "requests_total": st.requests_total, "requests_cancelled": st.cancelled,
                "requests_rejected": st.rejected, "requests_invalid": st.invalid,
                "max_concurrency": engine.max_concurrency, "max_queue": engine.max_queue}
        if engine.loaded is not None:
            body["model"] = engine.summary.model_id
        return json_response(body, 200 if engine.serving else 503)

    async def not_found(request: Request) -> Response:
        raise ApiError(404, f"no route {request.method} {request.url.path} (OpenAI: /v1/chat/"
                       "completions, /v1/completions, /v1/models; Anthropic: /v1/messages)",
                       NOT_FOUND)

    async def wrong_method(request: Request) -> Response:
        raise ApiError(405, f"{request.url.path} does not take {request.method}", INVALID)

    def o(h: Handler, generates: bool = False) -> Handler:
        return _endpoint(h, auth, openai_body, engine if generates else None)

    def a(h: Handler, generates: bool = False) -> Handler:
        return _endpoint(h, auth, anthropic_body, engine if generates else None)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/chat/completions", o(oai.chat, generates=True), methods=["POST"]),
        Route("/v1/completions", o(oai.completions, generates=True), methods=["POST"]),
        Route("/v1/models", o(oai.models), methods=["GET"]),
        Route("/v1/messages", a(ant.messages, generates=True), methods=["POST"]),
        Route("/v1/messages/count_tokens", a(ant.count_tokens), methods=["POST"]),
    ]
    app = Starlette(routes=routes)

    async def missing(request: Request, exc: Exception) -> Response:
        return await o(not_found)(request)

    async def method(request: Request, exc: Exception) -> Response:
        return await o(wrong_method)(request)

    app.add_exception_handler(404, missing)
    app.add_exception_handler(405, method)
    return app
