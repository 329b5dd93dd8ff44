"""``optiq kv-cache`` end to end on the bundled model, and its up-front errors."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.utils import save_config, save_model
from optiq.cli.main import main
from optiq.core.kv import kv_layout, load_kv_config
from optiq.core.mlx_lm_seam import model_classes
from optiq.core.model_io import load_model
from optiq.core.tiny_models import copy_tokenizer_files


@pytest.fixture(scope="module")
def model_dir(bundled_model_dir) -> Path:
    return Path(bundled_model_dir)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_kv_cache_end_to_end(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "kv"
    code, out, err = run_cli(
        ["kv-cache", str(model_dir), "--target-bits", "6.5", "--candidate-bits", "4,8",
         "--seq-len", "64", "--n-samples", "2", "-o", str(out_dir)], capsys)
    assert code == 0, err
    assert "skipped layer 0: ArraysCache" in out and "KV layers [3, 7]" in out
    assert "mean over KV bytes actually stored" in out
    files = {p.name for p in out_dir.iterdir()}
    assert files == {"kv_config.json", "kv_sensitivity.json", "kv_sensitivity.png"}
    assert (out_dir / "kv_sensitivity.png").read_bytes()[:4] == b"\x89PNG"

    lm = load_model(model_dir)
    cfg = load_kv_config(out_dir / "kv_config.json", lm.model)  # validates against the model
    assert sorted(cfg.layers) == [3, 7]
    assert cfg.achieved_bits <= 6.5 + 1e-9 and cfg.target_bits == 6.5
    # 6.5 bits leaves room for exactly two of the four tensors at 8 bits: the budget is used
    assert sum(b == 8 for kv in cfg.layers.values() for b in kv) == 2
    data = json.loads((out_dir / "kv_config.json").read_text())
    assert data["measured_kl"] > 0 and data["predicted_kl"] > 0
    assert data["rotation"] == "hadamard" and cfg.rotation == "hadamard"  # the default
    assert "K/V rotation: hadamard" in out
    assert {s["layer"] for s in data["skipped_layers"]} == {0, 1, 2, 4, 5, 6}
    sens = json.loads((out_dir / "kv_sensitivity.json").read_text())
    layer3 = next(layer for layer in sens["layers"] if layer["layer"] == 3)
    assert set(layer3["k"]) == set(layer3["v"]) == {"4", "8"}
    # quantizing harder hurts more, for keys and values alike
    assert layer3["k"]["4"] > layer3["k"]["8"] and layer3["v"]["4"] > layer3["v"]["8"]
    assert sens["rotation"] == "hadamard"
    m = sens["measured_kl_of_whole_configs"]
    assert m["uniform_4bit"] >= m["chosen"] >= m["uniform_8bit"]
    assert sens["seconds_chosen_config"] > 0  # not a uniform config: its own pass
    # progress: plain lines on stderr, per block and per sequence, for both passes
    assert "sensitivity: block 8 of 8 (22 rows, 4 variant(s) start here)" in err and "sensitivity logits: sequence 2 of 2" in err
    assert "chosen config: block 4 of 8 (4 rows, 1 variant(s) start here)" in err


def test_kv_cache_without_rotation(model_dir, tmp_path, capsys):
    code, out, err = run_cli(
        ["kv-cache", str(model_dir), "--rotation", "none", "--seq-len", "16", "--n-samples", "1",
         "-o", str(tmp_path), "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "kv_config.json").read_text())["rotation"] == "none"
    assert load_kv_config(tmp_path).rotation == "none"
    assert json.loads((tmp_path / "kv_sensitivity.json").read_text())["rotation"] == "none"


def test_unknown_rotation_is_refused(model_dir, tmp_path, capsys):
    code, _, err = run_cli(["kv-cache", str(model_dir), "--rotation", "givens", "-o", str(tmp_path)], capsys)
    assert code == 2 and "'givens' is not one of 'hadamard', 'none'" in err
    assert not (tmp_path / "kv_config.json").exists()


def test_unstorable_candidate_bits(model_dir, tmp_path, capsys):
    code, _, err = run_cli(["kv-cache", str(model_dir), "--candidate-bits", "4,7", "-o", str(tmp_path)], capsys)
    assert code == 1 and "candidate bit width 7 cannot be stored" in err
    assert not (tmp_path / "kv_config.json").exists()


def test_group_size_not_dividing_head_dim(model_dir, tmp_path, capsys):
    code, _, err = run_cli(["kv-cache", str(model_dir), "--group-size", "128", "-o", str(tmp_path)], capsys)
    assert code == 1 and "group size 128 does not divide the model's head_dim 64" in err
    code, _, err = run_cli(["kv-cache", str(model_dir), "--group-size", "48", "-o", str(tmp_path)], capsys)
    assert code == 1 and "group size 48 is not supported" in err


def test_target_below_lowest_candidate(model_dir, tmp_path, capsys):
    code, _, err = run_cli(["kv-cache", str(model_dir), "--target-bits", "4", "-o", str(tmp_path)], capsys)
    assert code == 1 and "below what the candidates can store" in err and "4.5 bits" in err


def test_calibration_text_too_short(model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    code, _, err = run_cli(["kv-cache", str(model_dir), "--data", str(short), "-o", str(tmp_path)], capsys)
    assert code == 1 and "fewer than one window of 512" in err


def test_model_without_kv_layers(model_dir, tmp_path, capsys):
    config = dict(model_type="mamba", vocab_size=64, hidden_size=32, intermediate_size=64, state_size=8,
                  num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=4,
                  tie_word_embeddings=True)
    model_cls, args_cls = model_classes(config)
    model = model_cls(args_cls.from_dict(config))
    mx.eval(model.parameters())
    mamba = tmp_path / "mamba"
    mamba.mkdir()
    save_model(mamba, model)
    save_config(config, config_path=mamba / "config.json")
    copy_tokenizer_files(model_dir, mamba)
    code, _, err = run_cli(["kv-cache", str(mamba), "--data", str(Path(__file__)), "-o", str(tmp_path / "o")], capsys)
    assert code == 1 and "no layer with a per-token KV cache" in err
    assert kv_layout(model).kv_layers == ()


@pytest.mark.slow
def test_eval_measures_a_kv_config(model_dir, tmp_path, capsys):
    from optiq.core.kv import save_kv_config, uniform_kv_config

    layout = kv_layout(load_model(model_dir).model)
    kl = {}
    for bits in (8, 4, 2):
        path = save_kv_config(uniform_kv_config(layout, bits), tmp_path / f"kv{bits}" / "kv_config.json")
        code, out, err = run_cli(["eval", str(model_dir), "--kv-config", str(path), "--max-tokens", "256",
                                  "--seq-len", "128", "--json"], capsys)
        assert code == 0, err
        res = json.loads(out)
        assert res["kv_bits"] == pytest.approx(bits + 32 / 64)  # fp16 scale + bias per group of 64
        assert res["reference"].endswith("(full-precision KV)")
        kl[bits] = res["mean_kl"]
    # against the same model with fp16 KV: fewer cache bits, more damage
    assert 0 < kl[8] < kl[4] < kl[2]
    code, out, err = run_cli(["eval", str(model_dir), "--kv-config", str(tmp_path / "kv4"), "--max-tokens", "128",
                              "--seq-len", "128", "--gsm8k", "bundled", "--gsm8k-limit", "1", "--gen-tokens", "4"],
                             capsys)
    assert code == 0, err
    assert "kv cache:    " in out and "(full-precision KV)" in out and "/1 correct" in out


def test_eval_rejects_a_bad_kv_config_before_loading(tmp_path, capsys):
    bad = tmp_path / "kv_config.json"
    bad.write_text("{not json")
    code, _, err = run_cli(["eval", "--kv-config", str(bad)], capsys)
    assert code == 1 and err.startswith("error: ") and "kv_config" in err.lower()
    code, _, err = run_cli(["eval", "--kv-config", str(tmp_path / "missing")], capsys)
    assert code == 1 and "does not exist" in err
