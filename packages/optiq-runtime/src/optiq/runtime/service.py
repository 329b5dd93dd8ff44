"""The ``optiq.v1.GenerationService`` servicer: validates requests, hands them to the
engine and streams its events back. Runs on gRPC worker threads; never touches MLX."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Iterator

import grpc
from optiq.v1 import generation_pb2 as pb
from optiq.v1 import generation_pb2_grpc as pb_grpc

from .boundaries import message_boundaries
from .config import Defaults
from .engine import Engine, NotServing, QueueFull
from .text import initial_channel
from .types import (
    CANCELLED,
    CONTENT,
    EOS,
    ERROR,
    LENGTH,
    STOP,
    Delta,
    Finished,
    GenerationRequest,
    Sampling,
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
}
_CHANNELS = {CONTENT: pb.CHANNEL_CONTENT, "reasoning": pb.CHANNEL_REASONING}


class BadRequest(ValueError):
    """A request the client must fix (INVALID_ARGUMENT)."""


def _messages(msgs: Any) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(msgs):
        if not m.role:
            raise BadRequest(f"messages[{i}].role is empty")
        out.append({"role": m.role, "content": m.content})
    return out


def render_input(
    engine: Engine,
    *,
    text: str,
    messages: Any,
    token_ids: Any = (),
    enable_thinking: bool | None,
) -> tuple[list[int], str]:
    """Token ids of exactly one input, and the text used to find the start channel."""
    given = [n for n, v in (("prompt", text), ("messages", messages), ("token_ids", token_ids)) if v]
    if not given:
        raise BadRequest("empty input: set exactly one of prompt, messages or token_ids")
    if len(given) > 1:
        raise BadRequest(f"set exactly one input, got {' and '.join(given)}")
    if enable_thinking is not None and not messages:
        raise BadRequest("enable_thinking applies only to messages (chat input)")
    tok = engine.tokenizer
    summary = engine.summary
    with engine.tokenizer_lock:
        if text:
            ids = list(tok.encode(text))
            rendered = text
        elif messages:
            if not summary.has_chat_template:
                raise BadRequest("this model has no chat template: send a plain prompt")
            kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
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
    return ids, rendered


def chat_boundaries(engine: Engine, messages: Any, ids: list[int],
                    enable_thinking: bool | None) -> tuple[int, ...]:
    """Where the messages end in ``ids``, when the engine snapshots there (a hybrid
    model with the prefix cache on); else nothing, to spare the probe renderings."""
    if not messages or not engine.snapshots_boundaries:
        return ()
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    with engine.tokenizer_lock:
        return message_boundaries(engine.tokenizer, _messages(messages), ids, kwargs)


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
        raise BadRequest(f"max_tokens must be > 0, got {r.max_tokens}")
    if r.adapter and r.adapter not in engine.adapter_names:
        names = ", ".join(engine.adapter_names) or "none"
        raise BadRequest(f"unknown adapter '{r.adapter}' (registered: {names})")
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
    thinking = r.enable_thinking if r.HasField("enable_thinking") else None
    ids, rendered = render_input(
        engine,
        text=r.prompt,
        messages=r.messages,
        token_ids=r.token_ids,
        enable_thinking=thinking,
    )
    limit = summary.context_length
    if len(ids) >= limit:
        raise BadRequest(
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
        boundaries=chat_boundaries(engine, r.messages, ids, thinking),
    )


def _delta_pb(d: Delta) -> pb.TokenDelta:
    out = pb.TokenDelta(text=d.text, token_ids=d.token_ids, channel=_CHANNELS[d.channel])
    for lp in d.logprobs:
        out.logprobs.add(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_logprobs=[pb.TopLogprob(token_id=t.token_id, logprob=t.logprob, token=t.text)
                          for t in lp.top],
        )
    return out


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
                else:
                    yield pb.GenerateResponse(request_id=rid, finished=finished_pb(e))
                    if e.reason == ERROR:
                        context.abort(grpc.StatusCode.INTERNAL, e.error or "generation failed")
                    return

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext
                 ) -> pb.TokenizeResponse:
        self._ready(context)
        try:
            ids, _ = render_input(
                self.engine,
                text=request.text,
                messages=request.messages,
                enable_thinking=request.enable_thinking
                if request.HasField("enable_thinking") else None,
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
