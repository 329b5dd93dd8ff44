"""The OpenAI HTTP API of `optiq serve --http-port`, driven by the real `openai` SDK.

The server (conftest ``http_server``) runs the bundled model greedily; its gRPC port
serves the same engine, so answers must match gRPC's token for token, and both fronts
share one batch and one set of limits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import openai
import pytest
from optiq.v1 import generation_pb2 as pb

from http_util import get_json, health, post_raw, wait_idle
from optiq.runtime.client import Client
from serving import HANG_S, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = "optiq-tiny"
ASK = [{"role": "user", "content": "What is a lawyer?"}]  # the bundled model thinks first


@pytest.fixture(scope="module")
def oai(http_server):
    c = openai.OpenAI(base_url=http_server.http_url + "/v1", api_key="unused", max_retries=0,
                      timeout=HANG_S)
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc_client(http_server):
    c = Client(http_server.target)
    c.wait_serving(HANG_S)
    yield c
    c.close()


def grpc_answer(client, **kw):
    """(content, reasoning, completion ids, final) of one gRPC generation."""
    content = reasoning = ""
    ids, final = [], None
    for r in client.generate(**kw):
        if r.HasField("finished"):
            final = r.finished
        else:
            ids += r.delta.token_ids
            if r.delta.channel == pb.CHANNEL_REASONING:
                reasoning += r.delta.text
            else:
                content += r.delta.text
    return content, reasoning, ids, final


def test_models_health_and_unknown_route(oai, http_server):
    assert [m.id for m in oai.models.list()] == [MODEL]
    status, body = get_json(http_server.http_url + "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL
    status, body = get_json(http_server.http_url + "/v2/nothing")
    assert status == 404 and "no route" in body["error"]["message"]
    status, body = get_json(http_server.http_url + "/v1/chat/completions")
    assert status == 405 and "does not take GET" in body["error"]["message"]


def test_chat_matches_grpc_and_splits_reasoning(oai, grpc_client):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60)
    content, reasoning, ids, final = grpc_answer(grpc_client, messages=ASK, max_tokens=60)
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.content == content and content.strip()
    extra = msg.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == reasoning and reasoning.strip()
    assert "<think>" not in msg.content + reasoning
    assert final.reason in (pb.FINISH_REASON_EOS, pb.FINISH_REASON_LENGTH)
    assert r.choices[0].finish_reason == ("stop" if final.reason == pb.FINISH_REASON_EOS
                                          else "length")
    u = r.usage
    assert u.completion_tokens == final.usage.completion_tokens
    assert u.prompt_tokens == len(grpc_client.tokenize(messages=ASK))
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.completion_tokens_details.reasoning_tokens == final.usage.reasoning_tokens > 0
    # the same prompt again: its prefix comes from the engine's prefix cache
    again = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.choices[0].message.content == content


def test_stream_equals_non_stream_with_usage_last(oai):
    kw = dict(model=MODEL, messages=ASK, max_tokens=40)
    whole = oai.chat.completions.create(**kw).choices[0].message
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                              **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in chunks if c.choices)
    assert content == whole.content and reasoning == whole.model_extra["reasoning_content"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2, \
        "content arrives in pieces, not at once"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    without = list(oai.chat.completions.create(stream=True, **kw))
    assert all(c.usage is None for c in without)


def test_enable_thinking_off_via_chat_template_kwargs(oai, grpc_client):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=30,
                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    msg = r.choices[0].message
    assert "reasoning_content" not in (msg.model_extra or {})
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    content, _, _, _ = grpc_answer(grpc_client, messages=ASK, max_tokens=30, enable_thinking=False)
    assert msg.content == content


def test_stop_eos_and_sampling_fields(oai, grpc_client):
    prompt = [{"role": "user", "content": "Say hello."}]
    full = oai.chat.completions.create(model=MODEL, messages=prompt, max_tokens=200,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert full.choices[0].finish_reason == "stop"  # the model's end of turn
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), text
    cut = oai.chat.completions.create(model=MODEL, messages=prompt, max_tokens=200, stop=[stop],
                                      extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    # seeded sampling: same seed, same answer (the engine's per-request random stream)
    kw = dict(model=MODEL, messages=prompt, max_tokens=12, temperature=1.0, top_p=0.9,
              presence_penalty=0.5, frequency_penalty=0.1, seed=7,
              extra_body={"top_k": 20, "min_p": 0.01, "ignore_eos": True})
    a = oai.chat.completions.create(**kw).choices[0].message.content
    assert a == oai.chat.completions.create(**kw).choices[0].message.content
    # max_completion_tokens is the newer name of max_tokens
    r = oai.chat.completions.create(model=MODEL, messages=prompt, max_completion_tokens=5,
                                    extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, logprobs=True,
                                    top_logprobs=2, extra_body={"ignore_eos": True})
    lps = r.choices[0].logprobs.content
    assert lps and "".join(lp.token for lp in lps) == r.choices[0].message.content
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token == lp.token  # greedy picks the most likely
        assert lp.bytes == list(lp.token.encode())


def test_completions_match_grpc(oai, grpc_client):
    prompt = "Once upon a time"
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=12, logprobs=2,
                               extra_body={"ignore_eos": True})
    content, _, ids, _ = grpc_answer(grpc_client, prompt=prompt, max_tokens=12, ignore_eos=True)
    c = r.choices[0]
    assert c.text == content and c.finish_reason == "length"
    assert r.usage.completion_tokens == 12 == len(ids)
    assert "".join(c.logprobs.tokens) == content and len(c.logprobs.top_logprobs[0]) == 2
    streamed = "".join(ch.choices[0].text for ch in oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, stream=True, extra_body={"ignore_eos": True})
        if ch.choices)
    assert streamed == content
    # token ids as the prompt
    r = oai.completions.create(model=MODEL, prompt=grpc_client.tokenize(prompt), max_tokens=12,
                               extra_body={"ignore_eos": True})
    assert r.choices[0].text == content


@pytest.mark.parametrize("body, status, where", [
    (dict(messages=ASK, max_tokens=0), 400, "max_tokens"),
    (dict(messages=ASK, max_completion_tokens=-1), 400, "max_completion_tokens"),
    (dict(messages=ASK, n=2), 400, "n"),
    (dict(messages=ASK, response_format={"type": "json_object"}), 400, "response_format"),
    (dict(messages=ASK, temperature=-1), 400, "temperature"),
    (dict(messages=ASK, top_logprobs=3), 400, "top_logprobs"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "content"),
    (dict(messages=ASK, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (dict(messages=ASK, tool_choice="required"), 400, "tool_choice"),
    (dict(messages=[]), 400, "messages"),
])
def test_bad_requests_are_400_naming_the_field(oai, grpc_client, body, status, where):
    before = grpc_client.load()
    with pytest.raises(openai.APIStatusError) as e:
        oai.chat.completions.create(model=MODEL, **body)
    assert e.value.status_code == status
    err = e.value.body
    assert err["type"] == "invalid_request_error" and where in err["message"], err
    assert err["param"] is None or where.split(".")[0] in err["param"]
    assert_counted_invalid(before, grpc_client.load())


def assert_counted_invalid(before, load, n: int = 1):
    """``n`` refusals the client must fix: GetLoad.requests_invalid + n (as gRPC counts
    INVALID_ARGUMENT), nothing else counted."""
    assert load.requests_invalid == before.requests_invalid + n
    assert load.requests_total == before.requests_total
    assert load.requests_rejected == before.requests_rejected


def test_unknown_model_and_long_prompt(oai, http_server, grpc_client):
    before = grpc_client.load()
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=ASK)
    assert e.value.body["code"] == "model_not_found" and MODEL in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="the cat " * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "context limit is 256" in e.value.body["message"]
    assert_counted_invalid(before, grpc_client.load(), 2)
    h = health(http_server.http_url)
    assert h["requests_invalid"] >= 2 and "requests_rejected" in h


def test_only_generation_refusals_count_as_invalid(http_server, grpc_client):
    """Wrong routes and methods, and count_tokens errors, are not generation requests:
    GetLoad counts none of them."""
    base = http_server.http_url
    before = grpc_client.load()
    assert get_json(base + "/v1/chat/completions")[0] == 405
    assert get_json(base + "/v2/nothing")[0] == 404
    status, _ = post_raw(base + "/v1/messages/count_tokens",
                         json.dumps({"model": "nope", "messages": ASK}).encode())
    assert status == 404
    load = grpc_client.load()
    assert_counted_invalid(before, load, 0)


def test_bad_json_is_400_in_openai_shape(http_server, grpc_client):
    before = grpc_client.load()
    url = http_server.http_url + "/v1/chat/completions"
    status, body = post_raw(url, b'{"model": "optiq-tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post_raw(url, json.dumps({"model": MODEL, "messages": "hi"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    assert_counted_invalid(before, grpc_client.load(), 2)  # malformed bodies count too


def test_closing_the_stream_frees_the_slot(oai, http_server, grpc_client):
    base = http_server.http_url
    wait_idle(base)
    before = health(base)["requests_cancelled"]
    steps = grpc_client.load().decode_steps_total
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=100_000,
                                         stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    assert health(base)["active_requests"] == 1
    stream.close()
    after = wait_idle(base)  # waits on what the server reports, not on time
    assert after["requests_cancelled"] == before + 1
    # it did not run on towards its 100k tokens (the bound allows for a loaded machine)
    assert grpc_client.load().decode_steps_total - steps < 5_000


def test_dropping_a_whole_request_frees_the_slot(http_server):
    """A non-streaming call whose client goes away is cancelled too."""
    import http.client
    from urllib.parse import urlsplit

    base = http_server.http_url
    wait_idle(base)
    before = health(base)["requests_cancelled"]
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100_000,
         "ignore_eos": True}), {"content-type": "application/json"})
    wait_until(lambda: health(base)["active_requests"] == 1, "the request to start")
    conn.close()
    after = wait_idle(base)
    assert after["requests_cancelled"] == before + 1


def test_http_and_grpc_share_one_batch_and_its_limits(oai, grpc_client, http_server):
    """2 slots + 2 queue places, taken by HTTP and gRPC requests together; one more
    of either kind is refused (429 / RESOURCE_EXHAUSTED)."""
    base = http_server.http_url
    wait_idle(base)
    long = dict(max_tokens=100_000, ignore_eos=True)
    calls = [grpc_client.generate(prompt="Once upon a time", **long) for _ in range(2)]
    streams = [oai.completions.create(model=MODEL, prompt="The little cat", stream=True,
                                      max_tokens=100_000, extra_body={"ignore_eos": True})
               for _ in range(2)]
    def drain(it):
        try:
            for _ in it:
                pass
        except Exception:
            pass

    threads = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls + streams]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: (h := health(base))["active_requests"] == 2
                   and h["queued_requests"] == 2, "both fronts' requests in one batch + queue")
        assert grpc_client.load().active_requests == 2
        with pytest.raises(openai.RateLimitError) as e:
            oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
        assert "capacity" in e.value.body["message"]
    finally:
        for c in calls:
            c.cancel()
        for s in streams:
            s.close()
    wait_idle(base)


def test_node_openai_client(http_server):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (CI installs Node 20)")
    project = REPO / "tests" / "node"
    if not (project / "node_modules" / "openai").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed")
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=project,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    out = subprocess.run([node, "openai_client.mjs", http_server.http_url + "/v1", MODEL],
                         cwd=project, capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr + out.stdout
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["models"] == [MODEL]
    assert seen["streamed"] == seen["whole"] and seen["whole"]
    assert seen["finish_reason"] == "length" and seen["completion_tokens"] == 8
    assert seen["not_found_status"] == 404
    assert seen["active_after_abort"] == 0


def test_both_http_apis_snapshot_at_message_boundaries(oai, http_server, bundled_model_dir):
    """The bundled model is hybrid: a chat request resumes from a snapshot only where an
    earlier one's messages ended. The HTTP front fills those boundaries as gRPC does
    (one request builder), so a new session on the same system prompt reuses exactly
    the system turn, whichever API sent either request."""
    from mlx_lm.utils import load_tokenizer

    from optiq.runtime.boundaries import message_boundaries

    tok = load_tokenizer(bundled_model_dir)

    def system_end(msgs):
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = list(tok.encode(text, add_special_tokens=False))
        return message_boundaries(tok, msgs, ids)[0]

    def openai_chat(system, user):
        r = oai.chat.completions.create(
            model=MODEL, max_tokens=4,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
        return r.usage.prompt_tokens_details.cached_tokens

    def anthropic_chat(system, user):
        status, body = post_raw(http_server.http_url + "/v1/messages", json.dumps({
            "model": MODEL, "max_tokens": 4, "system": system,
            "messages": [{"role": "user", "content": user}]}).encode(),
            {"anthropic-version": "2023-06-01"})
        assert status == 200, body
        return body["usage"]["cache_read_input_tokens"]

    for first, then, tag in ((openai_chat, anthropic_chat, "otters"),
                             (anthropic_chat, openai_chat, "herons")):
        system = f"You are the {tag} agent of the boundary test. Answer in one short line."
        assert first(system, "Where do they live?") == 0
        want = system_end([{"role": "system", "content": system},
                           {"role": "user", "content": "Where do they live?"}])
        assert then(system, "What do they eat?") == want > 0, tag
