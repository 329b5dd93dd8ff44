"""A small Python client for ``optiq.v1.GenerationService`` (no MLX imports).

    from optiq.runtime.client import Client
    with Client("127.0.0.1:50051") as c:
        for ev in c.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=64):
            ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from optiq.v1 import generation_pb2 as pb
from optiq.v1 import generation_pb2_grpc as pb_grpc

from .config import API_KEY_ENV, DEFAULT_MAX_MESSAGE_BYTES

SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


class _BearerAuth(grpc.AuthMetadataPlugin):
    def __init__(self, key: str):
        self._key = key

    def __call__(self, context: Any, callback: Any) -> None:
        callback((("authorization", f"Bearer {self._key}"),), None)


def make_channel(
    target: str,
    *,
    api_key: str | None = None,
    tls: bool = False,
    tls_ca: str | Path | None = None,
    tls_server_name: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> grpc.Channel:
    """A channel with message-size limits; bearer token as metadata.

    Without TLS the token is sent in clear text: fine on loopback, so it is attached
    per call (see :class:`Client`) rather than through channel credentials, which gRPC
    only allows over TLS.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    if tls or tls_ca:
        roots = Path(tls_ca).read_bytes() if tls_ca else None
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
        if api_key:
            creds = grpc.composite_channel_credentials(
                creds, grpc.metadata_call_credentials(_BearerAuth(api_key))
            )
        return grpc.secure_channel(target, creds, options=options)
    return grpc.insecure_channel(target, options=options)


def _messages(messages: Sequence[Any]) -> list[pb.ChatMessage]:
    """``pb.ChatMessage`` or dicts: role, content, and optionally reasoning_content,
    tool_calls (``{"id", "name", "arguments"}``, arguments a dict or JSON text),
    tool_call_id and name."""
    out = []
    for m in messages:
        if isinstance(m, pb.ChatMessage):
            out.append(m)
            continue
        calls = [
            pb.ToolCall(id=c.get("id", ""), name=c["name"],
                        arguments_json=c["arguments"] if isinstance(c.get("arguments"), str)
                        else json.dumps(c.get("arguments") or {}))
            for c in m.get("tool_calls") or ()
        ]
        out.append(pb.ChatMessage(
            role=m["role"], content=m.get("content") or "",
            reasoning_content=m.get("reasoning_content") or "", tool_calls=calls,
            tool_call_id=m.get("tool_call_id") or "", name=m.get("name") or "",
        ))
    return out


def _tools(tools: Sequence[Any]) -> list[pb.Tool]:
    """``pb.Tool`` or dicts ``{"name", "description", "parameters"}`` (a JSON Schema)."""
    return [
        t if isinstance(t, pb.Tool) else pb.Tool(
            name=t["name"], description=t.get("description", ""),
            parameters_json=json.dumps(t["parameters"]) if t.get("parameters") else "",
        )
        for t in tools
    ]


def generate_request(
    *,
    prompt: str = "",
    messages: Sequence[Any] = (),
    token_ids: Sequence[int] = (),
    enable_thinking: bool | None = None,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
    adapter: str = "",
    request_id: str = "",
    tools: Sequence[Any] = (),
    tool_choice: str = "",
    chat_template_kwargs: dict | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown generate() argument(s): {', '.join(sorted(unknown))}")
    req = pb.GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        messages=_messages(messages),
        token_ids=list(token_ids),
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        adapter=adapter,
        tools=_tools(tools),
        tool_choice=tool_choice,
        chat_template_kwargs_json=json.dumps(chat_template_kwargs) if chat_template_kwargs else "",
        sampling=pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None}),
    )
    if enable_thinking is not None:
        req.enable_thinking = enable_thinking
    if max_tokens is not None:
        req.max_tokens = max_tokens
    return req


class Client:
    """Thin wrapper over the generated stub: auth metadata, limits, health."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.target = target
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.secure = bool(tls or tls_ca)
        self.channel = make_channel(
            target,
            api_key=self.api_key if self.secure else None,
            tls=tls,
            tls_ca=tls_ca,
            tls_server_name=tls_server_name,
            max_message_bytes=max_message_bytes,
        )
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.api_key and not self.secure:
            return (("authorization", f"Bearer {self.api_key}"),)
        return ()

    def generate(self, *, timeout: float | None = None, **kwargs: Any) -> Any:
        """The response stream (iterate it; ``.cancel()`` stops generation)."""
        req = kwargs.pop("request", None) or generate_request(**kwargs)
        return self.stub.Generate(req, timeout=timeout, metadata=self.metadata)

    def tokenize(self, text: str = "", *, messages: Sequence[Any] = (), tools: Sequence[Any] = (),
                 **kw: Any) -> list[int]:
        r = self.stub.Tokenize(
            pb.TokenizeRequest(text=text, messages=_messages(messages), tools=_tools(tools), **kw),
            metadata=self.metadata,
        )
        return list(r.token_ids)

    def detokenize(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        r = self.stub.Detokenize(
            pb.DetokenizeRequest(token_ids=list(ids), skip_special_tokens=skip_special_tokens),
            metadata=self.metadata,
        )
        return r.text

    def model_info(self, timeout: float | None = None) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout,
                                      metadata=self.metadata)

    def load(self) -> pb.GetLoadResponse:
        return self.stub.GetLoad(pb.GetLoadRequest(), metadata=self.metadata)

    def health(self, service: str = "", timeout: float = 5.0) -> int:
        """``HealthCheckResponse.ServingStatus`` of ``service`` ("" = the whole server)."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return r.status

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Block until health says SERVING (raises TimeoutError)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=2.0) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout:.0f} s")
            time.sleep(0.1)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
