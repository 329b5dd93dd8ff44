"""Server lifecycle and security: loading/draining health, SIGTERM, auth, TLS,
message limits, and the --kv-config / --adapter wiring checked against mlx-lm."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from optiq.v1 import generation_pb2 as pb

from optiq.core.errors import ConfigError, ModelLoadError
from optiq.runtime.client import Client
from optiq.runtime.config import ServeConfig, is_loopback, read_generation_config
from serving import HANG_S, ServerProcess, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_path(bundled_model_dir) -> str:
    return str(bundled_model_dir)


def collect(call):
    deltas, fin = [], None
    for r in call:
        if r.HasField("finished"):
            fin = r.finished
        else:
            deltas.append(r.delta)
    return deltas, fin


def ids_of(deltas):
    return [t for d in deltas for t in d.token_ids]


# ------------------------------------------------------------------ config checks (fast)


def test_loopback_detection():
    for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"):
        assert is_loopback(h), h
    for h in ("0.0.0.0", "::", "192.168.1.4", "example.com"):
        assert not is_loopback(h), h


def test_non_loopback_bind_needs_api_key(bundled_model_dir):
    with pytest.raises(ConfigError, match="API key"):
        ServeConfig(model=model_path(bundled_model_dir), host="0.0.0.0").check()
    ServeConfig(model=model_path(bundled_model_dir), host="0.0.0.0", api_key="k").check()
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        ServeConfig(tls_cert=Path("x.pem")).check()


def test_cli_serve_refuses_bad_setups(tmp_path):
    from optiq.cli.main import main

    def run(*args):
        out = subprocess.run(["optiq", "serve", *args], capture_output=True, text=True,
                             timeout=HANG_S, env={**os.environ, "OPTIQ_API_KEY": ""})
        return out.returncode, out.stderr

    assert main  # the entry point module imports without MLX work
    rc, err = run("--host", "0.0.0.0", "--port", "0")
    assert rc == 1 and "error: binding 0.0.0.0" in err
    rc, err = run("--port", "5000", "--http-port", "5000")
    assert rc == 1 and "also the gRPC --port" in err
    rc, err = run(str(tmp_path / "missing"), "--port", "0")
    assert rc == 1 and "error:" in err and "does not exist" in err
    rc, err = run("--adapter", "no-equals-sign", "--port", "0")
    assert rc == 1 and "NAME=DIR" in err


def test_clients_import_without_mlx():
    code = (
        "import sys\n"
        "import optiq.runtime.client, optiq.cli.client\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')], 'mlx loaded'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert out.returncode == 0, out.stderr


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 77})
    )
    d = read_generation_config(tmp_path)
    assert (d.temperature, d.top_p, d.top_k, d.max_tokens) == (0.6, 0.95, 20, 77)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "do_sample": False}))
    assert read_generation_config(tmp_path).temperature == 0.0
    cfg = ServeConfig(temperature=0.3, max_tokens=5)
    d = cfg.defaults(tmp_path)
    assert d.temperature == 0.3 and d.max_tokens == 5


# ------------------------------------------------------------------ in-process lifecycle


@pytest.mark.slow
def test_not_serving_while_loading_then_serving(bundled_model_dir):
    from optiq.runtime.loader import make_loader
    from optiq.runtime.server import GenerationServer

    path = Path(model_path(bundled_model_dir))
    cfg = ServeConfig(model=path, port=0)
    gate = threading.Event()
    real = make_loader(cfg, path)

    class Flaky:
        """The real model, failing its forward pass on demand."""

        fail = False

        def __init__(self, model):
            self.model = model

        def __call__(self, *a, **kw):
            if Flaky.fail:
                raise RuntimeError("boom in forward")
            return self.model(*a, **kw)

        def __getattr__(self, name):
            return getattr(self.model, name)

    def slow_loader():
        gate.wait(HANG_S)
        lm = real()
        lm.model = Flaky(lm.model)
        return lm

    srv = GenerationServer(cfg, loader=slow_loader)
    srv.start()
    c = Client(f"127.0.0.1:{srv.port}")
    try:
        assert c.health() == NOT_SERVING
        assert c.health("optiq.v1.GenerationService") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            collect(c.generate(prompt="hi", max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in e.value.details()
        gate.set()
        assert srv.wait_ready(HANG_S)
        c.wait_serving(HANG_S)
        _, fin = collect(c.generate(prompt="hi", max_tokens=2, ignore_eos=True))
        assert fin.reason == pb.FINISH_REASON_LENGTH
        # an engine failure ends the request with a final ERROR event + INTERNAL status,
        # and the server keeps serving
        call = c.generate(prompt="hi", max_tokens=500, ignore_eos=True)
        assert next(call).HasField("delta")
        Flaky.fail = True
        events = []
        with pytest.raises(grpc.RpcError) as e:
            for r in call:
                events.append(r)
        Flaky.fail = False
        assert e.value.code() == grpc.StatusCode.INTERNAL and "boom" in e.value.details()
        assert events[-1].finished.reason == pb.FINISH_REASON_ERROR
        assert "boom" in events[-1].finished.error
        _, fin = collect(c.generate(prompt="hi", max_tokens=2, ignore_eos=True))
        assert fin.reason == pb.FINISH_REASON_LENGTH
        assert c.load().requests_failed == 1
    finally:
        gate.set()
        c.close()
        srv.shutdown(0)
    assert srv.wait(HANG_S)


@pytest.mark.slow
def test_load_failure_is_reported(bundled_model_dir):
    from optiq.runtime.server import GenerationServer

    def broken():
        raise ModelLoadError("weights are corrupt")

    srv = GenerationServer(ServeConfig(model=model_path(bundled_model_dir), port=0), loader=broken)
    srv.start()
    try:
        with pytest.raises(ModelLoadError, match="corrupt"):
            srv.wait_ready(HANG_S)
        with Client(f"127.0.0.1:{srv.port}") as c:
            assert c.health() == NOT_SERVING
    finally:
        srv.shutdown(0)


# ------------------------------------------------------------------ SIGTERM drain


@pytest.mark.slow
def test_sigterm_drains_then_cancels(bundled_model_dir):
    """SIGTERM: health goes NOT_SERVING, new requests get UNAVAILABLE, a request that
    ends within the grace finishes, one that does not is cancelled after it.

    No outcome depends on machine speed: SIGTERM is sent once the short request is
    ``LEFT`` tokens from its end (counted on the stream), and the grace is long enough
    for those few decode steps even on a loaded machine.
    """
    grace, n_short, left = 5, 40, 3
    srv = ServerProcess("--shutdown-grace", str(grace), model=model_path(bundled_model_dir)).start()
    c = Client(srv.target)
    try:
        c.wait_serving(HANG_S)
        short = c.generate(prompt="Once upon a time", max_tokens=n_short, ignore_eos=True)
        endless = c.generate(prompt="The little cat", max_tokens=100_000, ignore_eos=True)
        first_endless = next(endless)
        assert first_endless.HasField("delta")
        got = []
        for r in short:  # read the short stream up to a few tokens before its end
            assert r.HasField("delta"), "short request ended early"
            got.append(r)
            if sum(len(x.delta.token_ids) for x in got) >= n_short - left:
                break
        results = {}

        def drain(name, call, head):
            deltas, fin = collect(call)
            results[name] = ([x.delta for x in head] + deltas, fin)

        threads = [threading.Thread(target=drain, args=a)
                   for a in (("short", short, got), ("endless", endless, [first_endless]))]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        srv.proc.send_signal(15)
        wait_until(lambda: c.health() == NOT_SERVING, "health NOT_SERVING after SIGTERM")
        with pytest.raises(grpc.RpcError) as e:
            collect(c.generate(prompt="new", max_tokens=2))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(HANG_S)
        rc = srv.proc.wait(HANG_S)
        elapsed = time.monotonic() - t0
    finally:
        c.close()
        srv.kill()
    assert rc == 0, "\n".join(srv.log[-30:])
    assert results["short"][1].reason == pb.FINISH_REASON_LENGTH  # finished within the grace
    assert results["short"][1].usage.completion_tokens == n_short
    fin = results["endless"][1]
    assert fin.reason == pb.FINISH_REASON_CANCELLED and "shutting down" in fin.error
    assert elapsed >= grace - 0.5, "the endless request was cancelled before the grace ran out"


# ------------------------------------------------------------------ auth, TLS, limits


def make_cert(d: Path) -> tuple[Path, Path]:
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=HANG_S,
    )
    return cert, key


@pytest.mark.slow
def test_auth_tls_and_message_limits(bundled_model_dir, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = make_cert(tmp_path)
    key_value = "s3cret-token"
    with ServerProcess(
        "--host", "0.0.0.0", "--api-key", key_value, "--tls-cert", str(cert), "--tls-key", str(key),
        "--max-message-mb", "1", "--http-port", "0", model=model_path(bundled_model_dir),
    ) as srv:
        good = Client(srv.target, api_key=key_value, tls_ca=cert)
        anon = Client(srv.target, api_key="", tls_ca=cert)
        wrong = Client(srv.target, api_key="nope", tls_ca=cert)
        plain = Client(srv.target, api_key=key_value)
        try:
            good.wait_serving(HANG_S)
            assert anon.health() == SERVING  # health needs no token
            _, fin = collect(good.generate(prompt="hi", max_tokens=3, ignore_eos=True))
            assert fin.reason == pb.FINISH_REASON_LENGTH
            assert good.model_info().model_id
            for c in (anon, wrong):
                for rpc in (lambda c=c: c.model_info(), lambda c=c: collect(c.generate(prompt="hi"))):
                    with pytest.raises(grpc.RpcError) as e:
                        rpc()
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # reflection is protected too
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
                ProtoReflectionDescriptorDatabase,
            )

            with pytest.raises(grpc.RpcError) as e:
                ProtoReflectionDescriptorDatabase(anon.channel).get_services()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "optiq.v1.GenerationService" in ProtoReflectionDescriptorDatabase(
                good.channel).get_services()
            # a plaintext client cannot talk to a TLS server
            with pytest.raises(grpc.RpcError) as e:
                plain.health(timeout=HANG_S)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            # messages over the server's 1 MiB limit are refused by gRPC itself
            with pytest.raises(grpc.RpcError) as e:
                collect(good.generate(prompt="x" * (2 * 1024 * 1024), max_tokens=1))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            check_http_auth_tls(srv, key_value, cert)
        finally:
            for c in (good, anon, wrong, plain):
                c.close()


def check_http_auth_tls(srv, key_value: str, cert: Path) -> None:
    """The HTTP front of the same server: HTTPS with the same certificate, the same
    key, the same message limit."""
    import ssl

    import openai

    assert srv.http_url.startswith("https://")
    trust = ssl.create_default_context(cafile=str(cert))

    def client(key: str) -> "openai.OpenAI":
        return openai.OpenAI(base_url=srv.http_url + "/v1", api_key=key, max_retries=0,
                             http_client=openai.DefaultHttpxClient(verify=trust))

    good = client(key_value)
    (model,) = [m.id for m in good.models.list()]
    r = good.completions.create(model=model, prompt="hi", max_tokens=3,
                                extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        client("nope").models.list()
    with pytest.raises(openai.APIStatusError) as e:
        good.completions.create(model=model, prompt="x" * (2 * 1024 * 1024))
    assert e.value.status_code == 413 and "--max-message-mb" in e.value.body["message"]
    plain = openai.OpenAI(base_url=srv.http_url.replace("https", "http") + "/v1",
                          api_key=key_value, max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        plain.models.list()


# ------------------------------------------------------------------ KV config + adapters


def make_adapter(model, out: Path, seed: int, scale: float = 1.0) -> Path:
    """A stock mlx-lm-format LoRA adapter with random factors on a few linear layers."""
    import mlx.core as mx

    from optiq.core.architecture import decoder_layers
    from optiq.train.targets import is_adaptable, module_dims

    mx.random.seed(seed)
    weights = {}
    layers = decoder_layers(model)
    prefix = next(p for p, m in model.named_modules() if m is layers[0]).rsplit(".", 1)[0]
    for i in (0, len(layers) - 1):
        for name, mod in layers[i].named_modules():
            if name.endswith(("v_proj", "down_proj", "out_proj", "o_proj")) and is_adaptable(mod):
                d_in, d_out, _ = module_dims(mod)
                weights[f"{prefix}.{i}.{name}.lora_a"] = mx.random.normal((d_in, 4)) * 0.3
                weights[f"{prefix}.{i}.{name}.lora_b"] = mx.random.normal((4, d_out)) * 0.3
    assert weights
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": len(layers),
        "lora_parameters": {"rank": 4, "scale": scale, "dropout": 0.0},
    }))
    return out


@pytest.mark.slow
def test_kv_config_and_adapters_match_mlx_lm(bundled_model_dir, tmp_path):
    """Per-request adapters in one batch with a mixed-precision KV cache give the same
    greedy tokens as stock mlx-lm with that adapter (or none) and that cache."""
    from mlx_lm.generate import stream_generate

    from optiq.core.kv import kv_layout, make_kv_cache, save_kv_config, uniform_kv_config
    from optiq.core.model_io import load_model
    from optiq.train.adapters import load_adapters

    path = Path(model_path(bundled_model_dir))
    ref = load_model(path)
    kv = uniform_kv_config(kv_layout(ref.model), 8, 4)
    kv_file = save_kv_config(kv, tmp_path / "kv_config.json")
    adapters = {"alpha": make_adapter(ref.model, tmp_path / "alpha", 1),
                "beta": make_adapter(ref.model, tmp_path / "beta", 2, scale=2.0)}
    prompt = "Once upon a time"
    ids = ref.tokenizer.encode(prompt)
    ref.tokenizer.eos_token_ids = set()

    def reference(adapter: str | None) -> list[int]:
        m = load_model(path)
        if adapter:
            load_adapters(m.model, adapters[adapter])
        cache = make_kv_cache(m.model, kv)
        return [r.token for r in stream_generate(m.model, ref.tokenizer, ids, max_tokens=10,
                                                 prompt_cache=cache)]

    expected = {a: reference(a) for a in (None, "alpha", "beta")}
    assert len({tuple(v) for v in expected.values()}) == 3, "adapters must change the output"

    # prefill_step_size 512: a lone prompt is prefilled by the engine and its first token
    # sent at once; 2: every prompt goes through BatchGenerator's chunked batch prefill
    for step in (512, 2):
        check_server(ServeConfig(model=path, port=0, kv_config=kv_file, adapters=adapters,
                                 temperature=0.0, prefill_step_size=step),
                     kv, kv_layout(ref.model).indices, prompt, expected)


def check_server(config, kv, kv_indices, prompt, expected):
    from optiq.runtime.server import GenerationServer

    srv = GenerationServer(config)
    srv.start()
    c = Client(f"127.0.0.1:{srv.port}")
    try:
        assert srv.wait_ready(HANG_S)
        info = c.model_info()
        assert [a.name for a in info.adapters] == ["alpha", "beta"]
        assert all(a.num_layers > 0 for a in info.adapters)
        assert {(x.k_bits, x.v_bits) for x in info.kv_cache.layers} == {(8, 4)}
        assert [x.layer for x in info.kv_cache.layers] == kv_indices
        assert info.kv_cache.bits_per_element == pytest.approx(kv.achieved_bits)

        def run(adapter):
            return ids_of(collect(c.generate(prompt=prompt, max_tokens=10, ignore_eos=True,
                                             adapter=adapter or ""))[0])

        for a in (None, "alpha", "beta"):
            assert run(a) == expected[a], (a, config.prefill_step_size)
        # all three in one batch: each row keeps its own adapter
        results = {}
        threads = [threading.Thread(target=lambda a=a: results.__setitem__(a, run(a)))
                   for a in (None, "alpha", "beta", "alpha")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == expected
    finally:
        c.close()
        srv.shutdown(0)
