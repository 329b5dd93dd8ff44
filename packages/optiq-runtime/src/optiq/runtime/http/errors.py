"""Errors of the HTTP front, rendered in each API's own error shape.

One :class:`ApiError` says what went wrong in API-neutral terms (status, kind, field);
:func:`openai_body` and :func:`anthropic_body` give the JSON each SDK expects, so the
OpenAI SDK raises ``BadRequestError`` / ``NotFoundError`` / ... and the Anthropic SDK
its own classes with the message intact.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..engine import NotServing, QueueFull
from ..request import BadRequest, PromptTooLong, UnknownAdapter

INVALID = "invalid_request"
AUTH = "authentication"
NOT_FOUND = "not_found"
RATE_LIMIT = "rate_limit"
UNAVAILABLE = "unavailable"
SERVER = "server"

_OPENAI_TYPES = {
    INVALID: "invalid_request_error",
    AUTH: "invalid_request_error",
    NOT_FOUND: "invalid_request_error",
    RATE_LIMIT: "rate_limit_error",
    UNAVAILABLE: "server_error",
    SERVER: "server_error",
}
_ANTHROPIC_TYPES = {
    INVALID: "invalid_request_error",
    AUTH: "authentication_error",
    NOT_FOUND: "not_found_error",
    RATE_LIMIT: "rate_limit_error",
    UNAVAILABLE: "overloaded_error",
    SERVER: "api_error",
}


class ApiError(Exception):
    """An HTTP error response: ``status``, a ``kind`` above, the field at fault."""

    def __init__(self, status: int, message: str, kind: str = INVALID,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code


def from_exception(e: Exception) -> ApiError:
    """The HTTP error for an engine/service exception (the same checks gRPC makes)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UnknownAdapter):
        return ApiError(404, str(e), NOT_FOUND, "model", "model_not_found")
    if isinstance(e, PromptTooLong):
        return ApiError(400, str(e), INVALID, "messages", "context_length_exceeded")
    if isinstance(e, BadRequest):
        return ApiError(400, str(e), INVALID, e.param)
    if isinstance(e, QueueFull):
        return ApiError(429, str(e), RATE_LIMIT, code="server_at_capacity")
    if isinstance(e, NotServing):
        return ApiError(503, str(e), UNAVAILABLE)
    if isinstance(e, ValidationError):
        return from_validation(e)
    return ApiError(500, f"{type(e).__name__}: {e}", SERVER)


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def from_validation(e: ValidationError) -> ApiError:
    """400 naming each bad field (``messages.0.role: Input should be ...``)."""
    errors = e.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return ApiError(400, f"request body is not valid JSON: {errors[0]['msg']}", INVALID)
    parts = [f"{_loc(err['loc']) or 'body'}: {err['msg']}" for err in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = _loc(errors[0]["loc"]) if errors else None
    return ApiError(400, "; ".join(parts) + more, INVALID, first or None)


def openai_body(e: ApiError) -> dict[str, Any]:
    code = e.code or ("invalid_api_key" if e.kind == AUTH else None)
    return {"error": {"message": e.message, "type": _OPENAI_TYPES[e.kind], "param": e.param,
                      "code": code}}


def anthropic_body(e: ApiError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES[e.kind], "message": e.message}}
