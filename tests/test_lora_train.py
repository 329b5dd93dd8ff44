"""LoRA training end to end: loss goes down, checkpoints, resume, interruption, best
adapter, fuse, and the ``optiq lora`` commands. Tiny runs: few steps, short records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from test_lora_util import make_text_data, quantize_mixed, write_jsonl

from optiq.core import model_io
from optiq.core.errors import ConfigError
from optiq.core.model_io import bundled_model_path, bundled_quant_path, load_model
from optiq.train import adapters
from optiq.train.lora import LoraOptions, default_model, train_lora
from optiq.train.ranks import rank_for_bits
from optiq.train.trainer import BEST_WEIGHTS, STATE_FILE, TrainArgs, TrainingInterrupted, list_checkpoints

pytestmark = pytest.mark.slow

TARGETS = "q_proj,v_proj,in_proj_qkv,out_proj"


@pytest.fixture(scope="module")
def base_dir(bundled_model_dir) -> Path:
    return bundled_model_dir


@pytest.fixture(scope="module")
def mixed_dir(base_dir, tmp_path_factory) -> Path:
    return quantize_mixed(base_dir, tmp_path_factory.mktemp("lora_train") / "mixed48")


@pytest.fixture(scope="module")
def data_dir(base_dir, tmp_path_factory) -> Path:
    return make_text_data(base_dir, tmp_path_factory.mktemp("data"), n_train=16, n_valid=4)


def _opts(model, data, out, iters=6, **kw) -> LoraOptions:
    train = TrainArgs(iters=iters, batch_size=4, learning_rate=kw.pop("lr", 2e-4), max_seq_length=128,
                      steps_per_eval=kw.pop("steps_per_eval", 3), save_every=kw.pop("save_every", 2),
                      steps_per_report=2, val_batches=-1, seed=1)
    return LoraOptions(data=data, output=out, model=str(model), target_modules=TARGETS,
                       train=train, **kw)


def _weights(path: Path) -> dict:
    return mx.load(str(path))


def test_train_lowers_loss_and_writes_adapter(mixed_dir, data_dir, tmp_path):
    out = tmp_path / "ad"
    lines = []
    r = train_lora(_opts(mixed_dir, data_dir, out, iters=8, steps_per_eval=4), echo=lines.append)
    text = "\n".join(lines)
    assert "trainable parameters:" in text and "layer   3 full_attention: in_proj_qkv" not in text
    assert "in_proj_qkv 4b r8" in text and "v_proj 8b r4" in text  # ranks follow bits
    assert r.steps == 8 and r.tokens_per_second > 0 and r.peak_memory > 0
    vals = dict(r.val_losses)
    assert vals[8] < vals[0]  # training helps on held-out text
    assert r.best_val_loss == min(vals.values()) and r.best_step == min(vals, key=vals.get)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["optiq"]["rank_scaling"] == "by_bits"
    assert cfg["training"]["iters"] == 8
    state = json.loads((out / STATE_FILE).read_text())
    assert state["step"] == 8 and state["tokens_per_second"] > 0 and state["peak_memory_gb"] > 0
    assert [s for s, _ in list_checkpoints(out)] == [4, 6, 8]  # the last 3 kept
    # the best adapter reproduces the best validation loss
    from optiq.train.data import load_jsonl
    from optiq.train.trainer import evaluate

    lm = load_model(mixed_dir)
    adapters.load_adapters(lm.model, out, BEST_WEIGHTS)
    valid = load_jsonl(data_dir / "valid.jsonl", lm.tokenizer, max_seq_length=128)
    assert evaluate(lm.model, valid, 4, 128) == pytest.approx(r.best_val_loss, rel=1e-4)


def test_resume_continues_exactly(mixed_dir, data_dir, tmp_path):
    straight = tmp_path / "straight"
    lines = []
    train_lora(_opts(mixed_dir, data_dir, straight, iters=4, dropout=0.1), echo=lines.append)
    assert not [x for x in lines if "full vocabulary-sized logits" in x]  # the chunked loss, dropout or not
    split = tmp_path / "split"
    train_lora(_opts(mixed_dir, data_dir, split, iters=2, dropout=0.1), echo=lambda s: None)
    with pytest.raises(ConfigError, match="--resume"):  # never clobbers silently
        train_lora(_opts(mixed_dir, data_dir, split, iters=4, dropout=0.1), echo=lambda s: None)
    r = train_lora(_opts(mixed_dir, data_dir, split, iters=4, dropout=0.1, resume=True), echo=lambda s: None)
    assert r.resumed_from == 2 and r.steps == 4
    a, b = _weights(straight / "adapters.safetensors"), _weights(split / "adapters.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-6).item(), k
    with pytest.raises(ConfigError, match="other target modules or ranks"):
        train_lora(_opts(mixed_dir, data_dir, split, iters=6, resume=True, rank=4), echo=lambda s: None)


class _StopAt:
    """Reporter that presses Ctrl-C after a given step."""

    def __init__(self, step):
        self.step = step

    def on_start(self, *a): pass
    def on_report(self, *a): pass
    def on_eval(self, *a): pass
    def on_save(self, *a): pass
    def on_end(self): pass

    def on_step(self, step, *a):
        if step == self.step:
            raise KeyboardInterrupt


def test_interrupt_saves_checkpoint_then_resume(mixed_dir, data_dir, tmp_path):
    out = tmp_path / "ad"
    with pytest.raises(TrainingInterrupted, match="step 3.*--resume"):
        train_lora(_opts(mixed_dir, data_dir, out, iters=5, save_every=10), echo=lambda s: None,
                   reporter=_StopAt(3))
    assert [s for s, _ in list_checkpoints(out)] == [3]
    r = train_lora(_opts(mixed_dir, data_dir, out, iters=5, save_every=10, resume=True), echo=lambda s: None)
    assert r.resumed_from == 3 and r.steps == 5


def test_prompt_masked_chat_training_and_grad_checkpoint(base_dir, tmp_path):
    recs = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(8)]
    write_jsonl(tmp_path / "d" / "train.jsonl", recs)
    r = train_lora(_opts(base_dir, tmp_path / "d", tmp_path / "ad", iters=2, mask_prompt=True,
                         rank_scaling="constant"), echo=lambda s: None)
    assert r.steps == 2 and r.best_val_loss is None
    assert (tmp_path / "ad" / BEST_WEIGHTS).exists()  # no validation: best = last
    opts = _opts(base_dir, tmp_path / "d", tmp_path / "gc", iters=2, mask_prompt=True,
                 rank_scaling="constant")
    opts.train.grad_checkpoint = True
    train_lora(opts, echo=lambda s: None)
    a, b = _weights(tmp_path / "ad" / "adapters.safetensors"), _weights(tmp_path / "gc" / "adapters.safetensors")
    for k in a:  # recomputation changes memory, not results
        assert mx.allclose(a[k], b[k], atol=1e-5).item(), k


def test_fuse_matches_adapter(mixed_dir, base_dir, data_dir, tmp_path):
    from mlx_lm.utils import dequantize_model

    from optiq.core.cpu import prepare_for_cpu
    from optiq.train.fuse import fuse_adapter

    out = tmp_path / "ad"
    train_lora(_opts(mixed_dir, data_dir, out, iters=3), echo=lambda s: None)
    x = mx.array([[5, 6, 7, 8, 9, 10, 11, 12]])
    # reference: the dequantized base with the adapter unfused
    ref_model = load_model(mixed_dir, fast_cpu=False)
    ref_model.model = prepare_for_cpu(dequantize_model(ref_model.model))
    base = ref_model.model(x)
    adapters.load_adapters(ref_model.model, out)
    ref = ref_model.model(x)
    effect = mx.abs(ref - base).max().item()
    assert effect > 0.05
    r = fuse_adapter(mixed_dir, out, tmp_path / "fused_f", dequantize=True)
    assert r.modules == 16 and r.mean_update_error is None  # q,v x2 + in_proj_qkv,out_proj x6
    fused = load_model(tmp_path / "fused_f")
    assert "quantization" not in fused.config
    assert not list((tmp_path / "fused_f").glob("optiq_metadata.json"))
    # bf16 storage of W + update is the only difference: far below the update itself
    assert mx.abs(fused.model(x) - ref).max().item() < 0.1 * effect
    r = fuse_adapter(mixed_dir, out, tmp_path / "fused_q")
    assert r.requantized == 16 and 0 <= r.mean_update_error <= r.worst_update_error
    q = json.loads((tmp_path / "fused_q" / "config.json").read_text())["quantization"]
    assert q["language_model.model.layers.3.self_attn.v_proj"]["bits"] == 8  # per-layer bits kept
    assert q["language_model.model.layers.3.self_attn.q_proj"]["bits"] == 4
    assert load_model(tmp_path / "fused_q").model(x).shape == ref.shape


# ---------------------------------------------------------------------------- CLI


def _cli(args, capsys):
    from optiq.cli.main import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_train_export_fuse(mixed_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ad"
    code, stdout, _ = _cli(["lora", "train", str(mixed_dir), "--data", str(data_dir), "-o", str(out),
                            "--dry-run", "--target-modules", "all-linear"], capsys)
    assert code == 0
    assert "rank scaling: by_bits" in stdout and "trainable parameters:" in stdout
    assert "layer   7 full_attention: q_proj 8b r4" in stdout and not out.exists()
    code, stdout, _ = _cli(["lora", "train", str(mixed_dir), "--data", str(data_dir), "-o", str(out),
                            "--iters", "2", "--max-seq-length", "128", "--batch-size", "4",
                            "--steps-per-eval", "2", "--quiet"], capsys)
    assert code == 0 and "done: 2 steps" in stdout and "tok/s" in stdout
    code, stdout, _ = _cli(["lora", "export", str(out), "--format", "mlx-lm", "-o", str(tmp_path / "m")], capsys)
    assert code == 0 and (tmp_path / "m" / "adapters.safetensors").exists()
    code, stdout, _ = _cli(["lora", "fuse", "--adapter", str(out), "-o", str(tmp_path / "f")], capsys)
    assert code == 0 and "fused 4 modules" in stdout  # MODEL defaults to the adapter's base


def test_cli_errors_are_one_line(mixed_dir, data_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    code, _, err = _cli(["lora", "train", str(mixed_dir), "--data", str(bad), "-o", str(tmp_path / "o")], capsys)
    assert code == 1 and err.startswith("error: ") and "train.jsonl:2" in err
    code, _, err = _cli(["lora", "train", str(mixed_dir), "--data", str(data_dir), "-o", str(tmp_path / "o"),
                         "--rank-scaling", "by_sensitivity", "--dry-run"], capsys)
    assert code == 1 and "sensitivities" in err
    code, _, err = _cli(["lora", "train", str(mixed_dir), "--data", str(data_dir), "-o", str(tmp_path / "o"),
                         "--target-modules", "nonexistent", "--dry-run"], capsys)
    assert code == 1 and "in_proj_qkv" in err
    code, _, err = _cli(["lora", "export", str(tmp_path / "none"), "-o", str(tmp_path / "x")], capsys)
    assert code == 1 and "does not exist" in err


def test_cli_default_model_is_the_bundled_quant_with_by_bits_ranks(data_dir, tmp_path, capsys):
    assert default_model()[0] == bundled_quant_path()
    out = tmp_path / "ad"
    code, stdout, _ = _cli(["lora", "train", "--data", str(data_dir), "-o", str(out), "--dry-run"], capsys)
    assert code == 0 and not out.exists()
    assert f"model: {bundled_quant_path()} (default: the bundled model's OptiQ quant)\n" in stdout
    assert "rank scaling: by_bits, base rank 8, scale 20, bits from optiq_metadata.json" in stdout
    # default targets: q_proj/v_proj of the full-attention blocks (3 and 7), at the quant's bits
    # (as shipped: layer 7 q_proj 3-bit rank 11, v_proj 4-bit rank 8)
    config_bits = {k: v["bits"] for k, v in
                   json.loads((bundled_quant_path() / "config.json").read_text())["quantization"].items()
                   if isinstance(v, dict)}
    for layer in (3, 7):
        items = []
        for name in ("q_proj", "v_proj"):
            b = config_bits[f"language_model.model.layers.{layer}.self_attn.{name}"]
            items.append(f"{name} {b}b r{rank_for_bits(8, b)}")
        assert f"layer   {layer} full_attention: {', '.join(items)}\n" in stdout

    code, stdout, _ = _cli(["lora", "train", "--data", str(data_dir), "-o", str(out), "--dry-run",
                            "--target-modules", "all-linear"], capsys)
    assert code == 0
    seen = {}
    for layer, items in re.findall(r"layer +(\d+) \w+: (.*)", stdout):
        for name, bits, rank in re.findall(r"(\w+) (\d+)b r(\d+)", items):
            path = next(k for k in config_bits if f"layers.{layer}." in k and k.endswith("." + name))
            assert config_bits[path] == int(bits), path  # bits are the quant's per-layer bits
            if name in ("in_proj_a", "in_proj_b"):  # 4 outputs: rank clamped to 4
                assert int(rank) == min(4, rank_for_bits(8, int(bits))), path
                continue
            assert int(rank) == rank_for_bits(8, int(bits)), (path, bits, rank)
            seen[int(bits)] = int(rank)
    assert len(seen) >= 3 and len(set(seen.values())) == len(seen)  # widths differ, so ranks do


def test_cli_default_falls_back_to_float_model_without_the_quant(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(model_io, "bundled_quant_path", lambda: tmp_path / "not-installed")
    assert default_model()[0] == bundled_model_path()
    code, stdout, _ = _cli(["lora", "train", "--data", str(data_dir), "-o", str(tmp_path / "ad"),
                            "--dry-run"], capsys)
    assert code == 0
    assert (f"model: {bundled_model_path()} (default: the bundled float model; its OptiQ quant "
            "is not installed)") in stdout
    assert "rank scaling: constant (asked: by_bits)" in stdout and "q_proj float r8" in stdout
