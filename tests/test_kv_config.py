"""kv_config.json schema validation and the K/V bit allocation (no model needed)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from optiq.core.errors import ConfigError
from optiq.core.kv import quant
from optiq.core.kv.allocate import allocate_kv_bits
from optiq.core.kv.config import (
    KVConfig,
    check_matches_model,
    kv_config_from_dict,
    load_kv_config,
    save_kv_config,
    uniform_kv_config,
)
from optiq.core.kv.layers import KVLayer, KVLayout, SkippedLayer
from optiq.core.kv.sensitivity import KVSensitivity

GDN = "fixed-size recurrent state"


def hybrid_layout(kv=(3, 7), n=8, heads=1, dim=64) -> KVLayout:
    return KVLayout(
        model_type="qwen3_5",
        num_layers=n,
        vocab_size=2048,
        kv_layers=tuple(KVLayer(i, heads, dim, dim) for i in kv),
        skipped=tuple(SkippedLayer(i, "ArraysCache", GDN) for i in range(n) if i not in kv),
    )


def sample_config() -> KVConfig:
    layout = hybrid_layout()
    return KVConfig(model=layout, group_size=64, layers={3: (8, 4), 7: (4, 4)}, target_bits=5.5,
                    candidate_bits=(4, 8), model_name="optiq-tiny", extra={"measured_kl": 0.01})


def test_round_trip(tmp_path):
    cfg = sample_config()
    path = save_kv_config(cfg, tmp_path / "kv_config.json")
    data = json.loads(path.read_text())
    assert data["format"] == "optiq-kv-config" and data["version"] == 2
    assert data["rotation"] == "hadamard"
    assert data["layers"] == [{"layer": 3, "k_bits": 8, "v_bits": 4}, {"layer": 7, "k_bits": 4, "v_bits": 4}]
    assert [s["layer"] for s in data["skipped_layers"]] == [0, 1, 2, 4, 5, 6]
    # (8.5 + 4.5 + 4.5 + 4.5) / 4 stored bits per element, 64 elements each per token
    assert data["achieved_bits"] == pytest.approx(5.5)
    assert data["kv_bytes_per_token"] == pytest.approx(64 * 22 / 8)
    assert data["fp16_kv_bytes_per_token"] == 4 * 64 * 2
    back = load_kv_config(path)
    assert back.layers == cfg.layers and back.model == cfg.model and back.group_size == 64
    assert back.rotation == "hadamard" and "rotation" not in back.extra
    assert back.extra["measured_kl"] == 0.01
    assert load_kv_config(tmp_path).layers == cfg.layers  # a directory means DIR/kv_config.json


def _errors(mutate) -> str:
    data = sample_config().to_dict()
    mutate(data)
    with pytest.raises(ConfigError) as e:
        kv_config_from_dict(data, "kv_config.json")
    return str(e.value)


def test_validation_errors():
    assert "layer 0 has no KV cache (ArraysCache" in _errors(lambda d: d["layers"].append({"layer": 0, "k_bits": 4, "v_bits": 4}))
    assert "k_bits 7 cannot be stored" in _errors(lambda d: d["layers"][0].update(k_bits=7))
    assert "v_bits 16 cannot be stored" in _errors(lambda d: d["layers"][0].update(v_bits=16))
    assert "MLX affine quantization takes 2, 3, 4, 5, 6, 8 bits" in _errors(lambda d: d["layers"][0].update(k_bits=1))
    assert "no bits given for KV layer(s) [7]" in _errors(lambda d: d["layers"].pop())
    assert "listed twice" in _errors(lambda d: d["layers"].append(dict(d["layers"][0])))
    assert "not one of the model's KV layers" in _errors(lambda d: d["layers"].append({"layer": 12, "k_bits": 4, "v_bits": 4}))
    assert "unsupported kv_config version 3" in _errors(lambda d: d.update(version=3))
    assert "unknown rotation 'givens' (supported: none, hadamard)" in _errors(lambda d: d.update(rotation="givens"))
    assert "missing 'rotation'" in _errors(lambda d: d.pop("rotation"))
    assert "'rotation' has the wrong type" in _errors(lambda d: d.update(rotation=1))
    assert "not an OptiQ KV config" in _errors(lambda d: d.pop("format"))
    assert "group size 48 is not supported" in _errors(lambda d: d.update(group_size=48))
    assert "missing 'k_bits'" in _errors(lambda d: d["layers"][0].pop("k_bits"))
    assert "wrong type" in _errors(lambda d: d["layers"][0].update(k_bits="8"))


def test_version_1_file_means_no_rotation(tmp_path):
    """Version-1 configs predate the rotation: they were measured on unrotated K/V."""
    data = sample_config().to_dict()
    data["version"] = 1
    del data["rotation"]
    path = tmp_path / "kv_config.json"
    path.write_text(json.dumps(data))
    cfg = load_kv_config(path)
    assert cfg.rotation == "none" and cfg.layers == {3: (8, 4), 7: (4, 4)}
    assert save_kv_config(cfg, path) and json.loads(path.read_text())["rotation"] == "none"  # re-saved as v2
    assert load_kv_config(path).rotation == "none"


def test_rotation_none_round_trips_and_bytes_do_not_depend_on_it(tmp_path):
    rotated = sample_config()
    plain = sample_config()
    plain.rotation = "none"
    assert load_kv_config(save_kv_config(plain, tmp_path / "kv_config.json")).rotation == "none"
    assert plain.bytes_per_token == rotated.bytes_per_token  # the rotation stores nothing
    assert uniform_kv_config(hybrid_layout(), 4, rotation="none").rotation == "none"
    with pytest.raises(ConfigError, match="KV rotation 'rot' is not supported: use one of none, hadamard"):
        uniform_kv_config(hybrid_layout(), 4, rotation="rot")


def test_group_size_must_divide_head_dim():
    data = sample_config().to_dict()
    for k in data["model"]["kv_layers"]:
        k["k_head_dim"] = k["v_head_dim"] = 96
    with pytest.raises(ConfigError, match="does not divide the model's head_dim 96"):
        kv_config_from_dict(data)
    with pytest.raises(ConfigError, match="does not divide"):
        uniform_kv_config(hybrid_layout(dim=32), 4, group_size=64)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_kv_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_kv_config(bad)


def test_wrong_model_is_refused():
    cfg = sample_config()
    check_matches_model(cfg, hybrid_layout())  # same shape: fine
    with pytest.raises(ConfigError, match="made for a different model.*optiq-tiny"):
        check_matches_model(cfg, hybrid_layout(kv=(3, 7), heads=2))
    with pytest.raises(ConfigError, match="different model"):
        check_matches_model(cfg, hybrid_layout(kv=(1, 3, 5, 7)))
    dense = KVLayout("llama", 8, 2048, tuple(KVLayer(i, 1, 64, 64) for i in range(8)), ())
    with pytest.raises(ConfigError, match="different model"):
        check_matches_model(cfg, dense)
    other_hybrid = KVLayout("qwen3_5", 8, 2048, (KVLayer(7, 1, 64, 64),),
                            tuple(SkippedLayer(i, "ArraysCache", GDN) for i in range(7)))
    with pytest.raises(ConfigError, match="layer 3 has no KV cache in this model"):
        check_matches_model(cfg, other_hybrid)


def test_bits_per_element():
    assert quant.bits_per_element(4, 64) == 4.5
    assert quant.bits_per_element(8, 32) == 9.0


# ------------------------------------------------------------------ allocation


def fake_sensitivity(layout: KVLayout, bits=(4, 8), seed=0, kl=None) -> KVSensitivity:
    rng = random.Random(seed)
    table = kl or {
        kv.index: {t: {b: rng.uniform(0.1, 1.0) * 2.0 ** (-b) for b in bits} for t in ("k", "v")}
        for kv in layout.kv_layers
    }
    return KVSensitivity(kl=table, candidate_bits=tuple(bits), group_size=64, seq_len=16, n_samples=1, seconds=0)


def test_allocation_spends_bits_on_the_sensitive_tensor():
    layout = hybrid_layout()
    kl = {3: {"k": {4: 1.0, 8: 0.01}, "v": {4: 0.1, 8: 0.01}}, 7: {"k": {4: 0.2, 8: 0.01}, "v": {4: 0.05, 8: 0.01}}}
    sens = fake_sensitivity(layout, kl=kl)
    assert allocate_kv_bits(sens, layout, 4.5).bits == {3: (4, 4), 7: (4, 4)}  # budget = uniform 4-bit
    a = allocate_kv_bits(sens, layout, 5.5)  # room for exactly one 8-bit tensor
    assert a.bits == {3: (8, 4), 7: (4, 4)} and a.achieved_bits == pytest.approx(5.5)
    assert a.predicted_kl == pytest.approx(0.01 + 0.1 + 0.2 + 0.05)
    assert allocate_kv_bits(sens, layout, 6.6).bits == {3: (8, 4), 7: (8, 4)}
    assert allocate_kv_bits(sens, layout, 100).bits == {3: (8, 8), 7: (8, 8)}
    with pytest.raises(ConfigError, match="below what the candidates can store"):
        allocate_kv_bits(sens, layout, 4.4)


def test_allocation_is_optimal_against_brute_force():
    layout = KVLayout("x", 6, 10, (KVLayer(0, 2, 64, 64), KVLayer(2, 1, 128, 64), KVLayer(5, 4, 64, 64)), ())
    bits = (2, 4, 6, 8)
    for seed in range(5):
        sens = fake_sensitivity(layout, bits=bits, seed=seed)
        items = [(kv, t) for kv in layout.kv_layers for t in ("k", "v")]
        total = sum(kv.k_elements + kv.v_elements for kv in layout.kv_layers)
        for target in (3.0, 4.7, 6.2):
            best = None
            for combo in itertools.product(bits, repeat=len(items)):
                stored = sum((kv.k_elements if t == "k" else kv.v_elements) * quant.bits_per_element(b, 64)
                             for (kv, t), b in zip(items, combo))
                if stored / total > target + 1e-9:
                    continue
                loss = sum(sens.kl[kv.index][t][b] for (kv, t), b in zip(items, combo))
                best = loss if best is None else min(best, loss)
            a = allocate_kv_bits(sens, layout, target)
            assert a.achieved_bits <= target + 1e-9
            assert a.predicted_kl == pytest.approx(best, rel=1e-9)
