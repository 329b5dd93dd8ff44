"""Helpers shared by the LoRA tests, and checks that they build what they claim.

``quantize_mixed`` makes a mixed 4/8-bit copy of a model the way ``optiq convert`` lays
it out in config.json (per-module ``quantization`` entries), so the LoRA tests do not
depend on the convert command.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import optiq.core  # noqa: F401  (OpenBLAS before MLX)

EIGHT_BIT = ("layers.7.", "layers.3.self_attn.v_proj", "linear_attn.in_proj_z")


def eight_bit(path: str) -> bool:
    return any(p in path for p in EIGHT_BIT)


def quantize_mixed(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` with 8-bit weights where :func:`eight_bit`, 4-bit elsewhere
    (embeddings stay float)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(Path(src))

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or "embed" in path:
            return False
        return {"bits": 8 if eight_bit(path) else 4, "group_size": 64}

    model, config = quantize_model(model, config, 64, 4, quant_predicate=predicate)
    dst.mkdir(parents=True, exist_ok=True)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
            "config.json",
            "model.safetensors.index.json",
        ):
            shutil.copy(f, dst / f.name)
    return dst


def heldout_lines(model_dir: Path, n: int, seed: int = 0, words: int = 40) -> list[str]:
    """``n`` short text snippets from the bundled model's held-out text."""
    text = (Path(model_dir) / "heldout.txt").read_text().split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, max(1, len(text) - words))
        out.append(" ".join(text[start : start + rng.randint(words // 2, words)]))
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_text_data(model_dir: Path, out: Path, n_train: int = 24, n_valid: int = 8) -> Path:
    lines = heldout_lines(model_dir, n_train + n_valid, words=24)
    write_jsonl(out / "train.jsonl", [{"text": t} for t in lines[:n_train]])
    write_jsonl(out / "valid.jsonl", [{"text": t} for t in lines[n_train:]])
    return out


def test_quantize_mixed_writes_per_module_bits(bundled_model_dir, tmp_path):
    q = quantize_mixed(bundled_model_dir, tmp_path / "q")
    entries = {
        k: v
        for k, v in json.loads((q / "config.json").read_text())["quantization"].items()
        if isinstance(v, dict)
    }
    assert {v["bits"] for v in entries.values()} == {4, 8}
    assert entries["language_model.model.layers.3.self_attn.v_proj"]["bits"] == 8
    assert entries["language_model.model.layers.3.self_attn.q_proj"]["bits"] == 4
    assert (q / "tokenizer.json").exists()
