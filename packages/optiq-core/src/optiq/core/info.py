"""A model's description for ``optiq info``: computed here, printed by the CLI."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .architecture import LayerInfo, describe_layers, parameter_count, quantized_modules, weight_dtype
from .model_io import load_model, text_config


@dataclass
class ModelInfo:
    path: Path
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int | None
    vocab_size: int | None
    parameters: int
    dtype: str
    disk_bytes: int
    weight_bytes: int
    layers: list[LayerInfo]
    num_experts: int = 0
    experts_per_token: int = 0
    quantization: dict[str, Any] | None = None
    bits_histogram: dict[int, int] = field(default_factory=dict)
    context_length: int | None = None

    @property
    def layer_kind_counts(self) -> dict[str, int]:
        return dict(Counter(layer.kind for layer in self.layers))


def dir_size(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def model_info(model: str | Path | None = None) -> ModelInfo:
    """Describe a model directory. Weights are loaded lazily (only shapes are needed)."""
    loaded = load_model(model, fast_cpu=False, lazy=True)
    cfg = text_config(loaded.config)
    m = loaded.model
    quant = loaded.config.get("quantization") or loaded.config.get("quantization_config")
    hist = Counter(mod.bits for _, mod in quantized_modules(m))
    archs = loaded.config.get("architectures") or [type(m).__module__.rsplit(".", 1)[-1]]
    return ModelInfo(
        path=loaded.path,
        model_type=loaded.config["model_type"],
        architecture=archs[0],
        num_layers=len(m.layers),
        hidden_size=cfg.get("hidden_size"),
        vocab_size=cfg.get("vocab_size"),
        parameters=parameter_count(m),
        dtype=weight_dtype(m),
        disk_bytes=dir_size(loaded.path),
        weight_bytes=dir_size(loaded.path, "*.safetensors"),
        layers=describe_layers(m),
        num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
        quantization=quant,
        bits_histogram=dict(sorted(hist.items())),
        context_length=cfg.get("max_position_embeddings"),
    )
