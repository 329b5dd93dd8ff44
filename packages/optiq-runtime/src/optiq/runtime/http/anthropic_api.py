"""Anthropic-compatible endpoints: ``/v1/messages`` (and ``/v1/messages/count_tokens``).

Requests become ``pb.GenerateRequest`` like the OpenAI ones: ``tool_use`` blocks become
assistant tool calls, ``tool_result`` blocks tool-role messages, ``thinking`` blocks the
assistant's reasoning. Answers are content blocks in generation order (thinking, text,
tool_use); streams follow the Messages event sequence: message_start, then per block
content_block_start / _delta / _stop, then message_delta and message_stop.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from optiq.v1 import generation_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response

from ..text import CONTENT, REASONING
from ..types import LENGTH, STOP, TOOL_CALLS, Delta, Finished, ToolCall
from .anthropic_models import (
    CountTokensRequest,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from .bridge import EngineBridge, Stream
from .common import EventStream, collect, json_response, parse_body, resolve_model, sse
from .errors import ApiError, anthropic_body
from .openai_api import check_final


def _system(system: str | list[TextBlock] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n".join(b.text for b in system)


def to_messages(body: MessagesRequest | CountTokensRequest) -> list[pb.ChatMessage]:
    out = []
    system = _system(body.system)
    if system:
        out.append(pb.ChatMessage(role="system", content=system))
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append(pb.ChatMessage(role=m.role, content=m.content))
            continue
        texts, reasoning, calls = [], [], []
        for j, b in enumerate(m.content):
            if isinstance(b, TextBlock):
                texts.append(b.text)
            elif isinstance(b, ThinkingBlock):
                reasoning.append(b.thinking)
            elif isinstance(b, ToolUseBlock):
                if m.role != "assistant":
                    raise ApiError(400, f"messages.{i}.content.{j}: tool_use blocks belong in "
                                   "assistant messages", param=f"messages.{i}.content")
                calls.append(pb.ToolCall(id=b.id, name=b.name, arguments_json=json.dumps(b.input)))
            elif isinstance(b, ToolResultBlock):
                if m.role != "user":
                    raise ApiError(400, f"messages.{i}.content.{j}: tool_result blocks belong in "
                                   "user messages", param=f"messages.{i}.content")
                c = b.content
                text = c if isinstance(c, str) else "\n".join(t.text for t in c or ())
                out.append(pb.ChatMessage(role="tool", content=text, tool_call_id=b.tool_use_id))
        if m.role == "assistant":
            out.append(pb.ChatMessage(role="assistant", content="".join(texts),
                                      reasoning_content="".join(reasoning), tool_calls=calls))
        elif texts:
            out.append(pb.ChatMessage(role="user", content="\n".join(texts)))
    return out


def _tools(body: MessagesRequest | CountTokensRequest) -> list[pb.Tool]:
    return [pb.Tool(name=t.name, description=t.description,
                    parameters_json=json.dumps(t.input_schema) if t.input_schema else "")
            for t in body.tools or ()]


def _thinking(body: MessagesRequest | CountTokensRequest) -> bool | None:
    t = body.thinking
    return None if t is None or t.type == "adaptive" else t.type == "enabled"


def messages_request(body: MessagesRequest, adapter: str) -> pb.GenerateRequest:
    given = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k")
             if getattr(body, k) is not None}
    r = pb.GenerateRequest(messages=to_messages(body), tools=_tools(body), adapter=adapter,
                           sampling=pb.SamplingParams(**given), max_tokens=body.max_tokens,
                           stop=body.stop_sequences or [])
    choice = body.tool_choice
    if choice is not None:
        r.tool_choice = {"auto": "auto", "none": "none", "any": "required"}.get(
            choice.type, choice.name or choice.type)
    thinking = _thinking(body)
    if thinking is not None:
        r.enable_thinking = thinking
    return r


def stop_reason(f: Finished) -> str:
    if f.reason == TOOL_CALLS:
        return "tool_use"
    if f.reason == LENGTH:
        return "max_tokens"
    if f.reason == STOP and f.stop_sequence:
        return "stop_sequence"
    return "end_turn"


def usage(f: Finished) -> dict[str, Any]:
    u = f.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


class Blocks:
    """Content blocks built from engine events, with the stream events that announce
    them (the non-streaming answer runs the same machine and keeps ``content``)."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self._open: str | None = None

    def _start(self, kind: str, block: dict[str, Any], shown: dict[str, Any]) -> bytes:
        out = self.close()
        self.content.append(block)
        self._open = kind
        event = {"type": "content_block_start", "index": len(self.content) - 1,
                 "content_block": shown}
        return out + sse(event, "content_block_start")

    def _delta(self, delta: dict[str, Any]) -> bytes:
        event = {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}
        return sse(event, "content_block_delta")

    def close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        event = {"type": "content_block_stop", "index": len(self.content) - 1}
        return sse(event, "content_block_stop")

    def add(self, e: Delta | ToolCall) -> bytes:
        if isinstance(e, ToolCall):
            shown = {"type": "tool_use", "id": e.id, "name": e.name, "input": {}}
            out = self._start("tool_use", {**shown, "input": json.loads(e.arguments)}, shown)
            out += self._delta({"type": "input_json_delta", "partial_json": e.arguments})
            return out + self.close()
        if not e.text:
            return b""
        out = b""
        if e.channel == REASONING:
            if self._open != "thinking":
                block = {"type": "thinking", "thinking": "", "signature": ""}
                out = self._start("thinking", block, dict(block))
            self.content[-1]["thinking"] += e.text
            return out + self._delta({"type": "thinking_delta", "thinking": e.text})
        if e.channel != CONTENT:
            return b""
        kind = "malformed" if e.malformed_tool_call else "text"
        if self._open != kind or kind == "malformed":
            block: dict[str, Any] = {"type": "text", "text": ""}
            if e.malformed_tool_call:  # a tool call the model botched, returned as text
                block["malformed_tool_call"] = True
            out = self._start(kind, block, dict(block))
        self.content[-1]["text"] += e.text
        return out + self._delta({"type": "text_delta", "text": e.text})


def _message(mid: str, model: str, content: list, f: Finished | None, prompt_tokens: int
             ) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": model,
            "content": content,
            "stop_reason": stop_reason(f) if f else None,
            "stop_sequence": (f.stop_sequence or None) if f else None,
            "usage": usage(f) if f else {"input_tokens": prompt_tokens, "output_tokens": 0}}


async def message_events(stream: Stream, mid: str, model: str) -> AsyncIterator[bytes]:
    start = _message(mid, model, [], None, len(stream.request.prompt_tokens))
    yield sse({"type": "message_start", "message": start}, "message_start")
    blocks = Blocks()
    async for batch in stream.batches():
        out = b""
        for e in batch:
            if not isinstance(e, Finished):
                out += blocks.add(e)
                continue
            try:
                f = check_final(e)
            except ApiError as err:
                yield out + sse(anthropic_body(err), "error")
                return
            out += blocks.close()
            out += sse({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason(f),
                                  "stop_sequence": f.stop_sequence or None},
                        "usage": usage(f)}, "message_delta")
            out += sse({"type": "message_stop"}, "message_stop")
        if out:
            yield out


class AnthropicApi:
    def __init__(self, bridge: EngineBridge, max_body: int):
        self.bridge = bridge
        self.engine = bridge.engine
        self.max_body = max_body

    async def messages(self, request: Request) -> Response:
        body = await parse_body(request, MessagesRequest, self.max_body)
        r = messages_request(body, resolve_model(self.engine, body.model))
        stream = await self.bridge.start(r)
        mid = f"msg_{stream.request.request_id}"
        if body.stream:
            return EventStream(message_events(stream, mid, body.model), stream)
        got = await collect(request, stream)
        if got is None:
            return Response(status_code=499)
        f = check_final(got.finished)
        blocks = Blocks()
        for e in got.events:
            blocks.add(e)
        return json_response(_message(mid, body.model, blocks.content, f, 0))

    async def count_tokens(self, request: Request) -> Response:
        body = await parse_body(request, CountTokensRequest, self.max_body)
        resolve_model(self.engine, body.model)
        n = await self.bridge.count_tokens(to_messages(body), _tools(body), _thinking(body))
        return json_response({"input_tokens": n})

