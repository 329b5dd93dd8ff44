"""Streaming text post-processing: stop strings and reasoning channels.

Both work on decoded text, not token ids, because a stop string or a ``</think>`` tag
can be split across tokens in many ways. Each holds back the shortest tail that could
still become a match, so text is released as early as it is known to be final.
Pure Python: no MLX, no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTENT = "content"
REASONING = "reasoning"
TOOL_CALL = "tool_call"  # token ids of a tool call being written (no text)


def _held_tail(text: str, patterns: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a pattern."""
    best = 0
    for p in patterns:
        for k in range(min(len(p) - 1, len(text)), best, -1):
            if text.endswith(p[:k]):
                best = k
                break
    return best


class StopMatcher:
    """Finds the first stop string in a stream of text chunks.

    ``push`` returns the text that can be released; once a stop string is found,
    ``matched`` names it and everything from it on is dropped.
    """

    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            self.matched = s
            self._pending = ""
            return buf[:i]
        keep = _held_tail(buf, self.stops)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Release held-back text at the end of the stream (no stop string came)."""
        out, self._pending = self._pending, ""
        return out


@dataclass
class Segment:
    channel: str
    text: str


class ChannelSplitter:
    """Splits text into content and reasoning at ``<think>``/``</think>`` tags.

    The tags themselves are removed. ``channel`` is the channel the next text
    belongs to; a prompt that ends inside an open think block starts in reasoning.
    """

    def __init__(
        self,
        start_tag: str | None = "<think>",
        end_tag: str | None = "</think>",
        initial: str = CONTENT,
    ):
        self.start_tag = start_tag
        self.end_tag = end_tag
        self.channel = initial
        self._pending = ""

    def _tag(self) -> str | None:
        return self.end_tag if self.channel == REASONING else self.start_tag

    def push(self, text: str) -> list[Segment]:
        """Segments (possibly empty text) in order; the last is on the current channel."""
        buf = self._pending + text
        self._pending = ""
        segments: list[Segment] = []
        while True:
            tag = self._tag()
            if not tag:
                segments.append(Segment(self.channel, buf))
                return segments
            i = buf.find(tag)
            if i < 0:
                break
            segments.append(Segment(self.channel, buf[:i]))
            buf = buf[i + len(tag) :]
            self.channel = CONTENT if self.channel == REASONING else REASONING
        keep = _held_tail(buf, (tag,))
        if keep:
            self._pending = buf[len(buf) - keep :]
            buf = buf[: len(buf) - keep]
        segments.append(Segment(self.channel, buf))
        return segments

    def flush(self) -> list[Segment]:
        out, self._pending = self._pending, ""
        return [Segment(self.channel, out)]


def initial_channel(prompt_text: str, start_tag: str | None, end_tag: str | None) -> str:
    """REASONING when the prompt ends inside an open think block (e.g. a chat template
    that appends ``<think>\\n`` to start the answer in thinking mode)."""
    if not start_tag or not end_tag:
        return CONTENT
    return REASONING if prompt_text.rfind(start_tag) > prompt_text.rfind(end_tag) else CONTENT
