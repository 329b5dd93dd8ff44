"""Tool calls in streamed text: the splitter, the parser hand-off and the output
pipeline (pure Python; the model-level round trips are in test_http_tools.py)."""

from __future__ import annotations

import json

import pytest
from mlx_lm.tool_parsers import json_tools, qwen3_coder
from test_runtime_text import CharDetok

from optiq.runtime.output import OutputProcessor
from optiq.runtime.text import CONTENT, REASONING, TOOL_CALL
from optiq.runtime.tools import ToolCallSplitter, parse_calls
from optiq.runtime.types import Delta, ToolCall

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def split(chunks):
    s = ToolCallSplitter("<tool_call>", "</tool_call>")
    items = []
    for c in chunks:
        items += s.push(c)
    return items + s.flush()


@pytest.mark.parametrize("cut", [1, 3, 5, 11, 12, 20, len(CALL) - 5, len(CALL) - 1])
def test_splitter_finds_calls_however_chunked(cut):
    text = "Sure." + CALL + "Done"
    items = split([text[:cut], text[cut:]])
    texts = "".join(t for k, t in items if k == "text")
    calls = [t for k, t in items if k == "call"]
    assert texts == "Sure.Done"
    assert calls == [CALL[len("<tool_call>"):-len("</tool_call>")]]


def test_splitter_releases_text_early_and_reports_unclosed_call():
    s = ToolCallSplitter("<tool_call>", "</tool_call>")
    assert s.push("Hello <to") == [("text", "Hello ")]  # only a possible tag is held back
    assert s.push("ol_call>{\"name\"") == []
    assert s.flush() == [("unclosed", '{"name"')]
    s = ToolCallSplitter("<tool_call>", "</tool_call>")
    assert s.push("a <tool") == [("text", "a ")]
    assert s.flush() == [("text", "<tool")]  # not a tag after all


def test_parse_calls_uses_mlx_lm_parsers_and_rejects_malformed():
    body = CALL[len("<tool_call>"):-len("</tool_call>")]
    (c,) = parse_calls(body, json_tools.parse_tool_call, None)
    assert c.name == "get_weather" and json.loads(c.arguments) == {"city": "Paris"}
    assert c.id.startswith("call_")
    xml = "\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
    (c,) = parse_calls(xml, qwen3_coder.parse_tool_call, None)
    assert c.name == "get_weather" and json.loads(c.arguments) == {"city": "Paris"}
    for bad in ('{"name": "f", "arguments": {"a": 1}', '{"arguments": {}}', '"just text"',
                '{"name": "f", "arguments": [1]}', ""):
        assert parse_calls(bad, json_tools.parse_tool_call, None) is None, bad


VOCAB = ["<think>", "plan", "</think>", "<tool_call>", '{"name": "f", ', '"arguments": {}}',
         "</tool_call>", "ok", '"arguments": {', "<eos>"]


def run(tokens, stop_token_at=None):
    out = OutputProcessor(CharDetok(VOCAB), think_tags=("<think>", "</think>"),
                          tool_format=("<tool_call>", "</tool_call>", json_tools.parse_tool_call),
                          tools=({"type": "function", "function": {"name": "f"}},))
    events = []
    for i, t in enumerate(tokens):
        last = i == len(tokens) - 1 and stop_token_at is None
        events += out.step(t, stop_token=(i == stop_token_at), last=last)
    return out, events


def test_pipeline_emits_a_tool_call_event_and_keeps_every_token_id():
    out, events = run([0, 1, 2, 7, 3, 4, 5, 6, 9], stop_token_at=8)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {})]
    deltas = [e for e in events if isinstance(e, Delta)]
    assert [t for d in deltas for t in d.token_ids] == [0, 1, 2, 7, 3, 4, 5, 6]
    by_channel = {}
    for d in deltas:
        by_channel.setdefault(d.channel, []).extend(d.token_ids)
    assert by_channel[TOOL_CALL] == [3, 4, 5, 6]  # the call's ids, text-less
    assert "".join(d.text for d in deltas if d.channel == CONTENT) == "ok"
    assert "".join(d.text for d in deltas if d.channel == REASONING) == "plan"
    assert not any(d.malformed_tool_call for d in deltas)
    assert out.tool_calls == 1 and out.reasoning_tokens == 3
    # the call event comes after the ids that wrote it
    assert events.index(calls[0]) > max(i for i, e in enumerate(events)
                                        if isinstance(e, Delta) and e.channel == TOOL_CALL)


def test_pipeline_returns_malformed_and_unclosed_calls_as_flagged_text():
    out, events = run([3, 4, 8, 6, 7], stop_token_at=None)  # arguments object never closed
    flagged = [e for e in events if isinstance(e, Delta) and e.malformed_tool_call]
    assert [d.text for d in flagged] == ['<tool_call>{"name": "f", "arguments": {</tool_call>']
    assert out.tool_calls == 0
    assert "".join(e.text for e in events if isinstance(e, Delta)
                   and not e.malformed_tool_call) == "ok"
    out, events = run([7, 3, 4])  # cut off inside the call (max_tokens)
    flagged = [e for e in events if isinstance(e, Delta) and e.malformed_tool_call]
    assert [d.text for d in flagged] == ['<tool_call>{"name": "f", ']


def test_without_tools_the_markup_is_plain_content():
    out = OutputProcessor(CharDetok(VOCAB), think_tags=("<think>", "</think>"))
    events = []
    for i, t in enumerate([3, 4, 5, 6]):
        events += out.step(t, last=i == 3)
    assert all(isinstance(e, Delta) for e in events)
    assert "".join(e.text for e in events) == '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
