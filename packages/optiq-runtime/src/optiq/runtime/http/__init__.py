"""The HTTP front of ``optiq serve`` (``--http-port``): OpenAI and Anthropic APIs over
HTTP/1.1 + SSE, on the same engine as the gRPC service (one batch, one set of limits,
adapters and auth).

Built on Starlette + uvicorn + pydantic: small, well-kept ASGI pieces. Starlette streams
SSE and lets a response watch for the client's disconnect (which cancels the request
and frees its batch slot); uvicorn serves HTTP/1.1 with TLS from the same
``--tls-cert``/``--tls-key``; pydantic turns a bad body into a 400 naming the field.
"""

from .server import HttpFront

__all__ = ["HttpFront"]
