"""LoRA: targets, rank rules, bits sources, data loading, wrapping and adapter files."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_lora_util import eight_bit, quantize_mixed, write_jsonl

from optiq.core.errors import ConfigError, DataError, ModelLoadError
from optiq.core.model_io import load_model
from optiq.train import adapters, data, ranks, targets


@pytest.fixture(scope="module")
def base_dir(bundled_model_dir) -> Path:
    return bundled_model_dir


@pytest.fixture(scope="module")
def mixed_dir(base_dir, tmp_path_factory) -> Path:
    return quantize_mixed(base_dir, tmp_path_factory.mktemp("lora") / "mixed48")


@pytest.fixture(scope="module")
def mixed(mixed_dir):
    return load_model(mixed_dir)


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return load_model(base_dir).tokenizer


# ---------------------------------------------------------------------------- targets


def test_default_targets_on_hybrid_model_adapt_only_full_attention(mixed):
    sel = targets.find_targets(mixed.model, None, 16)
    assert sel.adapted_layers == [3, 7]
    assert sorted({t.name for t in sel.targets}) == ["self_attn.q_proj", "self_attn.v_proj"]
    note = " ".join(sel.notes)
    assert "Gated DeltaNet" in note and "in_proj_qkv" in note
    assert "0, 1, 2, 4, 5, 6" in note


def test_gated_deltanet_projections_by_name_and_num_layers(mixed):
    sel = targets.find_targets(mixed.model, "in_proj_qkv,linear_attn.out_proj", num_layers=3)
    assert sel.adapted_layers == [5, 6]  # layer 7 is full attention: no such modules
    assert {t.name for t in sel.targets} == {"linear_attn.in_proj_qkv", "linear_attn.out_proj"}
    assert all(t.layer_kind == "linear_attention" for t in sel.targets)
    t = sel.targets[0]
    assert t.bits == 4 and t.input_dims == 128  # logical dims of a packed 4-bit weight


def test_all_linear_and_errors(mixed):
    sel = targets.find_targets(mixed.model, "all-linear", -1)
    assert len(sel.adapted_layers) == 8
    assert any(t.name == "mlp.down_proj" for t in sel.targets)
    with pytest.raises(ConfigError, match="matched no module.*in_proj_qkv"):
        targets.find_targets(mixed.model, "query", 16)
    with pytest.raises(ConfigError, match="num-layers"):
        targets.find_targets(mixed.model, None, 0)


def test_moe_expert_pools_only_when_asked(tiny_moe_dir):
    lm = load_model(tiny_moe_dir)
    sel = targets.find_targets(lm.model, "gate_proj,up_proj", 2)
    assert sel.targets and all(t.num_experts == 0 for t in sel.targets)  # shared expert only
    assert any("--train-experts" in n for n in sel.notes)
    sel = targets.find_targets(lm.model, "switch_mlp.up_proj", 2, train_experts=True)
    assert sel.targets and all(t.num_experts == 4 for t in sel.targets)
    plan = ranks.plan_ranks(sel.targets, rank=4, scaling="constant")
    adapters.apply_plan(lm.model, plan)
    from mlx_lm.tuner.lora import LoRASwitchLinear

    wrapped = [m for _, m in lm.model.named_modules() if isinstance(m, LoRASwitchLinear)]
    assert len(wrapped) == 2
    assert adapters.trainable_parameter_count(lm.model) == plan.trainable_parameters
    assert lm.model(mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])).shape[-1] > 0


# ---------------------------------------------------------------------------- ranks


def test_by_bits_rule_is_the_documented_function():
    assert {b: ranks.rank_for_bits(8, b) for b in (2, 3, 4, 5, 6, 8, 16)} == {
        2: 16, 3: 11, 4: 8, 5: 6, 6: 5, 8: 4, 16: 2,
    }
    assert ranks.rank_for_bits(16, 8) == 8 and ranks.rank_for_bits(1, 16) == 1
    assert ranks.rank_for_bits(8, 8, reference_bits=8) == 8


def test_by_bits_reads_config_quantization(mixed):
    sel = targets.find_targets(mixed.model, "all-linear", -1)
    info = ranks.read_quant_info(mixed.path, mixed.config)
    plan = ranks.plan_ranks(sel.targets, rank=8, scaling="by_bits", quant=info)
    assert plan.bits_source == "config.json quantization"
    for t in sel.targets:
        want_bits = 8 if eight_bit(t.path) else 4
        assert plan.bits[t.path] == want_bits
        assert plan.ranks[t.path] == min(ranks.rank_for_bits(8, want_bits), t.max_rank)
    assert {plan.ranks[t.path] for t in sel.targets if t.max_rank >= 8} == {4, 8}
    # in_proj_a/b have 4 outputs (one per value head): rank clamped, and said so
    assert any("clamped" in n for n in plan.notes)
    assert plan.trainable_parameters == sum(
        plan.ranks[t.path] * (t.input_dims + t.output_dims) for t in sel.targets
    )


def test_metadata_file_is_preferred_and_checked(mixed, tmp_path):
    """optiq convert's optiq_metadata.json (docs/convert.md): bits and per-bits KL."""
    sel = targets.find_targets(mixed.model, None, 16)
    layers = {}
    for i, t in enumerate(sel.targets):
        kl4 = 0.01 * (i + 1)
        layers[t.path] = {"bits": 8 if eight_bit(t.path) else 4, "group_size": 64,
                          "sensitivity": {"4": kl4, "8": kl4 / 100}, "measured_bits": [4]}
    meta_dir = tmp_path / "m"
    meta_dir.mkdir()
    (meta_dir / ranks.METADATA_FILE).write_text(json.dumps({"format": "optiq-convert", "layers": layers}))
    info = ranks.read_quant_info(meta_dir, mixed.config)
    assert info.source == ranks.METADATA_FILE and info.has_sensitivity
    plan = ranks.plan_ranks(sel.targets, rank=8, scaling="by_sensitivity", quant=info)
    # s = the KL at the bits each module got; rank ∝ sqrt(s) with the mean rank near --rank
    s = {p: e["sensitivity"][str(e["bits"])] for p, e in layers.items()}
    mean = np.mean(np.sqrt(list(s.values())))
    for t in sel.targets:
        want = min(max(1, int(np.floor(8 * np.sqrt(s[t.path]) / mean + 0.5))), 32, t.max_rank)
        assert plan.ranks[t.path] == want
        assert plan.sensitivity[t.path] == s[t.path]
    assert plan.ranks[sel.targets[0].path] > plan.ranks[sel.targets[-1].path]  # 4-bit > 8-bit
    stale = {p: {**v, "bits": 2} for p, v in layers.items()}
    (meta_dir / ranks.METADATA_FILE).write_text(json.dumps({"layers": stale}))
    with pytest.raises(ConfigError, match="stale"):
        ranks.plan_ranks(sel.targets, scaling="by_bits", quant=ranks.read_quant_info(meta_dir, None))


def test_by_sensitivity_needs_metadata_and_float_model_falls_back(mixed, base_dir):
    sel = targets.find_targets(mixed.model, None, 16)
    with pytest.raises(ConfigError, match="sensitivit"):
        ranks.plan_ranks(sel.targets, scaling="by_sensitivity",
                         quant=ranks.read_quant_info(mixed.path, mixed.config))
    fl = load_model(base_dir)
    sel = targets.find_targets(fl.model, None, 16)
    plan = ranks.plan_ranks(sel.targets, rank=8, scaling="by_bits", quant=None)
    assert plan.scaling == "constant" and set(plan.ranks.values()) == {8}
    assert "no adapted module is quantized" in plan.notes[0]


def test_alpha_gives_per_module_scale(mixed):
    sel = targets.find_targets(mixed.model, None, 16)
    plan = ranks.plan_ranks(sel.targets, rank=8, scaling="by_bits", alpha=16,
                            quant=ranks.read_quant_info(mixed.path, mixed.config))
    assert all(plan.scales[p] == 16 / r for p, r in plan.ranks.items())
    with pytest.raises(ConfigError):
        ranks.plan_ranks(sel.targets, scale=1.0, alpha=2.0)


# ---------------------------------------------------------------------------- adapters


def _wrapped(path: Path, spec="q_proj,v_proj,out_proj", scaling="by_bits", seed=0):
    lm = load_model(path)
    sel = targets.find_targets(lm.model, spec, 16)
    plan = ranks.plan_ranks(sel.targets, rank=8, scaling=scaling,
                            quant=ranks.read_quant_info(lm.path, lm.config))
    mx.random.seed(seed)
    adapters.apply_plan(lm.model, plan)
    # a trained adapter has lora_b != 0: make the update visible
    for _, m in lm.model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape)
    return lm, sel, plan


def test_wrap_save_load_roundtrip_with_per_module_ranks(mixed_dir, tmp_path):
    lm, sel, plan = _wrapped(mixed_dir)
    assert len(set(plan.ranks.values())) > 1
    assert adapters.trainable_parameter_count(lm.model) == plan.trainable_parameters
    x = mx.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    ref = lm.model(x)
    out = tmp_path / "ad"
    adapters.write_config(adapters.build_config(plan, 8, dropout=0.0, alpha=None, model_path=str(mixed_dir)), out)
    adapters.save_weights(lm.model, out / adapters.ADAPTER_WEIGHTS)
    saved = mx.load(str(out / adapters.ADAPTER_WEIGHTS))
    for t in sel.targets:  # mlx-lm orientation: lora_a [in, r], lora_b [r, out]
        assert saved[f"{t.path}.lora_a"].shape == (t.input_dims, plan.ranks[t.path])
        assert saved[f"{t.path}.lora_b"].shape == (plan.ranks[t.path], t.output_dims)
    cfg = json.loads((out / adapters.ADAPTER_CONFIG).read_text())
    assert cfg["optiq"]["mlx_lm_compatible"] is False
    assert cfg["lora_parameters"]["keys"] == sorted({t.name for t in sel.targets})

    fresh = load_model(mixed_dir)
    base = fresh.model(x)
    spec = adapters.load_adapters(fresh.model, out)
    assert {m.path: m.rank for m in spec.modules} == plan.ranks
    got = fresh.model(x)
    assert mx.abs(got - ref).max().item() < 1e-5
    assert mx.abs(got - base).max().item() > 1e-2  # the adapter does change the outputs
    assert adapters.remove_adapters(fresh.model) == len(sel.targets)
    assert mx.abs(fresh.model(x) - base).max().item() == 0.0


def test_load_refuses_an_adapter_for_another_model(mixed_dir, tiny_moe_dir, tmp_path):
    lm, _, plan = _wrapped(mixed_dir, spec="in_proj_qkv")
    out = tmp_path / "ad"
    adapters.write_config(adapters.build_config(plan, 8, dropout=0.0, alpha=None, model_path=None), out)
    adapters.save_weights(lm.model, out / adapters.ADAPTER_WEIGHTS)
    other = load_model(tiny_moe_dir)
    # same module names, but bad shapes are reported per tensor
    cfg = json.loads((out / adapters.ADAPTER_CONFIG).read_text())
    w = mx.load(str(out / adapters.ADAPTER_WEIGHTS))
    key = next(k for k in w if k.endswith("lora_a"))
    w[key] = mx.zeros((3, 3))
    mx.save_safetensors(str(out / adapters.ADAPTER_WEIGHTS), w)
    with pytest.raises(ModelLoadError, match="shape"):
        adapters.load_adapters(other.model, out)
    cfg["optiq"]["modules"]["language_model.model.layers.0.nope"] = {"rank": 2, "scale": 1.0}
    (out / adapters.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="nope"):
        adapters.load_adapters(load_model(mixed_dir).model, out)
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        adapters.load_adapters(other.model, tmp_path)


def test_stock_mlx_lm_loads_constant_and_padded_exports(mixed_dir, tmp_path):
    """Constant-rank adapters load in stock mlx-lm as written; per-module ranks via the
    zero-padded export, with the same outputs either way."""
    from mlx_lm.utils import load as mlx_load

    x = mx.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    for scaling in ("constant", "by_bits"):
        lm, _, plan = _wrapped(mixed_dir, scaling=scaling)
        out = tmp_path / scaling
        cfg = adapters.build_config(plan, 8, dropout=0.0, alpha=None, model_path=str(mixed_dir))
        adapters.write_config(cfg, out)
        adapters.save_weights(lm.model, out / adapters.ADAPTER_WEIGHTS)
        ours = load_model(mixed_dir, fast_cpu=False)
        adapters.load_adapters(ours.model, out)
        ref = ours.model(x).astype(mx.float32)
        if scaling == "by_bits":
            with pytest.raises(ValueError, match="shape"):
                mlx_load(str(mixed_dir), adapter_path=str(out))
            exported = tmp_path / "exported"
            adapters.export_mlx_lm(out, exported)
            out = exported
        stock, _ = mlx_load(str(mixed_dir), adapter_path=str(out))
        got = stock(x).astype(mx.float32)
        assert mx.abs(got - ref).max().item() <= 1e-3 * mx.abs(ref).max().item()


# ---------------------------------------------------------------------------- data


def test_data_kinds_masking_and_thinking(tokenizer, tmp_path):
    recs = [
        {"text": "the quick brown fox"},
        {"prompt": "say hi", "completion": "hi there"},
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]},
        {"messages": [{"role": "user", "content": "name?"}, {"role": "assistant", "content": "tiny"}]},
    ]
    f = write_jsonl(tmp_path / "train.jsonl", recs[1:])
    ds = data.load_jsonl(f, tokenizer, max_seq_length=512, mask_prompt=True)
    assert ds.kinds == {"completion": 1, "chat": 2}
    for r, rec in zip(ds.records, recs[1:], strict=True):
        text = tokenizer.decode(list(r.tokens[r.offset:]))
        target = rec.get("completion") or rec["messages"][-1]["content"]
        assert target in text  # the trained part holds the answer...
        prompt = tokenizer.decode(list(r.tokens[: r.offset]))
        user = rec.get("prompt") or rec["messages"][0]["content"]
        assert user in prompt and target not in prompt  # ...and the prompt is masked
    thinking = tokenizer.decode(list(ds.records[1].tokens))
    assert "two and two" in thinking and "<think>" in thinking
    assert ds.mask_fallbacks == 0
    f = write_jsonl(tmp_path / "t.jsonl", recs[:1])
    ds = data.load_jsonl(f, tokenizer, max_seq_length=512)
    assert ds.records[0].tokens[-1] == tokenizer.eos_token_id and ds.records[0].offset == 0
    with pytest.raises(DataError, match=r"t.jsonl:1: --mask-prompt"):
        data.load_jsonl(f, tokenizer, max_seq_length=512, mask_prompt=True)


def test_data_errors_name_file_and_line(tokenizer, tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"train.jsonl:3: not valid JSON"):
        data.load_jsonl(f, tokenizer, max_seq_length=64)
    f.write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        data.load_jsonl(f, tokenizer, max_seq_length=64)
    f.write_text('{"text": "ok"}\n{"txt": "x"}\n')
    with pytest.raises(DataError, match=r":2: record has none of.*keys: txt"):
        data.load_jsonl(f, tokenizer, max_seq_length=64)
    f.write_text('{"messages": [{"content": "no role"}]}\n')
    with pytest.raises(DataError, match=r":1: message 0"):
        data.load_jsonl(f, tokenizer, max_seq_length=64)
    long = " ".join(["fox"] * 200)
    write_jsonl(f, [{"text": "short one"}, {"text": long}, {"text": "another"}])
    with pytest.raises(DataError, match=r"train.jsonl:2: record has \d+ tokens, more than --max-seq-length 32"):
        data.load_jsonl(f, tokenizer, max_seq_length=32)
    ds = data.load_jsonl(f, tokenizer, max_seq_length=32, long_records="skip")
    assert len(ds) == 2 and ds.skipped_long == 1 and "1 records longer" in ds.summary()
    ds = data.load_jsonl(f, tokenizer, max_seq_length=32, long_records="truncate")
    assert len(ds) == 3 and ds.truncated == 1 and max(len(r.tokens) for r in ds.records) == 32
    f.write_text('{"text": "a"}\n\n\n{"text": "b c"}\n')
    ds = data.load_jsonl(f, tokenizer, max_seq_length=64)
    assert ds.blank_lines == 2 and "2 blank lines" in ds.summary()
    with pytest.raises(DataError, match="does not exist"):
        data.load_data_dir(tmp_path / "missing", tokenizer, max_seq_length=64)
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no train.jsonl"):
        data.load_data_dir(tmp_path / "d", tokenizer, max_seq_length=64)


def test_batches_mask_and_order():
    recs = [data.Record(tuple(range(1, n + 1)), off, f"f:{i}", "chat")
            for i, (n, off) in enumerate([(5, 0), (9, 4), (3, 2), (7, 0), (6, 1)])]
    b = data.make_batch([recs[1], recs[0]], max_seq_length=64)
    assert b.inputs.shape == b.targets.shape == b.mask.shape
    # record 1: 9 tokens, prompt of 4 -> targets are tokens 4..8 (5 of them)
    assert b.mask[0].sum() == 5 and b.mask[0, 3] == 1 and b.mask[0, 2] == 0
    assert b.targets[0, 3] == recs[1].tokens[4]
    assert b.mask[1].sum() == 4  # plain record: every token after the first
    groups = data.batch_groups(recs, 2)
    assert sorted(i for g in groups for i in g) == list(range(5))  # nobody left out
    first = [tuple(data.train_batch_at(s, groups, seed=3)) for s in range(1, 4)]
    assert sorted(first) == sorted(tuple(g) for g in groups)  # one epoch = every group once
    assert first == [tuple(data.train_batch_at(s, groups, seed=3)) for s in range(1, 4)]
