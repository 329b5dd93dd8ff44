"""optiq convert end to end: stock mlx_lm.load loads the result, metadata, errors, resume."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from optiq.cli.main import main
from optiq.core.errors import ConfigError, DataError, ModelLoadError
from optiq.core.quant import convert, read_metadata
from optiq.core.quant.targets import find_targets

SMALL = dict(n_calibration=2, seq_len=64)


def _stock_load(path):
    from mlx_lm.utils import load

    return load(str(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, bundled_model_dir):
    out = tmp_path_factory.mktemp("conv") / "q"
    res = convert(None, out, target_bpw=4.5, candidate_bits=(3, 4, 8), **SMALL)
    return res, out


@pytest.mark.slow
def test_convert_writes_a_model_stock_mlx_lm_loads(converted):
    from mlx_lm.utils import compute_bits_per_weight

    res, out = converted
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "optiq_metadata.json", "sensitivity.png"} <= names
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, tok = _stock_load(out)
    cfg = json.loads((out / "config.json").read_text())
    meta = read_metadata(out)
    q = cfg["quantization"]
    assert q["mode"] == "affine" and q == cfg["quantization_config"]
    # every quantized leaf has an explicit entry that matches the metadata and the model
    mods = dict(model.named_modules())
    for path, d in meta["layers"].items():
        assert q[path] == {"group_size": d["group_size"], "bits": d["bits"], "mode": "affine"}
        assert mods[path].bits == d["bits"]
        assert set(d["sensitivity"]) == ({"3", "4", "8"} if not d["pinned"] else {str(d["bits"])})
    assert abs(res.weight_bpw - 4.5) < 0.05 and res.weight_bpw <= 4.5 + 1e-9
    assert res.effective_bpw == pytest.approx(compute_bits_per_weight(model), abs=1e-6)
    assert meta["achieved"]["effective_bpw"] == pytest.approx(res.effective_bpw, abs=1e-5)
    assert res.size_bytes == (out / "model.safetensors").stat().st_size
    assert {int(b) for b in meta["bits_histogram"]} <= {3, 4, 8}
    # scales and biases in the source dtype, like mlx_lm.convert
    assert mods[next(iter(meta["layers"]))]["scales"].dtype == mx.bfloat16


@pytest.mark.slow
def test_converted_model_quality_and_prediction(converted, bundled_model_dir):
    from optiq.core.evaluate import load_texts, mean_kl, token_windows
    from optiq.core.model_io import load_model

    res, out = converted
    ref = load_model(bundled_model_dir)
    q = load_model(out)
    win = token_windows(ref.tokenizer, load_texts(None), 128, max_tokens=1024)
    kl = mean_kl(q.model, ref.model, ref.tokenizer, win).mean_kl
    assert 0 < kl < 0.05
    # the additive prediction is the right order of magnitude (held-out text differs)
    assert res.predicted_kl / 5 < kl < res.predicted_kl * 5


@pytest.mark.slow
def test_written_weights_equal_the_fake_quant_reference(tmp_path, bundled_model_dir):
    """Codes/scales we compute load bit-exactly: stock load's logits == fake-quant logits."""
    from optiq.core.cpu import cast_floats, prepare_for_cpu
    from optiq.core.model_io import load_model
    from optiq.core.quant.rounding import quantize_weight
    from optiq.core.quant.targets import get_module
    from optiq.core.quant.writer import (
        apply_quantization, param_dtypes, quantization_config, restore_dtypes, write_model_dir,
    )

    lm = load_model(bundled_model_dir, fast_cpu=False)
    model = lm.model
    dtypes = param_dtypes(model)
    cast_floats(model, mx.float32)
    targets = [t for t in find_targets(model, 64) if t.quantizable]
    bits_cycle = (2, 3, 4, 5, 6, 8)
    qs = {}
    for i, t in enumerate(targets):
        w = np.asarray(get_module(model, t.path)["weight"])
        b = bits_cycle[i % len(bits_cycle)]
        qs[t.path] = quantize_weight(w, [b], 64, mx.bfloat16, "clip")[b]
    x = mx.array(np.arange(96, dtype=np.int32).reshape(2, 48) % 2000)
    fake = lm.model
    originals = {t.path: get_module(fake, t.path)["weight"] for t in targets}
    for t in targets:
        get_module(fake, t.path)["weight"] = mx.array(qs[t.path].dequantize())
    want = fake(x)
    for t in targets:
        get_module(fake, t.path)["weight"] = originals[t.path]
    apply_quantization(model, qs, mx.bfloat16)
    restore_dtypes(model, dtypes)
    cfg = dict(lm.config)
    cfg["quantization"] = quantization_config({p: (q.bits, 64) for p, q in qs.items()}, 64)
    write_model_dir(tmp_path / "w", model, cfg, bundled_model_dir, {"test": True})
    stock, _ = _stock_load(tmp_path / "w")
    assert {m.bits for _, m in stock.named_modules() if hasattr(m, "bits")} == set(bits_cycle)
    prepare_for_cpu(stock, force=True)  # fp32 scales: dequantize exactly
    got = stock(x)
    assert mx.abs(got - want).max().item() < 1e-3 * max(1.0, mx.abs(want).max().item())


@pytest.mark.slow
def test_static_method_needs_no_calibration(tmp_path, bundled_model_dir):
    res = convert(None, tmp_path / "s", target_bpw=4.25, candidate_bits="4,5,8", method="static")
    assert res.method == "static" and res.rounding == "clip" and res.calibration is None
    assert 4.0 <= res.weight_bpw <= 4.25 + 1e-9
    assert "passes" not in res.seconds
    meta = read_metadata(tmp_path / "s")
    assert meta["method"] == "static" and meta["sensitivity_unit"].startswith("static")
    # rule weights: the head and value/down projections outrank query/up projections
    from optiq.core.quant.static import role_weight

    _stock_load(tmp_path / "s")
    ts = {t.path: t for t in find_targets(_stock_load(bundled_model_dir)[0], 64)}
    w = {p: role_weight(t) for p, t in ts.items()}
    head = next(p for p in w if p.endswith("lm_head"))
    down = next(p for p in w if p.endswith("0.mlp.down_proj"))
    up = next(p for p in w if p.endswith("0.mlp.up_proj"))
    assert w[head] > w[down] > w[up]
    bits = [d["bits"] for d in meta["layers"].values()]
    assert min(bits) == 4 and max(bits) > 4  # the spare budget went somewhere


@pytest.mark.slow
def test_moe_router_gates_follow_the_model(tmp_path, tiny_moe_dir):
    res = convert(tiny_moe_dir, tmp_path / "moe", target_bpw=4.5, candidate_bits=(4, 8), **SMALL)
    meta = read_metadata(tmp_path / "moe")
    gates = {p: d for p, d in meta["layers"].items() if p.endswith(("mlp.gate", "shared_expert_gate"))}
    experts = {p: d for p, d in meta["layers"].items() if "switch_mlp" in p}
    assert gates and all(d["bits"] == 8 and d["pinned"] for d in gates.values())
    assert len(experts) == 3 * 8 and all(d["kind"] == "experts" for d in experts.values())
    model, _ = _stock_load(tmp_path / "moe")
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    for p in gates:
        assert cfg["quantization"][p]["bits"] == 8
    model.set_dtype(mx.float32)  # MLX's CPU gather_mm needs fp32
    logits = model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]]))
    assert np.isfinite(np.array(logits)).all()
    assert res.weight_bpw <= 4.5 + 1e-9


@pytest.mark.slow
def test_effective_bpw_target(tmp_path, converted):
    res0, _ = converted
    target = round(res0.effective_bpw - 0.1, 3)
    res = convert(None, tmp_path / "e", target_bpw=target, candidate_bits=(3, 4, 8), bpw_kind="effective",
                  sensitivities_file=tmp_path / "sens.json", **SMALL)
    assert target - 0.02 <= res.effective_bpw <= target + 1e-9
    # a second target reuses the sensitivities file: no new passes
    res2 = convert(None, tmp_path / "e2", target_bpw=target + 0.05, candidate_bits=(3, 4, 8), bpw_kind="effective",
                   sensitivities_file=tmp_path / "sens.json", **SMALL)
    assert res2.resumed_layers == len(res2.layers) and res2.seconds["passes"] == 0
    with pytest.raises(ConfigError, match="outside what candidates"):
        convert(None, tmp_path / "e3", target_bpw=9.0, candidate_bits=(3, 4, 8), bpw_kind="effective", **SMALL)


@pytest.mark.slow
def test_interrupted_convert_leaves_no_output_and_resumes(tmp_path):
    out = tmp_path / "r"
    calls = []

    def stop_after_three(path, bits, n):
        calls.append(path)
        if n == 3:
            raise KeyboardInterrupt

    kw = dict(target_bpw=6.0, candidate_bits=(4, 8), estimator="measured", n_calibration=1, seq_len=32)
    with pytest.raises(KeyboardInterrupt):
        convert(None, out, on_pass=stop_after_three, **kw)
    assert not out.exists()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == [".r.optiq-checkpoint.json"]  # no half-written model, only the checkpoint
    ckpt = json.loads((tmp_path / leftovers[0]).read_text())
    assert len(ckpt["results"]) >= 1
    res = convert(None, out, **kw)
    assert res.resumed_layers == len(ckpt["results"])
    assert res.seconds["passes"] < sum(1 for lr in res.layers if lr.bits) * 2
    assert out.exists() and not (tmp_path / leftovers[0]).exists()


@pytest.mark.slow
def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from optiq.core.quant.shards import ShardWriter

    real, calls = ShardWriter.write_rows, []

    def boom(self, *a, **k):  # fails part-way through the shards
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(ShardWriter, "write_rows", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(None, tmp_path / "f", method="static", target_bpw=4.5)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_force_overwrites(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        convert(None, out, method="static")
    convert(None, out, method="static", force=True, plot=False)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(candidate_bits="4,7"), ConfigError, "candidate bit width 7 cannot be stored"),
        (dict(candidate_bits="4,8", target_bpw=3.5), ConfigError, "below the smallest"),
        (dict(candidate_bits="4,8", target_bpw=8.5), ConfigError, "above the largest"),
        (dict(group_size=48), ConfigError, "group size"),
        (dict(method="magic"), ConfigError, "unknown --method"),
        (dict(method="static", rounding="gptq"), ConfigError, "cannot use GPTQ"),
        (dict(calibration="/nonexistent/c.jsonl"), DataError, "does not exist"),
        (dict(estimator="guess"), ConfigError, "unknown estimator"),
    ],
)
def test_errors_before_any_work(tmp_path, monkeypatch, kwargs, err, match):
    import optiq.core.model_io as mio

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(mio, "load_model", no_load)
    with pytest.raises(err, match=match):
        convert(None, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_already_quantized_source_is_refused(tmp_path):
    out = tmp_path / "q"
    convert(None, out, method="static", plot=False)
    with pytest.raises(ModelLoadError, match="already quantized"):
        convert(out, tmp_path / "qq", method="static")


def test_cli_errors_are_one_line(capsys, tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text("{oops\n")
    cases = [
        (["convert", "-o", str(tmp_path / "a"), "--candidate-bits", "4,9"], "candidate bit width 9 cannot be stored"),
        (["convert", "-o", str(tmp_path / "a"), "--target-bpw", "2"], "below the smallest"),
        (["convert", "-o", str(tmp_path), "--method", "static"], "already exists"),
        (["convert", "-o", str(tmp_path / "a"), "--calibration", str(bad)], "not valid JSON"),
    ]
    for argv, match in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and match in err and "\n" not in err


@pytest.mark.slow
def test_cli_convert_prints_the_final_table(capsys, tmp_path):
    main_ok = None
    try:
        main(["convert", "-o", str(tmp_path / "c"), "--method", "static", "--candidate-bits", "4,8", "--target-bpw", "5"])
    except SystemExit as e:  # pragma: no cover - main only exits on errors
        main_ok = e.code
    assert main_ok in (None, 0)
    out = capsys.readouterr().out
    for needle in ("bits per weight:", "effective bpw:", "size on disk:", "predicted KL:", "layers"):
        assert needle in out
    assert "    8 " in out and "    4 " in out


def test_targets_report_layers_that_cannot_be_quantized():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(96, 8)
            self.b = nn.Linear(100, 8)
            self.c = nn.Linear(128, 8)
            self.layers = []

    ts = {t.path: t for t in find_targets(M(), 64)}
    assert ts["c"].group_size == 64 and ts["c"].quantizable
    assert ts["a"].group_size == 32 and "group size 32" in ts["a"].notes[0]
    assert not ts["b"].quantizable and "not divisible" in ts["b"].skip_reason


@pytest.mark.slow
def test_fisher_estimate_agrees_with_measured_kl(bundled_model_dir):
    from optiq.core.cpu import cast_floats
    from optiq.core.model_io import load_model
    from optiq.core.calibration import build_calibration
    from optiq.core.quant.fisher import fisher_sensitivities
    from optiq.core.quant.sensitivity import capture_reference, measure_sensitivities

    lm = load_model(bundled_model_dir, fast_cpu=False)
    cast_floats(lm.model, mx.float32)
    cal = build_calibration(lm.tokenizer, None, 2, 128)
    targets = [t for t in find_targets(lm.model, 64) if t.quantizable]
    pick = [t for t in targets if t.layer in (2, 5, 7) or t.path.endswith("lm_head")]
    ref = capture_reference(lm.model, cal.tokens, pick)
    est = fisher_sensitivities(lm.model, ref, pick, (4,), mx.bfloat16, "gptq", n_probes=4)
    meas = measure_sensitivities(lm.model, ref, pick, (4,), mx.bfloat16, "gptq")
    a = np.array([meas[t.path].kl[4] for t in pick])
    b = np.array([est[t.path].kl[4] for t in pick])
    big = a > 1e-5
    assert big.sum() >= 5
    assert np.corrcoef(np.log(a[big]), np.log(b[big]))[0, 1] > 0.9
    assert np.median(b[big] / a[big]) == pytest.approx(1.0, abs=0.3)


@pytest.mark.slow
def test_dense_llama_with_tied_embeddings_and_fp16(tmp_path, bundled_model_dir):
    """Not only the bundled architecture: a Llama-style fp16 model with a tied head."""
    from optiq.core.tiny_models import build_model, copy_tokenizer_files, save_model_dir

    cfg = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 2048, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True, "torch_dtype": "float16", "max_position_embeddings": 512,
           "rope_theta": 10000.0}
    src = tmp_path / "llama"
    save_model_dir(build_model(cfg, seed=1), cfg, src, dtype=mx.float16)
    copy_tokenizer_files(bundled_model_dir, src)
    res = convert(src, tmp_path / "q", target_bpw=4.5, candidate_bits=(3, 4, 8), **SMALL)
    emb = next(lr for lr in res.layers if lr.path.endswith("embed_tokens"))
    assert emb.kind == "embedding" and emb.bits is not None and set(emb.kl) == {3, 4, 8}
    assert not any(lr.path.endswith("lm_head") for lr in res.layers)  # tied: no separate head
    model, _ = _stock_load(tmp_path / "q")
    assert model.model.embed_tokens.bits == emb.bits
    assert model.model.embed_tokens["scales"].dtype == mx.float16
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3, 4]])).astype(mx.float32))).all()
