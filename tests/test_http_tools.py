"""Tool calls end to end, over gRPC, the OpenAI API and the Anthropic API, from a model
that really makes them (tests/tool_model.py trains it in the fixture), and the HTTP
front's auth off loopback.

The server binds 0.0.0.0, so it needs an API key: every client here sends it, and
the auth test checks what happens without it.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from optiq.v1 import generation_pb2 as pb

from http_util import get_json, post_raw
from optiq.runtime.client import Client
from serving import HANG_S, ServerProcess
from tool_model import (
    BROKEN_CALL,
    BROKEN_Q,
    HELLO_ANSWER,
    HELLO_Q,
    OPENAI_TOOLS,
    TOOLS,
    WEATHER_ANSWER,
    WEATHER_Q,
    WEATHER_RESULT,
    make_tool_model,
)

pytestmark = pytest.mark.slow

KEY = "tool-test-key"
MODEL = "optiq-tool-tiny"
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
ANT_TOOLS = [{"name": t["name"], "description": t["description"],
              "input_schema": t["parameters"]} for t in TOOLS]


@pytest.fixture(scope="module")
def tool_model_dir(bundled_model_dir, tmp_path_factory):
    return make_tool_model(tmp_path_factory.mktemp("tools") / MODEL, bundled_model_dir)


@pytest.fixture(scope="module")
def adapter_dir(tool_model_dir, tmp_path_factory):
    """A random LoRA adapter on the tool model: served as model name "rnd"."""
    from test_runtime_server import make_adapter

    from optiq.core.model_io import load_model

    return make_adapter(load_model(tool_model_dir).model,
                        tmp_path_factory.mktemp("adapter") / "rnd", seed=3, scale=4.0)


@pytest.fixture(scope="module")
def server(tool_model_dir, adapter_dir):
    with ServerProcess("--host", "0.0.0.0", "--api-key", KEY, "--http-port", "0", "--temp", "0",
                       "--adapter", f"rnd={adapter_dir}", model=str(tool_model_dir)) as srv:
        yield srv


@pytest.fixture(scope="module")
def grpc_client(server):
    c = Client(server.target, api_key=KEY)
    c.wait_serving(HANG_S)
    yield c
    c.close()


@pytest.fixture(scope="module")
def oai(server, grpc_client):
    c = openai.OpenAI(base_url=server.http_url + "/v1", api_key=KEY, max_retries=0,
                      timeout=HANG_S)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ant(server, grpc_client):
    c = anthropic.Anthropic(base_url=server.http_url, api_key=KEY, max_retries=0, timeout=HANG_S)
    yield c
    c.close()


def events(client, **kw):
    return list(client.generate(enable_thinking=False, max_tokens=80, **kw))


# ------------------------------------------------------------------ gRPC


def test_model_info_reports_tool_format(grpc_client):
    info = grpc_client.model_info()
    assert info.supports_tools and info.tool_call_format == "json_tools"


def test_grpc_tool_call_is_a_structured_event(grpc_client):
    evs = events(grpc_client, messages=[{"role": "user", "content": WEATHER_Q}], tools=TOOLS)
    calls = [e.tool_call for e in evs if e.HasField("tool_call")]
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")
    fin = evs[-1].finished
    assert fin.reason == pb.FINISH_REASON_TOOL_CALLS
    deltas = [e.delta for e in evs if e.HasField("delta")]
    assert not "".join(d.text for d in deltas).strip()  # the call is not content text
    call_ids = [t for d in deltas if d.channel == pb.CHANNEL_TOOL_CALL for t in d.token_ids]
    text = grpc_client.detokenize(call_ids)
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
    assert fin.usage.completion_tokens == len(call_ids) + sum(
        len(d.token_ids) for d in deltas if d.channel != pb.CHANNEL_TOOL_CALL) + 1  # + EOS


def test_grpc_malformed_call_comes_back_as_flagged_text(grpc_client):
    evs = events(grpc_client, messages=[{"role": "user", "content": BROKEN_Q}], tools=TOOLS)
    assert not any(e.HasField("tool_call") for e in evs)
    flagged = [e.delta for e in evs if e.HasField("delta") and e.delta.malformed_tool_call]
    assert [d.text for d in flagged] == [BROKEN_CALL]
    assert evs[-1].finished.reason == pb.FINISH_REASON_EOS


def test_grpc_tool_result_turn(grpc_client):
    msgs = [{"role": "user", "content": WEATHER_Q},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]},
            {"role": "tool", "content": WEATHER_RESULT, "tool_call_id": "call_1"}]
    evs = events(grpc_client, messages=msgs, tools=TOOLS)
    assert "".join(e.delta.text for e in evs if e.HasField("delta")) == WEATHER_ANSWER
    assert evs[-1].finished.reason == pb.FINISH_REASON_EOS
    # without tools in the request the output is not parsed: markup stays content
    evs = events(grpc_client, messages=[{"role": "user", "content": WEATHER_Q}], tools=TOOLS,
                 tool_choice="none")
    assert not any(e.HasField("tool_call") for e in evs)


# ------------------------------------------------------------------ OpenAI


def test_openai_tool_call_round_trip(oai):
    msgs = [{"role": "user", "content": WEATHER_Q}]
    r = oai.chat.completions.create(model=MODEL, messages=msgs, tools=OPENAI_TOOLS,
                                    tool_choice="auto", extra_body=NO_THINK)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content is None
    # run the "tool" and send its result back, as an agent loop does
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": WEATHER_RESULT}]
    r = oai.chat.completions.create(model=MODEL, messages=msgs, tools=OPENAI_TOOLS,
                                    extra_body=NO_THINK)
    assert r.choices[0].message.content == WEATHER_ANSWER
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    # a question the model answers without a tool
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": HELLO_Q}],
                                    tools=OPENAI_TOOLS, extra_body=NO_THINK)
    assert r.choices[0].message.content == HELLO_ANSWER and r.choices[0].finish_reason == "stop"


def test_openai_streamed_tool_call(oai):
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": WEATHER_Q}], tools=OPENAI_TOOLS,
        stream=True, extra_body=NO_THINK))
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks
            if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_openai_malformed_call_is_content_with_a_flag(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": BROKEN_Q}],
                                    tools=OPENAI_TOOLS, extra_body=NO_THINK)
    msg = r.choices[0].message
    assert msg.content == BROKEN_CALL and not msg.tool_calls
    assert msg.model_extra["malformed_tool_call"] is True
    assert r.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------ Anthropic


def test_anthropic_tool_use_round_trip(ant):
    msgs = [{"role": "user", "content": WEATHER_Q}]
    m = ant.messages.create(model=MODEL, max_tokens=80, messages=msgs, tools=ANT_TOOLS,
                            thinking={"type": "disabled"})
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    msgs += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                           "content": WEATHER_RESULT}]}]
    m = ant.messages.create(model=MODEL, max_tokens=80, messages=msgs, tools=ANT_TOOLS,
                            thinking={"type": "disabled"})
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == WEATHER_ANSWER
    assert m.stop_reason == "end_turn"


def test_anthropic_streamed_tool_use(ant):
    with ant.messages.stream(model=MODEL, max_tokens=80, tools=ANT_TOOLS,
                             thinking={"type": "disabled"},
                             messages=[{"role": "user", "content": WEATHER_Q}]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "input_json" in kinds  # the SDK's event for input_json_delta
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.input == {"city": "Paris"} and final.stop_reason == "tool_use"
    m = ant.messages.create(model=MODEL, max_tokens=80, tools=ANT_TOOLS,
                            thinking={"type": "disabled"},
                            messages=[{"role": "user", "content": BROKEN_Q}])
    assert [b.text for b in m.content] == [BROKEN_CALL]
    assert m.content[0].model_extra["malformed_tool_call"] is True


# ------------------------------------------------------------------ adapters, auth


def test_adapters_are_model_names(oai, grpc_client):
    assert [m.id for m in oai.models.list()] == [MODEL, "rnd"]
    kw = dict(messages=[{"role": "user", "content": HELLO_Q}], max_tokens=8,
              extra_body={**NO_THINK, "ignore_eos": True})

    def http(model):  # the answer and any reasoning the random adapter happens to open
        msg = oai.chat.completions.create(model=model, **kw).choices[0].message
        return msg.content or "", (msg.model_extra or {}).get("reasoning_content") or ""

    base, adapted = http(MODEL), http("rnd")
    deltas = [e.delta for e in grpc_client.generate(
        messages=[{"role": "user", "content": HELLO_Q}], max_tokens=8, ignore_eos=True,
        enable_thinking=False, adapter="rnd") if e.HasField("delta")]
    want = tuple("".join(d.text for d in deltas if d.channel == ch)
                 for ch in (pb.CHANNEL_CONTENT, pb.CHANNEL_REASONING))
    assert adapted == want and adapted != base


def test_http_needs_the_key_off_loopback(server):
    base = server.http_url
    status, body = get_json(base + "/health")  # health needs no key (like gRPC health)
    assert status == 200 and body["status"] == "ok"
    for key in ("", "wrong"):
        c = openai.OpenAI(base_url=base + "/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list()
        assert e.value.body["code"] == "invalid_api_key"
        a = anthropic.Anthropic(base_url=base, api_key=key or "-", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            a.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x"}])
        assert e.value.body["error"]["type"] == "authentication_error"
    status, body = post_raw(base + "/v1/chat/completions", b"{}")  # no header at all
    assert status == 401 and "API key" in body["error"]["message"]
    # Anthropic clients may send the key as a bearer token too (ANTHROPIC_AUTH_TOKEN)
    a = anthropic.Anthropic(base_url=base, auth_token=KEY, max_retries=0)
    m = a.messages.create(model=MODEL, max_tokens=80, messages=[{"role": "user", "content": HELLO_Q}],
                          tools=ANT_TOOLS, thinking={"type": "disabled"})
    assert m.content[0].text == HELLO_ANSWER
