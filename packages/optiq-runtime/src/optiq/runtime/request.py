"""From a ``pb.GenerateRequest`` to a validated, tokenized engine request.

Shared by both fronts: the gRPC servicer and the HTTP front (which builds a
``GenerateRequest`` from an OpenAI or Anthropic body), so limits, defaults and error
messages are one code path. Chat input is rendered with the model's chat template:
messages (tool calls, tool results, reasoning), tools and extra template variables;
for a hybrid model with the prefix cache on, the token offsets where its messages end
are found too (:mod:`.boundaries`, from the same message dicts and template arguments)
so the engine snapshots there, for both fronts alike.
Runs on handler threads; never touches MLX.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any, NamedTuple

from optiq.v1 import generation_pb2 as pb

from .boundaries import message_boundaries
from .config import Defaults
from .engine import Engine
from .text import initial_channel
from .tools import TOOL_NAME, template_tool, template_tool_call
from .types import GenerationRequest, Sampling

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20

# chat_template_kwargs may not override what the server itself passes to the template
_RESERVED_TEMPLATE_KEYS = {"messages", "tools", "add_generation_prompt", "tokenize",
                           "conversation", "documents", "continue_final_message"}


class BadRequest(ValueError):
    """A request the client must fix (INVALID_ARGUMENT); ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownAdapter(BadRequest):
    """The request names an adapter the server did not register."""


class PromptTooLong(BadRequest):
    """The input leaves no room for a generated token in the context limit."""


def _messages(msgs: Any) -> list[dict[str, Any]]:
    """Chat messages as chat templates expect them (tool calls, tool results, reasoning)."""
    out = []
    for i, m in enumerate(msgs):
        if not m.role:
            raise BadRequest(f"messages[{i}].role is empty", f"messages[{i}].role")
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.reasoning_content:
            d["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            d["tool_calls"] = [template_tool_call(c.id, c.name, c.arguments_json)
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def _tools(tools: Any) -> list[dict]:
    out = []
    for i, t in enumerate(tools):
        if not TOOL_NAME.fullmatch(t.name):
            raise BadRequest(
                f"tools[{i}].name '{t.name}' must be 1-64 letters, digits, '_', '-' or '.'",
                f"tools[{i}].name",
            )
        params = None
        if t.parameters_json:
            try:
                params = json.loads(t.parameters_json)
            except json.JSONDecodeError as e:
                raise BadRequest(f"tools[{i}].parameters is not valid JSON: {e}",
                                 f"tools[{i}].parameters") from None
            if not isinstance(params, dict):
                raise BadRequest(f"tools[{i}].parameters must be a JSON object (a JSON Schema)",
                                 f"tools[{i}].parameters")
        out.append(template_tool(t.name, t.description, params))
    return out


def _template_kwargs(kwargs_json: str, enable_thinking: bool | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except json.JSONDecodeError as e:
            raise BadRequest(f"chat_template_kwargs is not valid JSON: {e}",
                             "chat_template_kwargs") from None
        if not isinstance(kwargs, dict):
            raise BadRequest("chat_template_kwargs must be a JSON object", "chat_template_kwargs")
        reserved = sorted(_RESERVED_TEMPLATE_KEYS & set(kwargs))
        if reserved:
            raise BadRequest(f"chat_template_kwargs may not set {', '.join(reserved)}",
                             "chat_template_kwargs")
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    return kwargs


def check_tool_choice(tool_choice: str) -> None:
    if tool_choice not in ("", "auto", "none"):
        raise BadRequest(
            f"tool_choice '{tool_choice}' would need constrained decoding, which this server "
            "does not do: use 'auto' (the model decides) or 'none'",
            "tool_choice",
        )


class Rendered(NamedTuple):
    """One input, tokenized."""

    ids: list[int]
    text: str  # used to find the start channel
    tools: list[dict]  # as the chat template got them
    # Chat input: the message dicts and template arguments (tools included) the real
    # rendering used, for the boundary probes; None for a prompt or token ids.
    chat: tuple[list[dict[str, Any]], dict[str, Any]] | None = None


def render_input(
    engine: Engine,
    *,
    text: str,
    messages: Any,
    token_ids: Any = (),
    enable_thinking: bool | None,
    tools: Any = (),
    chat_template_kwargs_json: str = "",
) -> tuple[list[int], str, list[dict]]:
    """Token ids of exactly one input, the text used to find the start channel, and the
    tools as the chat template got them."""
    r = _render(engine, text=text, messages=messages, token_ids=token_ids,
                enable_thinking=enable_thinking, tools=tools,
                chat_template_kwargs_json=chat_template_kwargs_json)
    return r.ids, r.text, r.tools


def _render(
    engine: Engine,
    *,
    text: str,
    messages: Any,
    token_ids: Any,
    enable_thinking: bool | None,
    tools: Any,
    chat_template_kwargs_json: str,
) -> Rendered:
    given = [n for n, v in (("prompt", text), ("messages", messages), ("token_ids", token_ids)) if v]
    if not given:
        raise BadRequest("empty input: set exactly one of prompt, messages or token_ids")
    if len(given) > 1:
        raise BadRequest(f"set exactly one input, got {' and '.join(given)}")
    if enable_thinking is not None and not messages:
        raise BadRequest("enable_thinking applies only to messages (chat input)")
    if (tools or chat_template_kwargs_json) and not messages:
        raise BadRequest("tools and chat_template_kwargs apply only to messages (chat input)")
    tok = engine.tokenizer
    summary = engine.summary
    template_tools = _tools(tools)
    if template_tools and summary.tool_tags is None:
        raise BadRequest(
            f"model {summary.model_id}: its chat template does not render tools (no tool-call "
            "format known to mlx-lm), so tool definitions cannot be passed",
            "tools",
        )
    chat = None
    with engine.tokenizer_lock:
        if text:
            ids = list(tok.encode(text))
            rendered = text
        elif messages:
            if not summary.has_chat_template:
                raise BadRequest("this model has no chat template: send a plain prompt")
            kwargs = _template_kwargs(chat_template_kwargs_json, enable_thinking)
            if template_tools:
                kwargs["tools"] = template_tools
            msgs = _messages(messages)
            try:
                rendered = tok.apply_chat_template(
                    msgs, add_generation_prompt=True, tokenize=False, **kwargs
                )
            except BadRequest:
                raise
            except Exception as e:  # jinja raise_exception(), bad roles, ...
                raise BadRequest(f"chat template rejected the messages: {e}") from None
            ids = list(tok.encode(rendered, add_special_tokens=False))
            chat = (msgs, kwargs)
        else:
            ids = list(token_ids)
            bad = [t for t in ids if t >= summary.vocab_size]
            if bad:
                raise BadRequest(
                    f"token id {bad[0]} out of range: the vocabulary has {summary.vocab_size} ids"
                )
            rendered = tok.decode(ids[-16:])
    if not ids:
        raise BadRequest("the input encodes to zero tokens")
    return Rendered(ids, rendered, template_tools, chat)


def chat_boundaries(engine: Engine, messages: list[dict[str, Any]], ids: list[int],
                    template_kwargs: dict[str, Any]) -> tuple[int, ...]:
    """Where the messages end in ``ids``, when the engine snapshots there (a hybrid
    model with the prefix cache on); else nothing, to spare the probe renderings.
    ``messages`` and ``template_kwargs`` (tools, enable_thinking, chat_template_kwargs)
    must be exactly what rendered ``ids``, so the probes render the same conversation."""
    if not messages or not engine.snapshots_boundaries:
        return ()
    with engine.tokenizer_lock:
        return message_boundaries(engine.tokenizer, messages, ids, template_kwargs)


def _check_range(name: str, value: float, lo: float, hi: float, lo_open=False) -> None:
    if math.isnan(value) or value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise BadRequest(f"{name} must be in {left}{lo}, {hi}], got {value}")


def resolve_sampling(p: pb.SamplingParams, d: Defaults) -> Sampling:
    def get(name: str, default: Any) -> Any:
        return getattr(p, name) if p.HasField(name) else default

    s = Sampling(
        temperature=get("temperature", d.temperature),
        top_p=get("top_p", d.top_p),
        top_k=get("top_k", d.top_k),
        min_p=get("min_p", d.min_p),
        repetition_penalty=get("repetition_penalty", d.repetition_penalty),
        presence_penalty=get("presence_penalty", None),
        frequency_penalty=get("frequency_penalty", None),
        seed=get("seed", None),
    )
    _check_range("temperature", s.temperature, 0.0, 100.0)
    _check_range("top_p", s.top_p, 0.0, 1.0, lo_open=True)
    _check_range("min_p", s.min_p, 0.0, 1.0)
    if s.min_p >= 1.0:
        raise BadRequest("min_p must be < 1")
    if s.top_k < 0:
        raise BadRequest(f"top_k must be >= 0, got {s.top_k}")
    if s.repetition_penalty is not None:
        _check_range("repetition_penalty", s.repetition_penalty, 0.0, 10.0, lo_open=True)
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(s, name)
        if v is not None:
            _check_range(name, v, -2.0, 2.0)
    return s


def build_request(r: pb.GenerateRequest, engine: Engine, defaults: Defaults) -> GenerationRequest:
    """Validate a GenerateRequest and turn it into an engine request (BadRequest if not)."""
    if r.HasField("max_tokens") and r.max_tokens <= 0:
        raise BadRequest(f"max_tokens must be > 0, got {r.max_tokens}", "max_tokens")
    if r.adapter and r.adapter not in engine.adapter_names:
        names = ", ".join(engine.adapter_names) or "none"
        raise UnknownAdapter(f"unknown adapter '{r.adapter}' (registered: {names})", "adapter")
    if len(r.stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(r.stop)}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in r.stop):
        raise BadRequest(f"stop strings must be 1-{MAX_STOP_LENGTH} characters")
    if r.top_logprobs > MAX_TOP_LOGPROBS:
        raise BadRequest(f"top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {r.top_logprobs}")
    if r.top_logprobs and not r.logprobs:
        raise BadRequest("top_logprobs needs logprobs = true")
    summary = engine.summary
    bad = [t for t in r.stop_token_ids if t >= summary.vocab_size]
    if bad:
        raise BadRequest(f"stop token id {bad[0]} out of range (vocabulary: {summary.vocab_size})")
    sampling = resolve_sampling(r.sampling, defaults)
    check_tool_choice(r.tool_choice)
    offered = r.tools if r.tool_choice != "none" else ()
    got = _render(
        engine,
        text=r.prompt,
        messages=r.messages,
        token_ids=r.token_ids,
        enable_thinking=r.enable_thinking if r.HasField("enable_thinking") else None,
        tools=offered,
        chat_template_kwargs_json=r.chat_template_kwargs_json,
    )
    ids = got.ids
    limit = summary.context_length
    if len(ids) >= limit:
        raise PromptTooLong(
            f"prompt has {len(ids)} tokens; the model's context limit is {limit} "
            f"(prompt + at least one generated token)"
        )
    return GenerationRequest(
        request_id=r.request_id or uuid.uuid4().hex,
        prompt_tokens=ids,
        max_tokens=r.max_tokens if r.HasField("max_tokens") else defaults.max_tokens,
        sampling=sampling,
        stop=tuple(r.stop),
        stop_token_ids=frozenset(r.stop_token_ids),
        ignore_eos=r.ignore_eos,
        logprobs=r.logprobs,
        top_logprobs=r.top_logprobs,
        adapter=r.adapter or None,
        initial_channel=initial_channel(got.text, *summary.think_tags),
        boundaries=chat_boundaries(engine, got.chat[0], ids, got.chat[1]) if got.chat else (),
        tools=tuple(got.tools) or None,
    )
