"""Bearer-token check for every RPC except the standard health service."""

from __future__ import annotations

import hmac
from typing import Any, Callable

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _deny(message: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handler(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return handler


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Accepts ``authorization: Bearer <key>`` metadata (constant-time compare)."""

    def __init__(self, api_key: str):
        if not api_key:
            raise ValueError("empty API key")
        self._expected = f"Bearer {api_key}".encode()

    def _ok(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(got, self._expected)
        return False

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._ok(details.invocation_metadata):
            return handler
        deny = _deny("missing or invalid bearer token (metadata 'authorization: Bearer <key>')")
        kw = dict(
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **kw)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, **kw)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **kw)
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
