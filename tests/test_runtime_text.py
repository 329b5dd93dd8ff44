"""Stop strings, reasoning channels and per-token deltas (pure Python, no model)."""

from __future__ import annotations

import pytest

from optiq.runtime.output import OutputProcessor
from optiq.runtime.text import (
    CONTENT,
    REASONING,
    ChannelSplitter,
    StopMatcher,
    initial_channel,
)


def feed(stop: StopMatcher, chunks: list[str]) -> str:
    out = "".join(stop.push(c) for c in chunks)
    return out if stop.matched else out + stop.flush()


@pytest.mark.parametrize(
    "chunks",
    [["Hello ", "wor", "ld END more"], ["Hello world E", "N", "D"], ["Hello world END"]],
)
def test_stop_string_across_chunks(chunks):
    stop = StopMatcher(["END"])
    assert feed(stop, chunks) == "Hello world "
    assert stop.matched == "END"


def test_stop_holds_back_only_possible_prefixes():
    stop = StopMatcher(["<|x|>"])
    assert stop.push("abc<|") == "abc"  # "<|" could start the stop string
    assert stop.push("y") == "<|y"  # it did not
    assert stop.flush() == ""
    assert stop.matched is None


def test_earliest_of_several_stops_wins():
    stop = StopMatcher(["world", "lo w"])
    assert feed(stop, ["hello world"]) == "hel"
    assert stop.matched == "lo w"


def test_no_stop_passes_through_and_flushes():
    stop = StopMatcher(["ZZZ"])
    assert feed(stop, ["ab", "cZ", "Z"]) == "abcZZ"
    assert stop.matched is None


def segs(splitter: ChannelSplitter, chunks: list[str]) -> list[tuple[str, str]]:
    out = []
    for c in chunks:
        out += [(s.channel, s.text) for s in splitter.push(c)]
    out += [(s.channel, s.text) for s in splitter.flush()]
    merged: list[tuple[str, str]] = []
    for ch, t in out:
        if not t:
            continue
        if merged and merged[-1][0] == ch:
            merged[-1] = (ch, merged[-1][1] + t)
        else:
            merged.append((ch, t))
    return merged


@pytest.mark.parametrize(
    "chunks",
    [
        ["<think>plan</think>answer"],
        ["<thi", "nk>pl", "an</th", "ink>ans", "wer"],
        ["<", "t", "h", "i", "n", "k", ">", "plan", "<", "/think>", "answer"],
    ],
)
def test_channels_split_at_tags_however_tokenized(chunks):
    assert segs(ChannelSplitter(), chunks) == [(REASONING, "plan"), (CONTENT, "answer")]


def test_prompt_ending_in_open_think_starts_in_reasoning():
    assert initial_channel("<|im_start|>assistant\n<think>\n", "<think>", "</think>") == REASONING
    assert initial_channel("x<think>\n\n</think>\n\n", "<think>", "</think>") == CONTENT
    assert initial_channel("plain", "<think>", "</think>") == CONTENT
    assert initial_channel("<think>", None, None) == CONTENT
    s = ChannelSplitter(initial=REASONING)
    assert segs(s, ["still thinking</think>done"]) == [(REASONING, "still thinking"), (CONTENT, "done")]


def test_partial_tag_at_end_is_flushed_as_text():
    assert segs(ChannelSplitter(), ["a <thi"]) == [(CONTENT, "a <thi")]


class CharDetok:
    """One token = one vocabulary string (enough to drive the output pipeline)."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def reset(self):
        self.text, self.offset, self.tokens = "", 0, []

    def add_token(self, t):
        self.tokens.append(t)
        self.text += self.vocab[t]

    def finalize(self):
        pass

    @property
    def last_segment(self):
        seg = self.text[self.offset:]
        self.offset = len(self.text)
        return seg


VOCAB = ["<think>", "I should", " greet", "</think>", "Hello", " there", "!", "<eos>", "</th", "ink>"]


def run(tokens, *, stops=(), initial=CONTENT, stop_token_at=None):
    out = OutputProcessor(
        CharDetok(VOCAB), stops=tuple(stops), think_tags=("<think>", "</think>"), initial_channel=initial
    )
    deltas = []
    for i, t in enumerate(tokens):
        last = i == len(tokens) - 1
        deltas += out.step(t, stop_token=(i == stop_token_at), last=last and stop_token_at is None)
        if out.stopped:
            break
    return out, deltas


def test_deltas_carry_ids_channels_and_count_reasoning():
    out, deltas = run([0, 1, 2, 3, 4, 5, 6])
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == [0, 1, 2, 3, 4, 5, 6]
    reasoning = "".join(d.text for d in deltas if d.channel == REASONING)
    content = "".join(d.text for d in deltas if d.channel == CONTENT)
    assert reasoning == "I should greet" and content == "Hello there!"
    # the two tag tokens and the two reasoning words are reasoning tokens
    assert out.reasoning_tokens == 4 and out.completion_tokens == 7


def test_tag_split_over_tokens_and_stop_token_not_returned():
    out, deltas = run([1, 8, 9, 4, 7], initial=REASONING, stop_token_at=4)
    assert [t for d in deltas for t in d.token_ids] == [1, 8, 9, 4]  # <eos> (7) is not returned
    assert "".join(d.text for d in deltas if d.channel == CONTENT) == "Hello"
    assert "".join(d.text for d in deltas if d.channel == REASONING) == "I should"
    assert out.completion_tokens == 5


def test_stop_string_truncates_and_reports():
    out, deltas = run([4, 5, 6], stops=["there"])
    assert out.stopped == "there"
    assert "".join(d.text for d in deltas) == "Hello "
