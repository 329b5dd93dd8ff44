"""``optiq info`` describes the bundled model and the MoE variant correctly."""

from __future__ import annotations

import json

from mlx_lm.utils import quantize_model
from safetensors import safe_open

from optiq.cli.main import main
from optiq.core.info import model_info
from optiq.core.mlx_lm_seam import CHECKS, mlx_lm_version
from optiq.core.model_io import load_model


def safetensors_numel(path) -> int:
    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "numpy") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def test_bundled_model_info(bundled_model_dir):
    mi = model_info(None)  # no argument: the bundled model
    cfg = json.loads((bundled_model_dir / "config.json").read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    assert mi.path == bundled_model_dir
    assert mi.model_type == "qwen3_5"
    assert mi.num_layers == cfg["num_hidden_layers"] >= 8
    interval = cfg.get("full_attention_interval", 4)
    for layer in mi.layers:
        full = (layer.index + 1) % interval == 0
        assert layer.kind == ("full_attention" if full else "linear_attention")
        assert layer.cache == ("KVCache" if full else "ArraysCache")
        assert layer.bits == ()
    assert mi.layer_kind_counts["full_attention"] >= 2
    assert mi.parameters == safetensors_numel(bundled_model_dir)
    assert mi.quantization is None and mi.num_experts == 0
    assert mi.disk_bytes > mi.weight_bytes > 0


def test_moe_variant_info(tiny_moe_dir):
    mi = model_info(tiny_moe_dir)
    cfg = json.loads((tiny_moe_dir / "config.json").read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    assert mi.model_type == "qwen3_5_moe"
    assert mi.num_experts == cfg["num_experts"] > 1
    assert mi.experts_per_token == cfg["num_experts_per_tok"]
    assert mi.parameters == safetensors_numel(tiny_moe_dir)
    assert {layer.kind for layer in mi.layers} == {"linear_attention", "full_attention"}


def test_quantized_model_info(tmp_path, bundled_model_dir):
    """Per-layer bits written by quantize_model are reported per layer."""
    from mlx_lm.utils import save_model, save_config
    import shutil

    loaded = load_model(None, fast_cpu=False)
    cfg = dict(loaded.config)

    def pred(path, module):
        return {"bits": 8, "group_size": 64} if path.endswith("lm_head") or ".3." in path else True

    _, cfg = quantize_model(loaded.model, cfg, group_size=64, bits=4, quant_predicate=pred)
    out = tmp_path / "q"
    save_model(out, loaded.model)
    save_config(cfg, out / "config.json")
    for f in bundled_model_dir.glob("tokenizer*"):
        shutil.copy(f, out)
    mi = model_info(out)
    assert mi.bits_histogram.keys() == {4, 8}
    assert mi.layers[3].bits == (8,)
    assert mi.layers[0].bits == (4,)
    assert mi.parameters == model_info(None).parameters  # logical count is unchanged


def test_info_cli_text_and_json(capsys):
    main_ok(["info"])
    out = capsys.readouterr().out
    assert "qwen3_5" in out and "full_attention" in out and "linear_attention" in out
    assert "compute:      CPU, fp32" in out and "optiq-kernels (" in out
    assert f"mlx-lm:       {mlx_lm_version()}: the {len(CHECKS)} internals OptiQ patches or reads are as expected" in out
    main_ok(["info", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["mlx_lm"]["version"] == mlx_lm_version() and not any(data["mlx_lm"]["checks"].values())
    assert data["layer_kind_counts"]["full_attention"] >= 2
    assert data["compute"]["device"] == "cpu" and data["compute"]["optiq_kernels"]["threads"] >= 1


def main_ok(args):
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None)
