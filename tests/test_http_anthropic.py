"""The Anthropic Messages API of `optiq serve --http-port`, driven by the real
`anthropic` SDK (same server and engine as test_http_openai.py)."""

from __future__ import annotations

import json

import anthropic
import pytest
from optiq.v1 import generation_pb2 as pb

from http_util import health, post_raw, wait_idle
from optiq.runtime.client import Client
from serving import HANG_S

pytestmark = pytest.mark.slow

MODEL = "optiq-tiny"
ASK = [{"role": "user", "content": "What is a lawyer?"}]


@pytest.fixture(scope="module")
def ant(http_server):
    c = anthropic.Anthropic(base_url=http_server.http_url, api_key="unused", max_retries=0,
                            timeout=HANG_S)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(http_server):
    c = Client(http_server.target)
    c.wait_serving(HANG_S)
    yield c
    c.close()


def grpc_texts(client, **kw):
    content = reasoning = ""
    final = None
    for r in client.generate(**kw):
        if r.HasField("finished"):
            final = r.finished
        elif r.delta.channel == pb.CHANNEL_REASONING:
            reasoning += r.delta.text
        else:
            content += r.delta.text
    return content, reasoning, final


def test_message_has_thinking_then_text_like_grpc(ant, grpc_client):
    content, reasoning, final = grpc_texts(grpc_client, messages=ASK, max_tokens=60,
                                           enable_thinking=True)
    m = ant.messages.create(model=MODEL, max_tokens=60, messages=ASK,
                            thinking={"type": "enabled", "budget_tokens": 30})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.content[0].thinking == reasoning and m.content[1].text == content
    assert m.role == "assistant" and m.model == MODEL and m.id.startswith("msg_")
    assert m.stop_reason == ("end_turn" if final.reason == pb.FINISH_REASON_EOS else "max_tokens")
    u = m.usage
    assert u.output_tokens == final.usage.completion_tokens
    assert u.input_tokens + u.cache_read_input_tokens == final.usage.prompt_tokens
    assert u.cache_read_input_tokens > 0  # gRPC ran the same prompt: prefix cache


def test_stream_event_sequence_and_final_message(ant):
    kw = dict(model=MODEL, max_tokens=40, messages=ASK,
              thinking={"type": "enabled", "budget_tokens": 20})
    whole = ant.messages.create(**kw)
    events = list(ant.messages.create(stream=True, **kw))
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    blocks = []  # per content block: start, deltas..., stop, with one index each
    for e in events[1:-2]:
        if e.type == "content_block_start":
            assert e.index == len(blocks)
            blocks.append([e])
        else:
            assert e.type in ("content_block_delta", "content_block_stop")
            assert blocks and e.index == len(blocks) - 1 and blocks[-1][-1].type != \
                "content_block_stop"
            blocks[-1].append(e)
    assert all(b[-1].type == "content_block_stop" for b in blocks)
    assert [b[0].content_block.type for b in blocks] == [b.type for b in whole.content]
    assert events[-2].delta.stop_reason == whole.stop_reason
    assert events[-2].usage.output_tokens == whole.usage.output_tokens
    with ant.messages.stream(**kw) as s:
        streamed = s.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]


def test_system_stop_sequences_and_thinking_off(ant, grpc_client):
    msgs = [{"role": "user", "content": "Say hello."}]
    off = {"type": "disabled"}
    full = ant.messages.create(model=MODEL, max_tokens=200, messages=msgs, thinking=off,
                               system="You are terse.")
    assert [b.type for b in full.content] == ["text"] and full.stop_reason == "end_turn"
    content, _, _ = grpc_texts(grpc_client, max_tokens=200, enable_thinking=False, messages=[
        {"role": "system", "content": "You are terse."}, *msgs])
    assert full.content[0].text == content
    stop = content[len(content) // 2: len(content) // 2 + 3]
    cut = ant.messages.create(model=MODEL, max_tokens=200, messages=msgs, thinking=off,
                              system=[{"type": "text", "text": "You are terse."}],
                              stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == content[: content.index(stop)]


def test_count_tokens_matches_grpc_tokenize(ant, grpc_client):
    n = ant.messages.count_tokens(model=MODEL, messages=ASK, system="Be brief.")
    want = grpc_client.tokenize(messages=[{"role": "system", "content": "Be brief."}, *ASK])
    assert n.input_tokens == len(want)


@pytest.mark.parametrize("kw, status, where", [
    (dict(max_tokens=0, messages=ASK), 400, "max_tokens"),
    (dict(max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]),
     400, "messages.0.content"),
    (dict(max_tokens=5, messages=[{"role": "system", "content": "x"}]), 400, "messages.0.role"),
    (dict(max_tokens=5, messages=ASK, extra_body={"temperature": -1}), 400, "temperature"),
    (dict(max_tokens=5, messages=ASK, tool_choice={"type": "any"}), 400, "tool_choice"),
    (dict(max_tokens=5, messages=ASK, tools=[{"name": "f", "input_schema": {}}]), 400, "tools"),
    (dict(max_tokens=5, messages=[{"role": "user", "content": "x " * 300}]), 400, "context limit"),
])
def test_bad_requests_in_anthropic_shape(ant, grpc_client, kw, status, where):
    before = grpc_client.load()
    with pytest.raises(anthropic.APIStatusError) as e:
        ant.messages.create(model=MODEL, **kw)
    assert e.value.status_code == status
    body = e.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert where in body["error"]["message"], body
    load = grpc_client.load()  # counted once, as invalid (gRPC's INVALID_ARGUMENT)
    assert load.requests_invalid == before.requests_invalid + 1
    assert load.requests_total == before.requests_total


def test_unknown_model_and_bad_json(ant, http_server, grpc_client):
    before = grpc_client.load()
    with pytest.raises(anthropic.NotFoundError) as e:
        ant.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=ASK)
    assert e.value.body["error"]["type"] == "not_found_error"
    assert MODEL in e.value.body["error"]["message"]
    status, body = post_raw(http_server.http_url + "/v1/messages", b"{not json",
                            {"anthropic-version": "2023-06-01"})
    assert status == 400 and body["type"] == "error"
    assert "not valid JSON" in body["error"]["message"]
    status, body = post_raw(http_server.http_url + "/v1/messages",
                            json.dumps({"model": MODEL, "messages": ASK}).encode())
    assert status == 400 and "max_tokens" in body["error"]["message"]
    load = grpc_client.load()  # the 404 and both 400s
    assert load.requests_invalid == before.requests_invalid + 3
    assert load.requests_total == before.requests_total


def test_closing_the_stream_frees_the_slot(ant, http_server):
    base = http_server.http_url
    wait_idle(base)
    before = health(base)["requests_cancelled"]
    with ant.messages.stream(model=MODEL, max_tokens=100_000, messages=ASK) as s:
        for i, _ in enumerate(s):
            if i == 3:
                break
        assert health(base)["active_requests"] == 1
    after = wait_idle(base)
    assert after["requests_cancelled"] == before + 1
