"""Turns one request's generated token ids into client-facing events.

Pipeline per token: streaming detokenizer -> stop strings -> reasoning channels ->
tool calls (content text only, for requests with tools). Runs on the generation
thread; no MLX calls.
"""

from __future__ import annotations

from typing import Any, Callable

from .text import CONTENT, REASONING, TOOL_CALL, ChannelSplitter, Segment, StopMatcher
from .tools import CALL, TEXT, ToolCallSplitter, parse_calls
from .types import Delta, TokenLogprob, ToolCall


class OutputProcessor:
    """Per-request output state.

    ``step`` consumes one generated token and returns the events it releases (deltas,
    and parsed tool calls when ``tool_format`` is given: ``(start_tag, end_tag,
    parser)``).
    ``stop_token=True`` marks an EOS / stop-id token: it ends the stream and is
    neither decoded nor returned (the final event names it). After a stop string
    matched (``stopped``), the request must end.
    """

    def __init__(
        self,
        detokenizer: Any,
        *,
        stops: tuple[str, ...] = (),
        think_tags: tuple[str | None, str | None] = (None, None),
        initial_channel: str = "content",
        tool_format: tuple[str, str, Callable[..., Any]] | None = None,
        tools: tuple[dict, ...] | None = None,
    ):
        self.detok = detokenizer
        self.detok.reset()
        _keep_leading_space(self.detok)
        self.stop = StopMatcher(stops)
        self.splitter = ChannelSplitter(*think_tags, initial=initial_channel)
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.tool_calls = 0
        self.calls = ToolCallSplitter(*tool_format[:2]) if tool_format else None
        self._parser = tool_format[2] if tool_format else None
        self._tools = tools

    @property
    def stopped(self) -> str | None:
        """The stop string that matched, if any."""
        return self.stop.matched

    def step(
        self,
        token: int,
        *,
        stop_token: bool = False,
        last: bool = False,
        logprob: TokenLogprob | None = None,
    ) -> list[Delta | ToolCall]:
        self.completion_tokens += 1
        if stop_token:
            self.detok.finalize()
            ids: list[int] = []
        else:
            self.detok.add_token(token)
            if last:
                self.detok.finalize()
            ids = [token]
        released = self.stop.push(self.detok.last_segment)
        final = stop_token or last or self.stop.matched is not None
        if final and self.stop.matched is None:
            released += self.stop.flush()
        before = self.splitter.channel
        segments = self.splitter.push(released)
        if final:
            segments += self.splitter.flush()
        changed = self.splitter.channel != before
        in_call = self.calls is not None and self.calls.inside
        events = self._route(segments, final)
        in_call = in_call or (self.calls is not None and self.calls.inside)

        if not ids:
            return events
        head = events[0] if events else None
        if isinstance(head, Delta):
            id_channel = head.channel
        elif in_call or isinstance(head, ToolCall):
            id_channel = TOOL_CALL
        else:  # text held back, or a bare <think>/</think> tag: tags count as reasoning
            id_channel = REASONING if changed else self.splitter.channel
        if id_channel == REASONING:
            self.reasoning_tokens += 1
        lps = [logprob] if logprob is not None else []
        if isinstance(head, Delta) and head.channel == id_channel:
            head.token_ids = ids
            head.logprobs = lps
        else:
            events.insert(0, Delta("", ids, id_channel, lps))
        return events

    def _route(self, segments: list[Segment], final: bool) -> list[Delta | ToolCall]:
        """Deltas for text segments; content goes through the tool-call splitter."""
        out: list[Delta | ToolCall] = []
        for s in segments:
            if not s.text:
                continue
            if self.calls is None or s.channel != CONTENT:
                _append_text(out, s.channel, s.text)
                continue
            for kind, text in self.calls.push(s.text):
                self._emit(out, kind, text)
        if final and self.calls is not None:
            for kind, text in self.calls.flush():
                self._emit(out, kind, text)
        return out

    def _emit(self, out: list[Delta | ToolCall], kind: str, text: str) -> None:
        if kind == TEXT:
            _append_text(out, CONTENT, text)
            return
        assert self.calls is not None and self._parser is not None
        calls = parse_calls(text, self._parser, self._tools) if kind == CALL else None
        if calls:
            out.extend(calls)
            self.tool_calls += len(calls)
            return
        raw = self.calls.start_tag + text + (self.calls.end_tag if kind == CALL else "")
        out.append(Delta(raw, [], CONTENT, malformed_tool_call=True))


def _keep_leading_space(detok: Any) -> None:
    """mlx-lm's byte-level BPE detokenizer drops the first token's leading space (right
    for SentencePiece's word marker, wrong for GPT-style BPE, where " brown" after
    "the quick" is real text). Priming its text with a placeholder that ``last_segment``
    never returns keeps the space."""
    from optiq.core.mlx_lm_seam import prime_bpe_detokenizer

    prime_bpe_detokenizer(detok, "\x00")


def _append_text(out: list[Delta | ToolCall], channel: str, text: str) -> None:
    last = out[-1] if out else None
    if isinstance(last, Delta) and last.channel == channel and not last.malformed_tool_call:
        last.text += text
    else:
        out.append(Delta(text, [], channel))
