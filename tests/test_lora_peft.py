"""``optiq lora export --format peft`` loads in the real ``peft`` library onto the matching
Hugging Face model and computes the same outputs as the adapter in MLX.

Needs torch (CPU build) and peft: ``uv sync --group peft`` or see docs/lora.md. The Hugging
Face model is ``transformers``' Qwen3.5 (``Qwen3_5ForCausalLM``, pure-PyTorch Gated
DeltaNet fallback) built from the bundled model's own weights, converted from mlx-lm's
sanitized layout back to HF's (conv1d axis order, RMSNorm weights stored as ``w - 1``).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_lora_util import quantize_mixed

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from optiq.core.model_io import load_model  # noqa: E402
from optiq.train import adapters, ranks, targets  # noqa: E402
from optiq.train.peft_export import PEFT_WEIGHTS, export_peft, hf_module_name  # noqa: E402

# RMSNorms that Qwen3.5 in transformers stores as (w - 1) and mlx-lm's sanitize shifts by +1.
SHIFTED_NORMS = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)


@pytest.fixture(scope="module")
def base_dir(bundled_model_dir) -> Path:
    return bundled_model_dir


def hf_from_mlx(model_dir: Path):
    """A float32 ``Qwen3_5ForCausalLM`` holding the weights of an mlx-lm qwen3_5 model dir."""
    from mlx.utils import tree_flatten

    Model = getattr(transformers, "Qwen3_5ForCausalLM", None)
    Config = getattr(transformers, "Qwen3_5TextConfig", None)
    if Model is None or Config is None:
        pytest.skip("this transformers has no Qwen3.5")
    cfg = json.loads((model_dir / "config.json").read_text())
    tc = {**cfg, **cfg.get("text_config", {})}
    fields = (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads head_dim linear_conv_kernel_dim linear_key_head_dim "
        "linear_value_head_dim linear_num_key_heads linear_num_value_heads rms_norm_eps "
        "tie_word_embeddings max_position_embeddings"
    ).split()
    kw = {k: tc[k] for k in fields if k in tc}
    every = tc.get("full_attention_interval", 4)
    kw["layer_types"] = [
        "full_attention" if (i + 1) % every == 0 else "linear_attention"
        for i in range(tc["num_hidden_layers"])
    ]
    rope = dict(tc.get("rope_parameters") or {})
    if "type" in rope:
        rope["rope_type"] = rope.pop("type")
    kw["rope_parameters"] = rope
    hf = Model(Config(**kw)).float().eval()

    mlx = load_model(model_dir, fast_cpu=False)
    state = {}
    for key, value in tree_flatten(mlx.model.parameters()):
        name = key[len("language_model."):] if key.startswith("language_model.") else key
        w = np.array(value.astype(mx.float32))
        if name.endswith("conv1d.weight"):
            w = w.transpose(0, 2, 1)  # mlx [C, K, 1] -> torch [C, 1, K]
        if name.endswith(SHIFTED_NORMS):
            w = w - 1.0
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def test_peft_export_loads_in_peft_with_matching_outputs(base_dir, tmp_path):
    # an adapter with per-module ranks (by_bits on a mixed 4/8-bit copy of the model)
    mixed_dir = quantize_mixed(base_dir, tmp_path / "mixed")
    lm = load_model(mixed_dir)
    sel = targets.find_targets(lm.model, "q_proj,v_proj,in_proj_qkv,out_proj,down_proj", 16)
    plan = ranks.plan_ranks(sel.targets, rank=8, scaling="by_bits", scale=2.0,
                            quant=ranks.read_quant_info(mixed_dir, lm.config))
    assert len(set(plan.ranks.values())) > 1
    mx.random.seed(3)
    adapters.apply_plan(lm.model, plan)
    for _, m in lm.model.named_modules():  # a trained-looking adapter: both factors non-zero
        if hasattr(m, "lora_b"):
            m.lora_a = 0.05 * mx.random.normal(m.lora_a.shape)
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    ad = tmp_path / "adapter"
    adapters.write_config(adapters.build_config(plan, 8, dropout=0.0, alpha=None, model_path=str(base_dir)), ad)
    adapters.save_weights(lm.model, ad / adapters.ADAPTER_WEIGHTS)

    out = tmp_path / "peft"
    cfg = export_peft(ad, out)
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    saved = mx.load(str(out / PEFT_WEIGHTS))
    t = sel.targets[0]
    a = saved[f"base_model.model.{hf_module_name(t.path)}.lora_A.weight"]
    b = saved[f"base_model.model.{hf_module_name(t.path)}.lora_B.weight"]
    assert a.shape == (plan.ranks[t.path], t.input_dims) and b.shape == (t.output_dims, plan.ranks[t.path])

    # MLX: the float base model with the adapter (the adapter does not care about the base's bits)
    ids = [[3, 17, 42, 99, 5, 8, 120, 7, 33, 2, 11, 250, 60, 61, 62, 63, 64, 65, 66, 67]]
    mlx_model = load_model(base_dir)
    mlx_base = np.array(mlx_model.model(mx.array(ids)))
    adapters.load_adapters(mlx_model.model, ad)
    mlx_out = np.array(mlx_model.model(mx.array(ids)))

    hf = hf_from_mlx(base_dir)
    with torch.no_grad():
        hf_base = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(hf_base - mlx_base).max() < 1e-3  # the HF model is the same model

    model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        peft_out = model(torch.tensor(ids)).logits.numpy()
    for name, module in model.named_modules():  # PEFT built each module at its own rank
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            mlx_path = next(p for p in plan.ranks if name.endswith(hf_module_name(p)))
            assert module.lora_A["default"].weight.shape[0] == plan.ranks[mlx_path]
            assert module.scaling["default"] == pytest.approx(plan.scales[mlx_path])
    effect = np.abs(mlx_out - mlx_base).max()
    assert effect > 0.1
    print(f"PEFT vs MLX max |diff| {np.abs(peft_out - mlx_out).max():.2e}, adapter effect {effect:.3f}, "
          f"max |logit| {np.abs(mlx_out).max():.2f}")
    assert np.abs(peft_out - mlx_out).max() < 1e-3 * max(1.0, np.abs(mlx_out).max())
