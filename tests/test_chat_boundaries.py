"""Message boundaries of chat input: every offset is a prefix of the request's tokens
and of any conversation that shares the messages up to there."""

from __future__ import annotations

import json

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


# ------------------------------------- the request builder (both fronts), with tools


@pytest.fixture(scope="module")
def tool_tok(bundled_model_dir, tmp_path_factory):
    """The bundled tokenizer with the tool tests' Qwen3-style template (tools in the
    system turn, tool calls, tool results)."""
    import json

    from mlx_lm.utils import load_tokenizer

    from optiq.core.tiny_models import copy_tokenizer_files
    from tool_model import TOOL_TEMPLATE

    out = tmp_path_factory.mktemp("tool-tok")
    copy_tokenizer_files(bundled_model_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TOOL_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return load_tokenizer(out)


def stub_engine(tok, snapshots: bool = True):
    """What ``build_request`` reads of an engine: a hybrid model with the prefix cache
    on (``snapshots``) and a template that renders tools; no model."""
    import threading
    from types import SimpleNamespace

    from optiq.runtime.modelinfo import ModelSummary

    summary = ModelSummary(model_id="stub", architecture="qwen3_5", num_layers=1,
                           hidden_size=1, vocab_size=len(tok.vocab), context_length=4096,
                           num_parameters=0, has_chat_template=True,
                           tool_tags=("<tool_call>", "</tool_call>"),
                           tool_call_format="json_tools")
    return SimpleNamespace(tokenizer=tok, tokenizer_lock=threading.Lock(), summary=summary,
                           adapter_names=[], snapshots_boundaries=snapshots)


def agent_request(user: str, tool_choice: str = ""):
    from optiq.v1 import generation_pb2 as pb

    from tool_model import WEATHER

    call = pb.ToolCall(id="call_0", name="get_weather", arguments_json='{"city": "Paris"}')
    msgs = [
        pb.ChatMessage(role="system", content="You are a weather agent. Use the tools."),
        pb.ChatMessage(role="user", content=user),
        pb.ChatMessage(role="assistant", content="", reasoning_content="Ask the tool.",
                       tool_calls=[call]),
        pb.ChatMessage(role="tool", content="sunny, 24 C", tool_call_id="call_0",
                       name="get_weather"),
    ]
    tool = pb.Tool(name=WEATHER["name"], description=WEATHER["description"],
                   parameters_json=json.dumps(WEATHER["parameters"]))
    return pb.GenerateRequest(messages=msgs, tools=[tool], tool_choice=tool_choice,
                              chat_template_kwargs_json='{"custom_flag": 1}', max_tokens=4)


def test_request_boundaries_probe_the_real_rendering_with_tools(tool_tok):
    """build_request (gRPC and HTTP alike) finds the boundaries with the same message
    dicts (tool calls, tool results, reasoning) and template arguments (tools, extra
    kwargs) as the real rendering: the system turn's boundary lies past the tools, so
    every session of an agent with these tools shares it."""
    from optiq.runtime.config import Defaults
    from optiq.runtime.request import _messages, build_request

    engine = stub_engine(tool_tok)
    r = agent_request("What is the weather in Paris?")
    got = build_request(r, engine, Defaults())
    ids = got.prompt_tokens
    assert got.tools and "<tools>" in tool_tok.decode(ids)
    kwargs = {"custom_flag": 1, "tools": list(got.tools)}
    assert got.boundaries == message_boundaries(tool_tok, _messages(r.messages), ids, kwargs)
    assert len(got.boundaries) == 4
    first = tool_tok.decode(ids[: got.boundaries[0]])
    assert "</tools><|im_end|>\n" in first and first.endswith("<|im_start|>user\n")
    # the assistant's tool-call turn ends at one too (with the tool result's header,
    # which this template renders as a user turn)
    last = tool_tok.decode(ids[: got.boundaries[-1]])
    assert last.endswith("</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n"), last

    other = build_request(agent_request("Is it raining in Rome?"), engine, Defaults())
    b = got.boundaries[0]
    assert other.prompt_tokens[:b] == ids[:b] and b in other.boundaries
    # probes without the tools would diverge inside the system turn: at most one
    # boundary, before the tools
    bare = message_boundaries(tool_tok, _messages(r.messages), ids, {"custom_flag": 1})
    assert len(bare) <= 1 and all(x < got.boundaries[0] for x in bare)

    # tool_choice "none": no tools rendered, and the probes leave them out as well
    none = build_request(agent_request("What is the weather in Paris?", "none"), engine,
                         Defaults())
    assert none.tools is None and "<tools>" not in tool_tok.decode(none.prompt_tokens)
    assert none.boundaries == message_boundaries(
        tool_tok, _messages(r.messages), none.prompt_tokens, {"custom_flag": 1})
    assert none.boundaries

    # no snapshots (not hybrid, or the cache off): no probe renderings, no boundaries
    assert build_request(r, stub_engine(tool_tok, False), Defaults()).boundaries == ()
