"""The ``optiq.v1.GenerationService`` servicer: validates requests (:mod:`.request`),
hands them to the engine and streams its events back. Runs on gRPC worker threads;
never touches MLX."""

from __future__ import annotations

import time
from typing import Iterator

import grpc
from optiq.v1 import generation_pb2 as pb
from optiq.v1 import generation_pb2_grpc as pb_grpc

from .config import Defaults
from .engine import Engine, NotServing, QueueFull
from .request import (
    BadRequest,
    PromptTooLong,
    UnknownAdapter,
    build_request,
    chat_boundaries,
    render_input,
)
from .text import REASONING, TOOL_CALL
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
    ToolCall,
)

__all__ = ["BadRequest", "PromptTooLong", "UnknownAdapter", "GenerationService",
           "build_request", "chat_boundaries", "render_input"]

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
            self.engine.count_invalid()  # QueueFull is counted by the engine, under its lock
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
            requests_invalid=st.invalid,
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
