"""The ``optiq.v1.GenerationService`` servicer: validates requests, hands them to the
engine and streams its events back. Runs on gRPC worker threads; never touches MLX."""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any, Iterator

import grpc
from optiq.v1 import generation_pb2 as pb
from optiq.v1 import generation_pb2_grpc as pb_grpc

from .config import Defaults
from .engine import Engine, NotServing, QueueFull
from .text import REASONING, TOOL_CALL, initial_channel
from .tools import TOOL_NAME, template_tool, template_tool_call
from .types import (
    CANCELLED,
    CONTENT,
    EOS,
    ERROR,
    LENGTH,
    STOP,
    TOOL_CALLS,
    Delta,
    Finished,
    GenerationRequest,
    Sampling,
    ToolCall,
)

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20

_REASONS = {
    LENGTH: pb.FINISH_REASON_LENGTH,
    STOP: pb.FINISH_REASON_STOP,
    EOS: pb.FINISH_REASON_EOS,
    CANCELLED: pb.FINISH_REASON_CANCELLED,
    ERROR: pb.FINISH_REASON_ERROR,
    TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_CHANNELS = {
    CONTENT: pb.CHANNEL_CONTENT,
    REASONING: pb.CHANNEL_REASONING,
    TOOL_CALL: pb.CHANNEL_TOOL_CALL,
}
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
            try:
                rendered = tok.apply_chat_template(
                    _messages(messages), add_generation_prompt=True, tokenize=False, **kwargs
                )
            except BadRequest:
                raise
            except Exception as e:  # jinja raise_exception(), bad roles, ...
                raise BadRequest(f"chat template rejected the messages: {e}") from None
            ids = list(tok.encode(rendered, add_special_tokens=False))
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
    return ids, rendered, template_tools


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
    ids, rendered, tools = render_input(
        engine,
        text=r.prompt,
        messages=r.messages,
        token_ids=r.token_ids,
        enable_thinking=r.enable_thinking if r.HasField("enable_thinking") else None,
        tools=offered,
        chat_template_kwargs_json=r.chat_template_kwargs_json,
    )
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
        initial_channel=initial_channel(rendered, *summary.think_tags),
        tools=tuple(tools) or None,
    )


def _delta_pb(d: Delta) -> pb.TokenDelta:
    out = pb.TokenDelta(text=d.text, token_ids=d.token_ids, channel=_CHANNELS[d.channel],
                        malformed_tool_call=d.malformed_tool_call)
    for lp in d.logprobs:
        out.logprobs.add(
            token_id=lp.token_id,
            logprob=lp.logprob,
            token=lp.text,
            top_logprobs=[pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.text)
                          for t in lp.top],
        )
    return out


def tool_call_pb(c: ToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments)


def _coalesce(events: list) -> list:
    """Merge consecutive deltas of one channel (a slow reader gets fewer, larger
    messages instead of falling behind)."""
    out: list = []
    for e in events:
        if (
            isinstance(e, Delta)
            and out
            and isinstance(out[-1], Delta)
            and out[-1].channel == e.channel
            and not (e.malformed_tool_call or out[-1].malformed_tool_call)
        ):
            prev = out[-1]
            out[-1] = Delta(
                prev.text + e.text,
                prev.token_ids + e.token_ids,
                e.channel,
                prev.logprobs + e.logprobs,
            )
        else:
            out.append(e)
    return out


def finished_pb(f: Finished) -> pb.GenerateFinished:
    u = f.usage
    out = pb.GenerateFinished(
        reason=_REASONS[f.reason],
        usage=pb.Usage(
            prompt_tokens=u.prompt_tokens,
            cached_tokens=u.cached_tokens,
            completion_tokens=u.completion_tokens,
            reasoning_tokens=u.reasoning_tokens,
            queue_time_ms=u.queue_time_ms,
            time_to_first_token_ms=u.time_to_first_token_ms,
            decode_time_ms=u.decode_time_ms,
            total_time_ms=u.total_time_ms,
        ),
        stop_sequence=f.stop_sequence,
        error=f.error,
    )
    if f.stop_token_id is not None:
        out.stop_token_id = f.stop_token_id
    return out


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(self, engine: Engine, defaults: Defaults, version: str = ""):
        self.engine = engine
        self.defaults = defaults
        self.version = version

    def _ready(self, context: grpc.ServicerContext) -> None:
        if not self.engine.serving:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is draining" if self.engine.loaded else "model is still loading",
            )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[pb.GenerateResponse]:
        self._ready(context)
        try:
            req = build_request(request, self.engine, self.defaults)
            handle = self.engine.submit(req)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except NotServing as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        # Fires on cancel, disconnect, deadline and normal completion alike; False means
        # the RPC already ended (e.g. cancelled while we were tokenizing).
        if not context.add_callback(lambda: self.engine.cancel(handle)):
            self.engine.cancel(handle)
            return
        rid = req.request_id
        for events in handle.events():
            for e in _coalesce(events):
                if isinstance(e, Delta):
                    yield pb.GenerateResponse(request_id=rid, delta=_delta_pb(e))
                elif isinstance(e, ToolCall):
                    yield pb.GenerateResponse(request_id=rid, tool_call=tool_call_pb(e))
                else:
                    yield pb.GenerateResponse(request_id=rid, finished=finished_pb(e))
                    if e.reason == ERROR:
                        context.abort(grpc.StatusCode.INTERNAL, e.error or "generation failed")
                    return

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext
                 ) -> pb.TokenizeResponse:
        self._ready(context)
        try:
            ids, _, _ = render_input(
                self.engine,
                text=request.text,
                messages=request.messages,
                enable_thinking=request.enable_thinking
                if request.HasField("enable_thinking") else None,
                tools=request.tools,
                chat_template_kwargs_json=request.chat_template_kwargs_json,
            )
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        out = pb.TokenizeResponse(token_ids=ids)
        if request.return_tokens:
            with self.engine.tokenizer_lock:
                texts = [self.engine.tokenizer.decode([i]) for i in ids]
            out.tokens.extend("" if "\ufffd" in t else t for t in texts)
        return out

    def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.ServicerContext
                   ) -> pb.DetokenizeResponse:
        self._ready(context)
        vocab = self.engine.summary.vocab_size
        bad = [t for t in request.token_ids if t >= vocab]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"token id {bad[0]} out of range: the vocabulary has {vocab} ids")
        with self.engine.tokenizer_lock:
            text = self.engine.tokenizer.decode(
                list(request.token_ids), skip_special_tokens=request.skip_special_tokens
            )
        return pb.DetokenizeResponse(text=text)

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
                     ) -> pb.GetModelInfoResponse:
        self._ready(context)
        s = self.engine.summary
        d = self.defaults
        return pb.GetModelInfoResponse(
            model_id=s.model_id,
            architecture=s.architecture,
            num_layers=s.num_layers,
            hidden_size=s.hidden_size,
            vocab_size=s.vocab_size,
            context_length=s.context_length,
            num_parameters=s.num_parameters,
            quantization=pb.QuantizationInfo(
                quantized=s.quantized,
                bits_per_weight=s.bits_per_weight,
                default_bits=s.default_bits,
                default_group_size=s.default_group_size,
                layers_by_bits=s.layers_by_bits,
                summary=s.quant_summary,
            ),
            kv_cache=pb.KVCacheInfo(
                summary=s.kv_summary,
                layers=[pb.KVLayer(layer=i, k_bits=kb, v_bits=vb, group_size=g)
                        for i, kb, vb, g in s.kv_layers],
                bits_per_element=s.kv_bits,
            ),
            adapters=[
                pb.AdapterInfo(name=n, num_layers=getattr(a, "num_layers", 0))
                for n, a in sorted((self.engine.loaded.adapters or {}).items())
            ],
            default_sampling=pb.DefaultSampling(
                temperature=d.temperature,
                top_p=d.top_p,
                top_k=d.top_k,
                min_p=d.min_p,
                repetition_penalty=d.repetition_penalty,
            ),
            default_max_tokens=d.max_tokens,
            max_concurrency=self.engine.max_concurrency,
            max_queue=self.engine.max_queue,
            eos_token_ids=s.eos_token_ids,
            has_chat_template=s.has_chat_template,
            server_version=self.version,
            prompt_cache_max_bytes=self.engine.prompt_cache_bytes,
            supports_tools=s.tool_tags is not None,
            tool_call_format=s.tool_call_format,
        )

    def GetLoad(self, request: pb.GetLoadRequest, context: grpc.ServicerContext
                ) -> pb.GetLoadResponse:
        st = self.engine.load()
        return pb.GetLoadResponse(
            active_requests=st.active,
            queued_requests=st.queued,
            max_concurrency=self.engine.max_concurrency,
            max_queue=self.engine.max_queue,
            requests_total=st.requests_total,
            requests_cancelled=st.cancelled,
            requests_rejected=st.rejected,
            requests_failed=st.failed,
            generated_tokens_total=st.generated_tokens,
            prompt_tokens_total=st.prompt_tokens,
            decode_steps_total=st.decode_steps,
            uptime_s=time.time() - self.engine.started_at,
            serving=self.engine.serving,
            prompt_cache_lookups=st.prompt_cache_lookups,
            prompt_cache_hits=st.prompt_cache_hits,
            prompt_cache_tokens_total=st.prompt_cache_tokens,
            prompt_cache_bytes=st.prompt_cache_bytes,
            prompt_cache_entries=st.prompt_cache_entries,
            prompt_cache_evictions=st.prompt_cache_evictions,
        )
