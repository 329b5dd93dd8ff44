"""Message boundaries of chat input: every offset is a prefix of the request's tokens
and of any conversation that shares the messages up to there."""

from __future__ import annotations

import pytest

from optiq.runtime.boundaries import MAX_BOUNDARIES, candidate_prefixes, message_boundaries


@pytest.fixture(scope="module")
def tok(bundled_model_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(bundled_model_dir)


def render(tok, msgs) -> list[int]:
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(tok.encode(text, add_special_tokens=False))


CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a story."},
]


def test_boundaries_are_shared_by_conversations_that_share_the_messages(tok):
    ids = render(tok, CHAT)
    bounds = message_boundaries(tok, CHAT, ids)
    assert len(bounds) == 4 and list(bounds) == sorted(bounds)
    assert all(0 < b < len(ids) - 1 for b in bounds)
    for k, b in zip(range(1, 5), bounds):
        # the same messages up to k, then something else (in the role of the message
        # that comes next: a boundary includes the next message's header): same
        # tokens up to b
        role = CHAT[k]["role"] if k < len(CHAT) else "user"
        for tail in ([{"role": role, "content": "Something else entirely."}],
                     [{"role": role, "content": "Q"}, {"role": "user", "content": "A"}]):
            other = render(tok, CHAT[:k] + tail)
            assert other[:b] == ids[:b], (k, tok.decode(ids[:b])[-40:])
    # the assistant message (rendered differently when no user message follows it,
    # in this template) ends after its <|im_end|>, inside the shared rendering
    assert tok.decode(ids[: bounds[2]]).endswith("How can I help?<|im_end|>\n<|im_start|>user\n")


def test_rejected_prefixes_are_skipped_and_count_is_bounded(tok):
    class Picky:
        """A template that needs a user message (as Qwen3.5's does)."""

        def apply_chat_template(self, msgs, **kw):
            if not any(m["role"] == "user" and m["content"] != "\u2063\u2063" for m in msgs):
                raise ValueError("No user query found in messages.")
            return tok.apply_chat_template(msgs, **kw)

        def encode(self, text, **kw):
            return tok.encode(text, **kw)

    ids = render(tok, CHAT)
    assert message_boundaries(Picky(), CHAT, ids) == message_boundaries(tok, CHAT, ids)[1:]
    long = CHAT + [m for _ in range(10) for m in CHAT[1:3]]
    long_ids = render(tok, long)
    got = message_boundaries(tok, long, long_ids)
    assert len(got) == MAX_BOUNDARIES == len(candidate_prefixes(len(long)))
    assert candidate_prefixes(len(long)) == [1, len(long) - 2, len(long) - 1, len(long)]
    assert candidate_prefixes(1) == [1] and candidate_prefixes(0) == []
