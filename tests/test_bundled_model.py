"""The bundled trained model (optiq-tiny), its OptiQ quant and the tiny random MoE sibling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optiq.core  # noqa: F401  (OpenBLAS preload before mlx)

import mlx.core as mx
import mlx.nn as nn
import pytest

from optiq.core import model_io
from optiq.core.errors import ModelLoadError
from optiq.core.model_io import bundled_model_path, bundled_quant_path, load_model, resolve_model_path
from optiq.core.tiny_models import TINY_TEXT_CONFIG, build_model, make_tiny_moe

BUNDLED = bundled_model_path()
QUANT = bundled_quant_path()

SAMPLES = [
    "LAWYER, n.  One skilled in circumvention of the law.\n\n    Verse, indented.\n",
    "<|im_start|>user\nWhat is a cynic?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    "The user wants a definition.\n</think>\n\nCYNIC, n. A blackguard.<|im_end|>\n",
    "def main(argv):\n    for i in range(10):\n\tprint(f'{i:>3}', argv[i] ** 2)  # x\n",
    "Caf\u00e9 na\u0131\u0308ve \u2014 1,234.5e-6; THEY'RE here\r\n\n  end",
]


@pytest.fixture(scope="module")
def bundled():
    from mlx_lm import load

    model, tokenizer = load(str(BUNDLED))
    return model, tokenizer


def test_bundled_files_and_config():
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "heldout.txt",
        "TRAINING.md",
        "training_metrics.json",
    ):
        assert (BUNDLED / name).exists(), name
    cfg = json.loads((BUNDLED / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5"
    assert cfg["num_hidden_layers"] == 8 and cfg["full_attention_interval"] == 4
    assert cfg["head_dim"] == 64
    assert cfg["tie_word_embeddings"] is False
    assert cfg["max_position_embeddings"] >= 8192
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert cfg["torch_dtype"] == "bfloat16"
    size = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert size < 12e6, size
    assert 5_000 < (BUNDLED / "heldout.txt").stat().st_size < 100_000
    gen = json.loads((BUNDLED / "generation_config.json").read_text())
    assert gen["temperature"] == 0.7 and gen["top_p"] == 0.9
    assert gen["eos_token_id"]


def test_layer_pattern_and_quantizable_shapes(bundled):
    model, _ = bundled
    assert [layer.is_linear for layer in model.layers] == [True, True, True, False] * 2
    for i, layer in enumerate(model.layers):
        assert ("linear_attn" in layer) == layer.is_linear
        assert ("self_attn" in layer) == (not layer.is_linear)
        if not layer.is_linear:
            assert layer.self_attn.head_dim == 64
    assert "lm_head" in model.language_model  # untied: an explicit lm_head layer
    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears
    for path, m in linears:
        assert m.weight.shape[1] % 64 == 0, (path, m.weight.shape)
    weights = mx.load(str(BUNDLED / "model.safetensors"))
    assert weights["language_model.lm_head.weight"].dtype == mx.bfloat16


def test_tokenizer_matches_tokenizers_library(bundled):
    from tokenizers import Tokenizer

    _, tokenizer = bundled
    raw = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    assert raw.get_vocab_size() == TINY_TEXT_CONFIG["vocab_size"]
    assert len(tokenizer.get_vocab()) == raw.get_vocab_size()
    for text in SAMPLES:
        ids = raw.encode(text, add_special_tokens=False).ids
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert tokenizer.encode(tok, add_special_tokens=False) == [raw.token_to_id(tok)]
    assert tokenizer.decode(tokenizer.encode(SAMPLES[0])) == SAMPLES[0]
    assert tokenizer.eos_token == "<|im_end|>"
    assert raw.token_to_id("<|im_end|>") in tokenizer.eos_token_ids


def test_chat_template_thinking_on_off(bundled):
    _, tokenizer = bundled
    msgs = [{"role": "user", "content": "What is a bore?"}]
    on = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False, enable_thinking=True
    )
    off = tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert on == "<|im_start|>user\nWhat is a bore?<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    assert tokenizer.has_thinking
    # default (enable_thinking not given) is thinking on, as mlx-lm injects it
    assert tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == on
    conv = [
        {"role": "system", "content": "Be brief."},
        *msgs,
        {"role": "assistant", "content": "A person who talks.", "reasoning_content": "Easy."},
    ]
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert text.endswith(
        "<|im_start|>assistant\n<think>\nEasy.\n</think>\n\nA person who talks.<|im_end|>\n"
    )
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def _ppl(model, ids: list[int]) -> float:
    x = mx.array(ids)[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, x[:, 1:]).mean().item())


def test_heldout_perplexity_far_below_random(bundled):
    model, tokenizer = bundled
    text = (BUNDLED / "heldout.txt").read_text()[:2000]
    ids = tokenizer.encode(text)[:384]
    assert len(ids) > 200
    model.set_dtype(mx.float32)  # CPU: compute in fp32 (cast_predicate keeps A_log fp32)
    trained = _ppl(model, ids)
    cfg = json.loads((BUNDLED / "config.json").read_text())
    random_ppl = _ppl(build_model(cfg, seed=0), ids)
    assert random_ppl > 0.5 * cfg["vocab_size"]
    assert trained < random_ppl / 5, (trained, random_ppl)
    assert trained < 400, trained


def test_generates(bundled):
    from mlx_lm import generate

    model, tokenizer = bundled
    out = generate(model, tokenizer, "CYNIC, n.", max_tokens=8, verbose=False)
    assert isinstance(out, str) and out


def test_make_tiny_moe(tmp_path):
    from mlx_lm import load

    out = make_tiny_moe(tmp_path / "moe", seed=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_moe"
    assert cfg["num_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert (out / "tokenizer.json").read_bytes() == (BUNDLED / "tokenizer.json").read_bytes()
    model, tokenizer = load(str(out))
    assert [layer.is_linear for layer in model.layers] == [True, True, True, False] * 2
    for layer in model.layers:
        moe = layer.mlp
        assert moe.num_experts == 4 and moe.top_k == 2
        assert moe.switch_mlp.gate_proj.weight.shape[0] == 4
        assert "shared_expert" in moe and "shared_expert_gate" in moe
    assert model.layers[0].mlp.switch_mlp.up_proj.weight.dtype == mx.bfloat16
    # MLX's CPU gather_mm (the expert matmul) only takes float32: compute in fp32.
    model.set_dtype(mx.float32)
    ids = tokenizer.encode("FOOL, n.  A person who pervades the domain.")
    logits = model(mx.array(ids)[None])
    assert logits.shape == (1, len(ids), cfg["vocab_size"])
    assert mx.all(mx.isfinite(logits.astype(mx.float32))).item()
    # deterministic given the seed
    again = make_tiny_moe(tmp_path / "moe2", seed=0)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------- bundled quant


def test_bundled_quant_has_mixed_per_layer_bits_and_optiq_metadata():
    assert QUANT.parent == BUNDLED.parent and QUANT.name == "optiq-tiny-optiq"
    size = sum(p.stat().st_size for p in QUANT.iterdir())
    assert size < 2.5e6, size  # small enough to ship in the wheel
    assert not list(QUANT.glob("*.png"))
    q = json.loads((QUANT / "config.json").read_text())["quantization"]
    per_layer = {k: v["bits"] for k, v in q.items() if isinstance(v, dict)}
    assert len(per_layer) > 40
    assert set(per_layer.values()) <= {3, 4, 5, 6, 8} and len(set(per_layer.values())) >= 3  # mixed
    meta = json.loads((QUANT / "optiq_metadata.json").read_text())
    assert meta["format"] == "optiq-convert" and meta["method"] == "optiq"
    assert meta["target_bpw"] == 4.5 and meta["candidate_bits"] == [3, 4, 5, 6, 8]
    assert abs(meta["achieved"]["weight_bpw"] - 4.5) < 0.1
    assert meta["source_model"] == "optiq-tiny"  # portable, not the build machine's path
    assert resolve_model_path(meta["source_model"]) == BUNDLED
    assert "seconds" not in meta
    # metadata and config.json agree module by module (config paths carry no prefix diff)
    for path, entry in meta["layers"].items():
        assert per_layer[path] == entry["bits"], path
        assert entry["sensitivity"], path  # by_sensitivity has what it needs


def test_bundled_quant_loads_with_stock_mlx_lm_and_stays_close_to_float():
    from mlx_lm import load

    model, tokenizer = load(str(QUANT))
    q = json.loads((QUANT / "config.json").read_text())["quantization"]
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    loaded = {p: m.bits for p, m in model.named_modules() if isinstance(m, quantized)}
    assert loaded == {p: v["bits"] for p, v in q.items() if isinstance(v, dict)}  # per-layer bits kept
    ids = tokenizer.encode((BUNDLED / "heldout.txt").read_text()[:1500])[:256]
    x = mx.array(ids)[None]
    quant = load_model("bundled-quant")  # OptiQ's loader, by name
    ref = load_model("bundled")
    assert quant.path == QUANT and ref.path == BUNDLED
    def logprobs(m):
        return nn.log_softmax(m(x).astype(mx.float32), axis=-1)

    def kl(p, q):
        return (mx.exp(p) * (p - q)).sum(-1).mean().item()

    lq, lr = logprobs(quant.model), logprobs(ref.model)
    assert 0 < kl(lr, lq) < 0.05, kl(lr, lq)  # 4.5 bpw barely changes the model
    # stock mlx-lm computes in bf16, OptiQ in fp32: the same model up to that rounding
    # (measured: KL 0.0016 between them, as large as the quantization's own 0.0016)
    assert kl(logprobs(model), lq) < 0.01


def test_bundled_quant_name_resolution(tmp_path, monkeypatch):
    assert resolve_model_path("bundled-quant") == QUANT
    assert resolve_model_path("optiq-tiny-optiq") == QUANT
    assert resolve_model_path(None) == BUNDLED  # the plain default stays the float model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundled-quant").mkdir()
    assert resolve_model_path("bundled-quant") == Path("bundled-quant")  # a local dir wins
    monkeypatch.setattr(model_io, "bundled_quant_path", lambda: tmp_path / "absent")
    assert not model_io.has_bundled_quant()
    with pytest.raises(ModelLoadError, match="build_bundled_quant"):
        resolve_model_path("optiq-tiny-optiq")
