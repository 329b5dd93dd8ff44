"""Turns one request's generated token ids into client-facing deltas.

Pipeline per token: streaming detokenizer -> stop strings -> reasoning channels.
Runs on the generation thread; no MLX calls.
"""

from __future__ import annotations

from typing import Any

from .text import REASONING, ChannelSplitter, Segment, StopMatcher
from .types import Delta, TokenLogprob


class OutputProcessor:
    """Per-request output state.

    ``step`` consumes one generated token and returns the deltas it releases.
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
    ):
        self.detok = detokenizer
        self.detok.reset()
        _keep_leading_space(self.detok)
        self.stop = StopMatcher(stops)
        self.splitter = ChannelSplitter(*think_tags, initial=initial_channel)
        self.completion_tokens = 0
        self.reasoning_tokens = 0

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
    ) -> list[Delta]:
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
        deltas = _merge([s for s in segments if s.text])

        if not ids:
            return deltas
        if deltas:
            id_channel = deltas[0].channel
        else:  # text held back, or a bare <think>/</think> tag: tags count as reasoning
            id_channel = REASONING if changed else self.splitter.channel
        if id_channel == REASONING:
            self.reasoning_tokens += 1
        lps = [logprob] if logprob is not None else []
        if deltas and deltas[0].channel == id_channel:
            deltas[0].token_ids = ids
            deltas[0].logprobs = lps
        else:
            deltas.insert(0, Delta("", ids, id_channel, lps))
        return deltas


def _keep_leading_space(detok: Any) -> None:
    """mlx-lm's byte-level BPE detokenizer drops the first token's leading space (right
    for SentencePiece's word marker, wrong for GPT-style BPE, where " brown" after
    "the quick" is real text). Priming its text with a placeholder that ``last_segment``
    never returns keeps the space."""
    from optiq.core.mlx_lm_seam import prime_bpe_detokenizer

    prime_bpe_detokenizer(detok, "\x00")


def _merge(segments: list[Segment]) -> list[Delta]:
    out: list[Delta] = []
    for s in segments:
        if out and out[-1].channel == s.channel:
            out[-1].text += s.text
        else:
            out.append(Delta(s.text, [], s.channel))
    return out
