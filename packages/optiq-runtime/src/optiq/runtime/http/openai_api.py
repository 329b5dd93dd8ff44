"""OpenAI-compatible endpoints: chat completions, completions, models.

Requests become ``pb.GenerateRequest`` (so the engine's checks apply as for gRPC);
engine events become OpenAI objects. Reasoning goes to ``reasoning_content`` (and
``reasoning``, the name mlx-lm's server uses), tool calls to ``tool_calls``.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from optiq.v1 import generation_pb2 as pb
from starlette.requests import Request
from starlette.responses import Response

from ..text import CONTENT, REASONING
from ..types import CANCELLED, ERROR, LENGTH, TOOL_CALLS, Delta, Finished, TokenLogprob, ToolCall
from .bridge import EngineBridge, Stream
from .common import (
    Collected,
    EventStream,
    collect,
    created,
    json_response,
    parse_body,
    resolve_model,
    served_models,
    sse,
)
from .errors import SERVER, UNAVAILABLE, ApiError
from .openai_models import ChatCompletionRequest, ChatMessageIn, CompletionRequest, _Sampling

SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "seed")
DONE = b"data: [DONE]\n\n"


def finish_reason(f: Finished) -> str:
    if f.reason == LENGTH:
        return "length"
    if f.reason == TOOL_CALLS:
        return "tool_calls"
    return "stop"


def check_final(f: Finished | None) -> Finished:
    """The final event, or the error it stands for (engine failure, shutdown)."""
    if f is None:
        raise ApiError(500, "the request ended without a result", SERVER)
    if f.reason == ERROR:
        raise ApiError(500, f"generation failed: {f.error}", SERVER)
    if f.reason == CANCELLED:
        raise ApiError(503, f"request cancelled: {f.error}", UNAVAILABLE)
    return f


def usage(f: Finished) -> dict[str, Any]:
    u = f.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def _common(body: _Sampling, adapter: str) -> pb.GenerateRequest:
    if body.n not in (None, 1):
        raise ApiError(400, f"n={body.n}: this server returns one choice per request (n=1)",
                       param="n")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    given = {k: getattr(body, k) for k in SAMPLING if getattr(body, k) is not None}
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    r = pb.GenerateRequest(sampling=pb.SamplingParams(**given), stop=stop,
                           ignore_eos=body.ignore_eos, adapter=adapter)
    return r


def _text(m: ChatMessageIn, i: int) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for j, p in enumerate(m.content):
        if p.type not in ("text", "input_text") or p.text is None:
            raise ApiError(400, f"messages.{i}.content.{j}: content type '{p.type}' is not "
                           "supported (this server takes text)", param=f"messages.{i}.content")
        parts.append(p.text)
    return "".join(parts)


def chat_request(body: ChatCompletionRequest, adapter: str) -> pb.GenerateRequest:
    if body.response_format is not None and body.response_format.type != "text":
        raise ApiError(400, f"response_format '{body.response_format.type}' needs constrained "
                       "decoding, which this server does not do (only 'text')",
                       param="response_format")
    r = _common(body, adapter)
    for i, m in enumerate(body.messages):
        r.messages.add(
            role="system" if m.role == "developer" else m.role,
            content=_text(m, i),
            reasoning_content=m.reasoning_content or m.reasoning or "",
            tool_calls=[pb.ToolCall(id=c.id, name=c.function.name,
                                    arguments_json=c.function.arguments)
                        for c in m.tool_calls or ()],
            tool_call_id=m.tool_call_id or "",
            name=m.name or "",
        )
    for t in body.tools or ():
        f = t.function
        r.tools.add(name=f.name, description=f.description,
                    parameters_json=json.dumps(f.parameters) if f.parameters else "")
    choice = body.tool_choice
    r.tool_choice = choice.function.name if hasattr(choice, "function") else (choice or "")
    kwargs = dict(body.chat_template_kwargs or {})
    thinking = body.enable_thinking
    if "enable_thinking" in kwargs:
        value = kwargs.pop("enable_thinking")
        if not isinstance(value, bool):
            raise ApiError(400, "chat_template_kwargs.enable_thinking must be true or false",
                           param="chat_template_kwargs")
        thinking = value if thinking is None else thinking
    if thinking is not None:
        r.enable_thinking = thinking
    if kwargs:
        r.chat_template_kwargs_json = json.dumps(kwargs)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        r.max_tokens = max_tokens
    if body.logprobs:
        r.logprobs = True
    if body.top_logprobs:
        r.top_logprobs = body.top_logprobs
    return r


def completion_request(body: CompletionRequest, adapter: str) -> pb.GenerateRequest:
    for name, bad in (("echo", body.echo), ("suffix", body.suffix),
                      ("best_of", body.best_of not in (None, 1))):
        if bad:
            raise ApiError(400, f"{name} is not supported", param=name)
    r = _common(body, adapter)
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got {len(p)}", param="prompt")
        p = p[0]
    if isinstance(p, str):
        r.prompt = p
    else:
        r.token_ids.extend(p)
    if body.max_tokens is not None:
        r.max_tokens = body.max_tokens
    if body.logprobs is not None:
        r.logprobs = True
        r.top_logprobs = body.logprobs
    return r


def _logprob(lp: TokenLogprob) -> dict[str, Any]:
    return {"token": lp.text, "logprob": lp.logprob, "bytes": list(lp.text.encode()),
            "top_logprobs": [{"token": t.text, "logprob": t.logprob,
                              "bytes": list(t.text.encode())} for t in lp.top]}


def _tool_call(c: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments}}
    if index is not None:
        out["index"] = index
    return out


def chat_response(rid: str, model: str, got: Collected, want_logprobs: bool) -> dict[str, Any]:
    f = check_final(got.finished)
    message: dict[str, Any] = {"role": "assistant",
                               "content": got.content or (None if got.tool_calls else "")}
    if got.reasoning:
        message["reasoning_content"] = message["reasoning"] = got.reasoning
    if got.tool_calls:
        message["tool_calls"] = [_tool_call(c) for c in got.tool_calls]
    if got.malformed_tool_call:  # content holds a tool call the model botched, as written
        message["malformed_tool_call"] = True
    lps = {"content": [_logprob(lp) for lp in got.logprobs]} if want_logprobs else None
    return {"id": rid, "object": "chat.completion", "created": created(), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": lps,
                         "finish_reason": finish_reason(f)}],
            "usage": usage(f)}


def _legacy_logprobs(lps: list[TokenLogprob]) -> dict[str, Any]:
    offsets, at = [], 0
    for lp in lps:
        offsets.append(at)
        at += len(lp.text)
    return {"tokens": [lp.text for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t.text: t.logprob for t in lp.top} for lp in lps],
            "text_offset": offsets}


def completion_response(rid: str, model: str, got: Collected, want_logprobs: bool
                        ) -> dict[str, Any]:
    f = check_final(got.finished)
    choice: dict[str, Any] = {"index": 0, "text": got.content,
                              "logprobs": _legacy_logprobs(got.logprobs) if want_logprobs else None,
                              "finish_reason": finish_reason(f)}
    if got.reasoning:
        choice["reasoning_content"] = got.reasoning
    return {"id": rid, "object": "text_completion", "created": created(), "model": model,
            "choices": [choice], "usage": usage(f)}


def _error_chunk(e: ApiError) -> bytes:
    from .errors import openai_body

    return sse(openai_body(e)) + DONE


async def chat_chunks(stream: Stream, rid: str, model: str, include_usage: bool,
                      want_logprobs: bool) -> AsyncIterator[bytes]:
    ts = created()
    head = {"id": rid, "object": "chat.completion.chunk", "created": ts, "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None, lps: list | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": lps} if lps else None,
                  "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    calls = 0
    async for batch in stream.batches():
        out = []
        for e in batch:
            if isinstance(e, Delta):
                if e.channel == REASONING and e.text:
                    out.append(chunk({"reasoning_content": e.text, "reasoning": e.text}))
                elif e.channel == CONTENT and (e.text or (want_logprobs and e.logprobs)):
                    lps = [_logprob(lp) for lp in e.logprobs] if want_logprobs else None
                    delta: dict[str, Any] = {"content": e.text}
                    if e.malformed_tool_call:
                        delta["malformed_tool_call"] = True
                    out.append(chunk(delta, lps=lps))
            elif isinstance(e, ToolCall):
                out.append(chunk({"tool_calls": [_tool_call(e, calls)]}))
                calls += 1
            elif isinstance(e, Finished):
                try:
                    f = check_final(e)
                except ApiError as err:
                    yield b"".join(out) + _error_chunk(err)
                    return
                out.append(chunk({}, finish_reason(f)))
                if include_usage:
                    out.append(sse({**head, "choices": [], "usage": usage(f)}))
                out.append(DONE)
        if out:
            yield b"".join(out)


async def completion_chunks(stream: Stream, rid: str, model: str, include_usage: bool,
                            want_logprobs: bool) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "text_completion", "created": created(), "model": model}

    def chunk(text: str, finish: str | None = None, lps: list | None = None) -> bytes:
        choice = {"index": 0, "text": text,
                  "logprobs": _legacy_logprobs(lps) if lps else None, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    async for batch in stream.batches():
        out = []
        for e in batch:
            if isinstance(e, Delta) and e.channel == CONTENT and (e.text or e.logprobs):
                out.append(chunk(e.text, lps=e.logprobs if want_logprobs else None))
            elif isinstance(e, Finished):
                try:
                    f = check_final(e)
                except ApiError as err:
                    yield b"".join(out) + _error_chunk(err)
                    return
                out.append(chunk("", finish_reason(f)))
                if include_usage:
                    out.append(sse({**head, "choices": [], "usage": usage(f)}))
                out.append(DONE)
        if out:
            yield b"".join(out)


class OpenAIApi:
    def __init__(self, bridge: EngineBridge, started: float, max_body: int):
        self.bridge = bridge
        self.engine = bridge.engine
        self.started = int(started)
        self.max_body = max_body

    async def chat(self, request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest, self.max_body)
        r = chat_request(body, resolve_model(self.engine, body.model))
        stream = await self.bridge.start(r)
        rid = f"chatcmpl-{stream.request.request_id}"
        want_lp = bool(body.logprobs)
        if body.stream:
            usage_too = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(chat_chunks(stream, rid, body.model, usage_too, want_lp), stream)
        got = await collect(request, stream)
        if got is None:
            return Response(status_code=499)
        return json_response(chat_response(rid, body.model, got, want_lp))

    async def completions(self, request: Request) -> Response:
        body = await parse_body(request, CompletionRequest, self.max_body)
        r = completion_request(body, resolve_model(self.engine, body.model))
        stream = await self.bridge.start(r)
        rid = f"cmpl-{stream.request.request_id}"
        want_lp = body.logprobs is not None
        if body.stream:
            usage_too = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(completion_chunks(stream, rid, body.model, usage_too, want_lp),
                               stream)
        got = await collect(request, stream)
        if got is None:
            return Response(status_code=499)
        return json_response(completion_response(rid, body.model, got, want_lp))

    async def models(self, request: Request) -> Response:
        """The base model and each adapter; one list both SDKs read (OpenAI's
        ``object``/``owned_by`` and Anthropic's ``type``/``display_name``)."""
        from datetime import datetime, timezone

        stamp = datetime.fromtimestamp(self.started, timezone.utc).isoformat().replace("+00:00", "Z")
        names = served_models(self.engine)
        data = [{"id": n, "object": "model", "created": self.started, "owned_by": "optiq",
                 "type": "model", "display_name": n, "created_at": stamp} for n in names]
        return json_response({"object": "list", "data": data, "has_more": False,
                              "first_id": names[0], "last_id": names[-1]})
