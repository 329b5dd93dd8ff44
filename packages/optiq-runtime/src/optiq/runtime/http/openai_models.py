"""OpenAI request bodies (``/v1/chat/completions``, ``/v1/completions``) as pydantic models.

Typed so a wrong field is a 400 that names it. Unknown fields are ignored (clients send
many optional ones); fields this server cannot honour are refused in
:mod:`optiq.runtime.http.openai_api` with a message saying so, never silently dropped.
Value ranges (temperature, top_p, ...) are checked by the engine's request builder, as
for gRPC.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Body):
    name: str
    description: str = ""
    parameters: dict | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(_Body):
    name: str
    arguments: str = ""  # JSON text, as the API sends it


class ToolCallIn(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: FunctionName


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: str


class _Sampling(_Body):
    """Fields both endpoints share (top_k, min_p, repetition_penalty, ignore_eos are
    the vLLM / mlx-lm extensions)."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, gt=0)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    logit_bias: dict | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict | None = None
    enable_thinking: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
