"""Plain data exchanged between RPC handlers and the generation thread (no MLX)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .text import CONTENT

# Finish reasons (mirrors optiq.v1.FinishReason).
LENGTH = "length"
STOP = "stop"
EOS = "eos"
CANCELLED = "cancelled"
ERROR = "error"
TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class Sampling:
    """Resolved sampling settings of one request (server defaults filled in)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationRequest:
    """A validated, tokenized request, ready for the engine."""

    request_id: str
    prompt_tokens: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    adapter: str | None = None
    initial_channel: str = CONTENT
    # Token offsets where chat messages end (optiq.runtime.boundaries): a hybrid model's
    # prefill snapshots its state there for the prefix cache. Empty for plain prompts.
    boundaries: tuple[int, ...] = ()
    # Tool definitions as the chat template saw them ({"type": "function", "function":
    # {...}}); None: the output is not parsed for tool calls.
    tools: tuple[dict, ...] | None = None


@dataclass
class TopToken:
    token_id: int
    logprob: float
    text: str


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopToken] = field(default_factory=list)
    text: str = ""


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    channel: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # The text is a tool call the model wrote that could not be parsed (returned as is).
    malformed_tool_call: bool = False


@dataclass
class ToolCall:
    """One parsed tool call; ``arguments`` is the arguments object as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass
class Usage:
    prompt_tokens: int = 0
    # Of prompt_tokens, those reused from the prefix cache (not prefilled again).
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    queue_time_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_time_ms: float = 0.0
    total_time_ms: float = 0.0


@dataclass
class Finished:
    reason: str
    usage: Usage
    stop_sequence: str = ""
    stop_token_id: int | None = None
    error: str = ""


Event = Delta | ToolCall | Finished
