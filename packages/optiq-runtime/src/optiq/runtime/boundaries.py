"""Token offsets where the messages of a chat input end, for prefix-cache snapshots.

A hybrid model's recurrent state cannot be trimmed back, so a later request can only
resume from a state snapshotted at a token offset it shares with this one. Requests
that share a conversation up to some message (an edited last message, a new agent
session on the same system prompt and tools) share the rendering of those messages:
the engine snapshots there (:mod:`optiq.runtime.engine`).

Chat templates are not always prefix-stable (the bundled Qwen-style template renders
an assistant message differently when no user message follows it; Qwen3.5's raises
for a lone system message), and a prefix's tokenization can differ from the same text
inside the whole rendering (BPE merges across the cut). So the offset of message
``k``'s end is found by rendering ``messages[:k]`` plus a *probe* message (the role of
the real next message, or ``user`` at the end, with content no message starts with)
and taking the longest common *token* prefix of that rendering with the real one.
Every offset is therefore a verified prefix of this request's tokens, and it is where
any conversation that shares ``messages[:k]`` and goes on differently also starts.
Pure Python: no MLX; the caller holds the tokenizer lock.
"""

from __future__ import annotations

from typing import Any

# Most boundary snapshots per request: each stores a copy of the attention layers'
# KV prefix besides the recurrent state, so they are few and chosen (see below).
MAX_BOUNDARIES = 4

# Content of the probe message: nothing a real message starts with.
_PROBE = "\u2063\u2063"


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def candidate_prefixes(n: int, limit: int = MAX_BOUNDARIES) -> list[int]:
    """Which message counts ``k`` to find boundaries for, at most ``limit``: the first
    message (a system prompt with tools, shared by every session of an agent) and the
    last ones (an edited or regenerated last message; the end of the last message,
    where the next turn goes on when the template re-renders the answer differently)."""
    if n <= 0 or limit <= 0:
        return []
    ks, k = [1], n
    while len(ks) < limit and k > 1:
        ks.append(k)
        k -= 1
    return sorted(ks)


def message_boundaries(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    ids: list[int],
    template_kwargs: dict[str, Any] | None = None,
    limit: int = MAX_BOUNDARIES,
) -> tuple[int, ...]:
    """Sorted token offsets ``0 < b < len(ids) - 1`` (at most ``limit``) where a prefix
    of ``messages`` ends in ``ids``, the tokens of the whole rendering. A prefix the
    template rejects is skipped."""
    kwargs = dict(template_kwargs or {})
    found: set[int] = set()
    for k in candidate_prefixes(len(messages), limit):
        # after the last message the probe is a user turn: the next request's
        # rendering goes on with the answer, which no probe can predict
        role = messages[k]["role"] if k < len(messages) else "user"
        probe = list(messages[:k]) + [{"role": role, "content": _PROBE}]
        try:
            text = tokenizer.apply_chat_template(
                probe, add_generation_prompt=False, tokenize=False, **kwargs
            )
            other = list(tokenizer.encode(text, add_special_tokens=False))
        except Exception:  # the template rejects this prefix (roles, no user query, ...)
            continue
        b = _common(ids, other)
        # the last prompt token is always recomputed, so a boundary there adds nothing
        if 0 < b < len(ids) - 1:
            found.add(b)
    return tuple(sorted(found))
