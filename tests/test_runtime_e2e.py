"""End to end: a real `optiq serve` on a loopback port with the bundled model.

One server for the module (max concurrency 2, queue 2, so capacity limits are cheap
to reach); every test talks to it over gRPC like any client would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from optiq.v1 import generation_pb2 as pb

from optiq.runtime.client import Client
from serving import HANG_S, ServerProcess, wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY, QUEUE = 2, 2
CONTEXT = 256  # --max-context: keeps the context-limit tests cheap (the model has 32768)


@pytest.fixture(scope="module")
def server(bundled_model_dir):
    with ServerProcess(
        "--max-concurrency", str(CONCURRENCY), "--max-queue", str(QUEUE), "--temp", "0",
        "--max-context", str(CONTEXT),
        model=str(bundled_model_dir),
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = Client(server.target)
    c.wait_serving(HANG_S)
    yield c
    c.close()


def collect(call):
    deltas, finals = [], []
    for r in call:
        if r.HasField("finished"):
            finals.append(r.finished)
        else:
            assert not finals, "a delta came after the final event"
            deltas.append(r.delta)
    assert len(finals) == 1, "exactly one final event"
    return deltas, finals[0]


def ids_of(deltas):
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas, channel=None):
    return "".join(d.text for d in deltas if channel is None or d.channel == channel)


def wait_idle(client):
    def idle():
        load = client.load()
        return load if load.active_requests == 0 and load.queued_requests == 0 else None

    return wait_until(idle, "the server to free every slot")


# ------------------------------------------------------------------ service surface


def test_health_and_reflection(client, server):
    assert client.health("") == health_pb2.HealthCheckResponse.SERVING
    assert client.health("optiq.v1.GenerationService") == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(db.get_services())
    assert {"optiq.v1.GenerationService", "grpc.health.v1.Health"} <= services
    desc = db.FindFileContainingSymbol("optiq.v1.GenerationService")
    assert desc.package == "optiq.v1"


def test_ready_line_reports_the_memory_estimate(client, server, bundled_model_dir):
    """The ready line says what the CPU's fp32 path costs, as estimated before loading."""
    from optiq.core.model_io import validate_model_dir
    from optiq.runtime.config import ServeConfig
    from optiq.runtime.footprint import estimate

    (ready,) = [line for line in server.log if "listening on" in line]
    path, config = validate_model_dir(bundled_model_dir)
    fp = estimate(path, config, ServeConfig(max_context=CONTEXT), cpu=True)
    expected = fp.describe().split("; limit")[0]
    assert f"memory: {expected}; limit " in ready
    assert "in the CPU's fp32 compute path" in expected and "prompt cache" in expected
    assert ready.endswith("GB available")


def test_model_info(client, bundled_model_dir):
    info = client.model_info()
    cfg = json.loads((bundled_model_dir / "config.json").read_text())
    text_cfg = {**cfg, **cfg.get("text_config", {})}
    assert info.architecture == cfg["model_type"]
    assert info.num_layers == text_cfg["num_hidden_layers"]
    assert info.context_length == min(CONTEXT, text_cfg["max_position_embeddings"])
    assert info.num_parameters > 0
    assert info.max_concurrency == CONCURRENCY and info.max_queue == QUEUE
    assert info.default_sampling.temperature == 0.0  # --temp 0 overrides generation_config
    assert info.has_chat_template
    assert list(info.eos_token_ids)
    assert info.kv_cache.summary.startswith("default")
    assert not info.adapters
    assert not info.supports_tools and info.tool_call_format == ""


def test_tokenize_detokenize_roundtrip(client):
    text = "The quick brown fox jumps over the lazy dog."
    ids = client.tokenize(text)
    assert ids and client.detokenize(ids) == text
    chat = client.tokenize(messages=[{"role": "user", "content": "Hi"}])
    assert len(chat) > len(client.tokenize("Hi"))


# ------------------------------------------------------------------ generation


def test_stream_plain_prompt_length(client):
    deltas, fin = collect(client.generate(prompt="Once upon a time", max_tokens=12, ignore_eos=True))
    assert len(deltas) >= 2, "tokens arrive as a stream, not one message"
    assert fin.reason == pb.FINISH_REASON_LENGTH
    ids = ids_of(deltas)
    assert len(ids) == 12 == fin.usage.completion_tokens
    assert fin.usage.prompt_tokens == len(client.tokenize("Once upon a time"))
    assert client.detokenize(ids) == text_of(deltas)
    u = fin.usage
    assert 0 < u.time_to_first_token_ms <= u.total_time_ms
    assert u.decode_time_ms > 0


def test_greedy_is_deterministic_and_token_ids_input_matches_text(client):
    prompt = "Once upon a time"
    a = ids_of(collect(client.generate(prompt=prompt, max_tokens=10, ignore_eos=True))[0])
    b = ids_of(collect(client.generate(
        token_ids=client.tokenize(prompt), max_tokens=10, ignore_eos=True))[0])
    assert a == b


def test_chat_reasoning_channel(client):
    # the bundled model was trained to answer "What is a WORD?" with <think>...</think>
    msgs = [{"role": "user", "content": "What is a lawyer?"}]
    deltas, fin = collect(client.generate(messages=msgs, enable_thinking=True, max_tokens=80))
    reasoning = text_of(deltas, pb.CHANNEL_REASONING)
    content = text_of(deltas, pb.CHANNEL_CONTENT)
    assert reasoning.strip() and content.strip()
    assert "<think>" not in reasoning + content and "</think>" not in reasoning + content
    channels = [d.channel for d in deltas]
    assert channels[0] == pb.CHANNEL_REASONING
    assert pb.CHANNEL_REASONING not in channels[channels.index(pb.CHANNEL_CONTENT):]
    reasoning_ids = [t for d in deltas if d.channel == pb.CHANNEL_REASONING for t in d.token_ids]
    assert fin.usage.reasoning_tokens == len(reasoning_ids) > 0
    # the tag tokens are returned (on the reasoning channel), their text is not
    think_ids = client.tokenize("<think></think>")
    assert set(think_ids) <= set(reasoning_ids)

    # thinking off: the template pre-fills an empty think block, all output is content
    deltas, fin = collect(client.generate(messages=msgs, enable_thinking=False, max_tokens=32))
    assert all(d.channel == pb.CHANNEL_CONTENT for d in deltas)
    assert fin.usage.reasoning_tokens == 0


def test_prompt_ending_inside_think_starts_in_reasoning(client):
    msgs = [{"role": "user", "content": "What is a lawyer?"}]
    rendered = client.detokenize(client.tokenize(messages=msgs))
    deltas, fin = collect(client.generate(prompt=rendered + "<think>\n", max_tokens=80))
    assert deltas[0].channel == pb.CHANNEL_REASONING
    assert text_of(deltas, pb.CHANNEL_REASONING).strip()
    assert text_of(deltas, pb.CHANNEL_CONTENT).strip()


def test_eos_ends_a_chat_answer_and_ignore_eos_does_not(client):
    msgs = [{"role": "user", "content": "Say hello."}]
    _, fin = collect(client.generate(messages=msgs, enable_thinking=False, max_tokens=200))
    assert fin.reason == pb.FINISH_REASON_EOS
    assert fin.stop_token_id in client.model_info().eos_token_ids
    n = fin.usage.completion_tokens
    _, fin2 = collect(client.generate(messages=msgs, enable_thinking=False, max_tokens=n + 3,
                                      ignore_eos=True))
    assert fin2.reason == pb.FINISH_REASON_LENGTH and fin2.usage.completion_tokens == n + 3


def test_stop_string_and_stop_token(client):
    prompt = "Once upon a time"
    deltas, _ = collect(client.generate(prompt=prompt, max_tokens=24, ignore_eos=True))
    full = text_of(deltas)
    ids = ids_of(deltas)
    # a stop string from the middle of the greedy output
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    deltas, fin = collect(client.generate(prompt=prompt, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert fin.reason == pb.FINISH_REASON_STOP and fin.stop_sequence == stop
    assert text_of(deltas) == full[: full.index(stop)]
    # a stop token id: the output ends right before its first occurrence
    k = 3
    deltas, fin = collect(client.generate(prompt=prompt, max_tokens=24, ignore_eos=True,
                                          stop_token_ids=[ids[k]]))
    first = ids.index(ids[k])
    assert fin.reason == pb.FINISH_REASON_STOP and fin.stop_token_id == ids[k]
    assert ids_of(deltas) == ids[:first]
    assert fin.usage.completion_tokens == first + 1


def test_logprobs(client):
    deltas, _ = collect(client.generate(prompt="Once upon a time", max_tokens=6, ignore_eos=True,
                                        logprobs=True, top_logprobs=3))
    lps = [lp for d in deltas for lp in d.logprobs]
    assert [lp.token_id for lp in lps] == ids_of(deltas)
    for lp in lps:
        assert lp.logprob <= 0.0
        tops = list(lp.top_logprobs)
        assert len(tops) == 3
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        # greedy: the chosen token is the most likely one
        assert tops[0].token_id == lp.token_id
        assert tops[0].logprob == pytest.approx(lp.logprob, abs=1e-5)


def test_seeded_sampling_is_reproducible(client):
    def run(seed):
        return ids_of(collect(client.generate(prompt="Once upon a time", max_tokens=16,
                                              ignore_eos=True, temperature=1.0, seed=seed))[0])

    assert run(7) == run(7)
    assert run(7) != run(8) or run(7) != run(9)


# ------------------------------------------------------------------ robustness


def test_cancel_frees_slot_within_a_step(client):
    before = client.load()
    call = client.generate(prompt="Once upon a time", max_tokens=100_000, ignore_eos=True)
    for got, _ in enumerate(call, start=1):
        if got == 2:
            break
    call.cancel()
    load = wait_idle(client)
    assert load.requests_cancelled == before.requests_cancelled + 1
    # The engine drops a cancelled request at its next step; the RPC thread that delivers
    # the cancel can lag behind on a loaded machine, so this only shows it did not run on
    # towards its 100k tokens.
    assert load.decode_steps_total - before.decode_steps_total < 5_000


def test_deadline_exceeded_frees_slot(client):
    # The deadline must expire after the server admitted the request and sent a token
    # (else there is nothing running to cancel). No deadline is short enough yet safe on
    # every machine, so try deadlines that double from 0.5 s until one expires after the
    # first token: that run is the one checked.
    timeout = 0.5
    while True:
        before = wait_idle(client)
        call = client.generate(prompt="Once upon a time", max_tokens=100_000, ignore_eos=True,
                               timeout=timeout)
        got = 0
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                got += 1
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if got:
            break
        timeout *= 2  # expired before the first token on this machine: retry with more time
    load = wait_idle(client)
    assert load.requests_cancelled == before.requests_cancelled + 1
    assert load.active_requests == 0


def test_resource_exhausted_when_queue_full(client):
    before = wait_idle(client)
    calls = [client.generate(prompt="Once upon a time", max_tokens=100_000, ignore_eos=True)
             for _ in range(CONCURRENCY + QUEUE)]
    def drain(call):  # consume in the background: the server never waits on flow control
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    threads = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: (load := client.load()).active_requests == CONCURRENCY
                   and load.queued_requests == QUEUE, "every slot and queue place taken")
        with pytest.raises(grpc.RpcError) as e:
            collect(client.generate(prompt="one more", max_tokens=4))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in e.value.details()
        load = client.load()  # counted once, as rejected, and not as accepted or invalid
        assert load.requests_rejected == before.requests_rejected + 1
        assert load.requests_total == before.requests_total + CONCURRENCY + QUEUE
        assert load.requests_invalid == before.requests_invalid
    finally:
        for c in calls:
            c.cancel()
    wait_idle(client)
    _, fin = collect(client.generate(prompt="after", max_tokens=3, ignore_eos=True))
    assert fin.reason == pb.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "empty input"),
        (dict(prompt="", messages=[]), "empty input"),
        (dict(prompt="hi", messages=[{"role": "user", "content": "hi"}]), "exactly one input"),
        (dict(prompt="hi", token_ids=[1, 2]), "exactly one input"),
        (dict(prompt="hi", max_tokens=0), "max_tokens must be > 0"),
        (dict(prompt="hi", max_tokens=-5), "max_tokens must be > 0"),
        (dict(prompt="hi", adapter="nope"), "unknown adapter 'nope'"),
        (dict(prompt="hi", adapter="../../etc/passwd"), "unknown adapter"),
        (dict(prompt="hi", temperature=-1.0), "temperature"),
        (dict(prompt="hi", top_p=0.0), "top_p"),
        (dict(prompt="hi", logprobs=True, top_logprobs=50), "top_logprobs"),
        (dict(prompt="hi", top_logprobs=2), "needs logprobs"),
        (dict(prompt="hi", enable_thinking=True), "enable_thinking applies only to messages"),
        (dict(messages=[{"role": "", "content": "x"}]), "role is empty"),
        (dict(token_ids=[10**7]), "out of range"),
        (dict(prompt="hi", stop=[""]), "stop strings"),
        # the bundled template renders no tools (test_http_tools.py uses one that does)
        (dict(messages=[{"role": "user", "content": "x"}], tools=[{"name": "f"}]),
         "does not render tools"),
        (dict(prompt="hi", tools=[{"name": "f"}]), "apply only to messages"),
        (dict(messages=[{"role": "user", "content": "x"}], tool_choice="required"),
         "constrained decoding"),
        (dict(messages=[{"role": "user", "content": "x"}], tools=[{"name": "no spaces"}]),
         "tools[0].name"),
        (dict(messages=[{"role": "user", "content": "x"}], chat_template_kwargs={"tools": []}),
         "may not set tools"),
    ],
)
def test_bad_requests_are_invalid_argument(client, kwargs, message):
    before = wait_idle(client)
    with pytest.raises(grpc.RpcError) as e:
        collect(client.generate(**kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()
    assert_counted_invalid(before, client.load())


def assert_counted_invalid(before, load):
    """One INVALID_ARGUMENT refusal: requests_invalid + 1, nothing else counted."""
    assert load.requests_invalid == before.requests_invalid + 1
    assert load.requests_rejected == before.requests_rejected
    assert load.requests_total == before.requests_total


def test_prompt_longer_than_context_is_invalid_argument(client):
    n = client.model_info().context_length
    before = wait_idle(client)
    with pytest.raises(grpc.RpcError) as e:
        collect(client.generate(token_ids=[5] * n, max_tokens=1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context limit" in e.value.details()
    assert_counted_invalid(before, client.load())


def test_generation_stops_at_context_limit(client):
    n = client.model_info().context_length
    _, fin = collect(client.generate(token_ids=[5] * (n - 3), max_tokens=50, ignore_eos=True))
    assert fin.reason == pb.FINISH_REASON_LENGTH
    assert fin.usage.completion_tokens == 3


def test_concurrent_streams_match_solo_runs(client):
    prompts = ["Once upon a time", "The little cat", "In the morning"]
    solo = [ids_of(collect(client.generate(prompt=p, max_tokens=10, ignore_eos=True))[0])
            for p in prompts]
    results: dict[int, list[int]] = {}

    def run(i):
        results[i] = ids_of(collect(client.generate(prompt=prompts[i], max_tokens=10,
                                                    ignore_eos=True))[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(len(prompts))] == solo


# ------------------------------------------------------------------ other clients


def test_cli_generate_against_server(server):
    env = {**os.environ, "NO_COLOR": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "optiq.cli.main", "generate", "Once upon a time", "--raw",
         "--port", str(server.port), "--max-tokens", "8", "--stats"],
        capture_output=True, text=True, timeout=HANG_S, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "8 generated tokens" in out.stderr


def test_cli_generate_says_when_only_hidden_reasoning_came(server):
    cmd = [sys.executable, "-m", "optiq.cli.main", "generate", "What is a lawyer?", "--think",
           "--port", str(server.port), "--max-tokens", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""  # the budget ran out inside <think>...</think>
    note = [line for line in out.stderr.splitlines() if line.startswith("note:")]
    assert note == ["note: no answer, only 4 hidden reasoning tokens: use --show-thinking "
                    "to see them (or a larger --max-tokens)"]
    shown = subprocess.run([*cmd, "--show-thinking"], capture_output=True, text=True, timeout=HANG_S)
    assert shown.returncode == 0 and shown.stdout.strip() and "note:" not in shown.stderr


def test_cli_chat_against_server(server):
    out = subprocess.run(
        [sys.executable, "-m", "optiq.cli.main", "chat", "--port", str(server.port),
         "--max-tokens", "6", "--no-think"],
        input="Hello there\n/reset\nHi again\n/exit\n", capture_output=True, text=True,
        timeout=HANG_S,
    )
    assert out.returncode == 0, out.stderr
    assert "Chatting with" in out.stderr and "(history cleared)" in out.stderr
    assert out.stdout.count(">>> ") == 4


def test_cli_generate_reports_unreachable_server():
    out = subprocess.run(
        [sys.executable, "-m", "optiq.cli.main", "generate", "hi", "--port", "1"],
        capture_output=True, text=True, timeout=HANG_S,
    )
    assert out.returncode == 1
    assert "error: server 127.0.0.1:1 unavailable" in out.stderr


def test_node_client_streams_and_cancels(server, client):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (CI installs Node 20)")
    project = REPO / "tests" / "node"
    if not (project / "node_modules" / "@grpc" / "grpc-js").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed")
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=project,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    out = subprocess.run([node, "client.js", server.target, str(REPO / "proto")], cwd=project,
                         capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr + out.stdout
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["health"] == "SERVING"  # via proto/grpc/health/v1/health.proto alone
    assert seen["reason"] == "FINISH_REASON_LENGTH" and seen["completion_tokens"] == 8
    assert seen["cancel_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert seen["active_after_cancel"] == 0
    # the Node client sees the same greedy tokens as the Python one
    py = ids_of(collect(client.generate(prompt="The quick brown fox", max_tokens=8,
                                        ignore_eos=True, temperature=0.0))[0])
    assert seen["tokens"] == py
