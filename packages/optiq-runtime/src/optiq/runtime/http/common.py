"""Pieces both HTTP APIs share: body parsing, model names, SSE responses that cancel
on disconnect, and the accumulation of a whole answer for non-streaming calls."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine import Engine
from ..text import CONTENT, REASONING
from ..types import Delta, Finished, TokenLogprob, ToolCall
from .bridge import Stream
from .errors import INVALID, NOT_FOUND, ApiError, from_validation

B = TypeVar("B", bound=BaseModel)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def sse(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + dumps(obj) + b"\n\n"


async def parse_body(request: Request, model: type[B], limit: int) -> B:
    """The request body as ``model``; ApiError 400 naming the field otherwise, 413 over
    ``limit`` bytes (the gRPC message limit, --max-message-mb)."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise _too_large(int(size), limit)
    chunks, got = [], 0
    async for chunk in request.stream():
        got += len(chunk)
        if got > limit:
            raise _too_large(got, limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return model.model_validate_json(body or b"null")
    except ValidationError as e:
        raise from_validation(e) from None


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"request body of {size} bytes is over the server's limit of {limit} "
                    "bytes (--max-message-mb)", INVALID)


def resolve_model(engine: Engine, name: str) -> str:
    """The adapter a request's ``model`` names ("" for the base model)."""
    if name == engine.summary.model_id:
        return ""
    if name in engine.adapter_names:
        return name
    served = ", ".join([engine.summary.model_id, *engine.adapter_names])
    raise ApiError(404, f"model '{name}' is not served here (served: {served}; see GET /v1/models)",
                   NOT_FOUND, "model", "model_not_found")


def served_models(engine: Engine) -> list[str]:
    return [engine.summary.model_id, *engine.adapter_names]


@dataclass
class Collected:
    """A whole answer, for non-streaming responses."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    malformed_tool_call: bool = False
    events: list[Delta | ToolCall] = field(default_factory=list)  # in order, all but the last
    finished: Finished | None = None

    def add(self, e: Any) -> None:
        if not isinstance(e, Finished):
            self.events.append(e)
        if isinstance(e, Delta):
            self.malformed_tool_call |= e.malformed_tool_call
            if e.channel == REASONING:
                self.reasoning += e.text
            elif e.channel == CONTENT:
                self.content += e.text
                self.logprobs += e.logprobs
        elif isinstance(e, ToolCall):
            self.tool_calls.append(e)
        elif isinstance(e, Finished):
            self.finished = e


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, stream: Stream) -> Collected | None:
    """Read the whole answer; None (and the slot freed) if the client went away."""
    out = Collected()

    async def read() -> None:
        async for batch in stream.batches():
            for e in batch:
                out.add(e)

    gone = False
    try:
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                nonlocal gone
                await _until_disconnect(request.receive)
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await read()
            tg.cancel_scope.cancel()
    finally:
        stream.cancel()  # only acts if the request has not ended
    return None if gone else out


class EventStream(StreamingResponse):
    """``text/event-stream`` of ``chunks``; a client disconnect cancels the request
    (its batch slot is free at the engine's next step)."""

    def __init__(self, chunks: AsyncIterator[bytes], stream: Stream):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.chunks = chunks
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    await _until_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tg.cancel_scope.cancel()
        except OSError:  # the connection broke while sending
            pass
        finally:
            self.stream.cancel()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()


def created() -> int:
    return int(time.time())
