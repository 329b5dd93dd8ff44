"""Export an OptiQ/mlx-lm LoRA adapter as a Hugging Face PEFT adapter.

PEFT differs from mlx-lm in three ways this handles:

* names: ``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight``, where the
  HF module name drops mlx-lm's wrapper prefix (``language_model.model.layers.3...`` is
  ``model.layers.3...`` in ``*ForCausalLM``; ``model.language_model.layers.3...`` in a
  ``*ForConditionalGeneration`` model);
* orientation: ``lora_A.weight`` is [r, in] and ``lora_B.weight`` [out, r] (the transposes
  of mlx-lm's ``lora_a`` [in, r] and ``lora_b`` [r, out]);
* scaling: PEFT multiplies by ``lora_alpha / r``, so a module with mlx scale ``s`` and rank
  ``r`` gets alpha ``s * r``. Modules whose rank or alpha differ from the adapter-wide
  ``r`` / ``lora_alpha`` are listed in ``rank_pattern`` / ``alpha_pattern``.

MoE expert pools (stacked experts) have no PEFT LoRA equivalent here and are refused.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

from optiq.core.errors import ConfigError

from .adapters import ADAPTER_WEIGHTS, load_weight_file, read_spec

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
LAYOUTS = ("causal-lm", "conditional-generation")


def hf_module_name(mlx_path: str, layout: str = "causal-lm") -> str:
    """The Hugging Face module name of an mlx-lm module path."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    path = mlx_path
    if path.startswith("language_model."):
        path = path[len("language_model.") :]
    if layout == "conditional-generation" and path.startswith("model."):
        path = "model.language_model." + path[len("model.") :]
    return path


def export_peft(
    adapter_dir: Path,
    out_dir: Path,
    *,
    base_model: str | None = None,
    layout: str = "causal-lm",
    weights_file: str = ADAPTER_WEIGHTS,
) -> dict[str, Any]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` for PEFT; returns the config."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    weights = load_weight_file(adapter_dir, weights_file)
    spec = read_spec(adapter_dir, weights)
    pools = [m.path for m in spec.modules if m.num_experts]
    if pools:
        raise ConfigError(
            f"PEFT export does not support MoE expert-pool adapters ({len(pools)} pools, "
            f"e.g. {pools[0]}); fuse the adapter instead (optiq lora fuse)"
        )
    if out_dir.exists() and out_dir.resolve() == adapter_dir.resolve():
        raise ConfigError("export into a different directory than the adapter's")
    names = {m.path: hf_module_name(m.path, layout) for m in spec.modules}
    if len(set(names.values())) != len(names):
        raise ConfigError("two adapted modules map to the same Hugging Face name")

    r = Counter(m.rank for m in spec.modules).most_common(1)[0][0]
    alphas = {m.path: m.scale * m.rank for m in spec.modules}
    alpha = Counter(alphas[m.path] for m in spec.modules if m.rank == r).most_common(1)[0][0]
    rank_pattern = {names[m.path]: m.rank for m in spec.modules if m.rank != r}
    alpha_pattern = {names[m.path]: alphas[m.path] for m in spec.modules if alphas[m.path] != alpha}

    tensors = {}
    for m in spec.modules:
        a = weights[f"{m.path}.lora_a"].astype(mx.float32)  # [in, r]
        b = weights[f"{m.path}.lora_b"].astype(mx.float32)  # [r, out]
        prefix = f"base_model.model.{names[m.path]}"
        tensors[f"{prefix}.lora_A.weight"] = mx.contiguous(a.T)
        tensors[f"{prefix}.lora_B.weight"] = mx.contiguous(b.T)

    src = json.loads((adapter_dir / "adapter_config.json").read_text())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or src.get("model"),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(names.values()),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
    (out_dir / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config
