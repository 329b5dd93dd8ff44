"""Merge a LoRA adapter into a model directory (``W + scale * (lora_a @ lora_b).T``).

A quantized module is dequantized, merged and quantized again at its own bits and group
size, so a mixed-precision model keeps its per-layer precision. Re-quantizing can round
away an update smaller than the quantization step: :func:`fuse_adapter` measures how much
of each module's update survives and reports it, and ``dequantize=True`` keeps it all
(a float model).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from optiq.core.errors import ConfigError, ModelLoadError

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapters
from .ranks import METADATA_FILE
from .targets import _lora_types

WEIGHT_SUFFIXES = (".safetensors",)
SKIP_FILES = {"config.json", "model.safetensors.index.json"}


@dataclass
class FuseResult:
    output: Path
    modules: int
    requantized: int
    # mean over re-quantized modules of ||fused - base - delta|| / ||delta||
    mean_update_error: float | None
    worst_update_error: float | None


def _dequantized(m: nn.Module) -> mx.array:
    if "scales" in m:
        return mx.dequantize(m["weight"], m["scales"], m.get("biases"), group_size=m.group_size,
                             bits=m.bits, mode=m.mode).astype(mx.float32)
    return m["weight"].astype(mx.float32)


def _update_error(lora: nn.Module, fused: nn.Module) -> float | None:
    """How much of the LoRA update re-quantization lost (0 = none, 1 = all of it)."""
    base = lora.linear
    if "scales" not in base or "scales" not in fused:
        return None
    a, b = lora.lora_a.astype(mx.float32), lora.lora_b.astype(mx.float32)
    if a.ndim == 3:  # expert pool: a [E, r, in], b [E, out, r]
        delta = lora.scale * (b @ a)
    else:
        delta = lora.scale * (b.T @ a.T)
    norm = mx.linalg.norm(delta.reshape(-1)).item()
    if norm == 0.0:
        return 0.0
    got = _dequantized(fused) - _dequantized(base)
    return mx.linalg.norm((got - delta).reshape(-1)).item() / norm


def adapter_base_model(adapter_dir: Path) -> str:
    """The base model recorded in the adapter's config, checked to be readable here.

    Fusing into some other model than the one the adapter was trained on would give a
    wrong model without any error, so a base that cannot be read is an error, never a
    silent switch to the bundled model.
    """
    from optiq.core.model_io import validate_model_dir

    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / ADAPTER_CONFIG
    how = f"pass the base model as MODEL: `optiq lora fuse MODEL --adapter {adapter_dir} -o OUT`"
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"adapter directory {adapter_dir} does not exist")
    if not cfg_file.is_file():
        raise ModelLoadError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not an adapter directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON ({e}): {how}") from None
    base = config.get("model") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{cfg_file} does not name the adapter's base model ('model'): {how}")
    try:
        validate_model_dir(base)
    except ModelLoadError as e:
        raise ModelLoadError(f"the adapter's base model {base} (from {cfg_file}) cannot be read: {e}; {how}") from None
    return base


def fuse_adapter(
    model: str | Path | None,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dequantize: bool = False,
    weights_file: str = ADAPTER_WEIGHTS,
) -> FuseResult:
    """Write ``model`` with the adapter merged in to ``out_dir`` (same layout, same config).

    ``model=None`` means the adapter's own base model (:func:`adapter_base_model`).
    """
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from optiq.core.model_io import load_model

    out_dir = Path(out_dir)
    if model is None:
        model = adapter_base_model(adapter_dir)
    lm = load_model(model, fast_cpu=False)
    if out_dir.exists() and out_dir.resolve() == lm.path.resolve():
        raise ConfigError("fuse into a new directory, not over the base model")
    load_adapters(lm.model, Path(adapter_dir), weights_file)
    fused, errors = [], []
    for name, m in lm.model.named_modules():
        if isinstance(m, _lora_types()):
            f = m.fuse(dequantize=dequantize)
            if not dequantize:
                err = _update_error(m, f)
                if err is not None:
                    errors.append(err)
            fused.append((name, f))
    lm.model.update_modules(tree_unflatten(fused))
    config = dict(lm.config)
    if dequantize:
        lm.model = dequantize_model(lm.model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    mx.eval(lm.model.parameters())

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.safetensors"):
        old.unlink()
    save_model(out_dir, lm.model, donate_model=False)
    save_config(config, out_dir / "config.json")
    for f in lm.path.iterdir():
        if not f.is_file() or f.name in SKIP_FILES or f.name.endswith(WEIGHT_SUFFIXES):
            continue
        if dequantize and f.name == METADATA_FILE:
            continue  # its per-layer bits no longer describe the weights
        shutil.copy2(f, out_dir / f.name)
    (out_dir / "optiq_fused_adapter.json").write_text(
        json.dumps(
            {
                "base_model": str(lm.path),
                "adapter": str(Path(adapter_dir)),
                "weights_file": weights_file,
                "dequantized": dequantize,
                "modules": len(fused),
            },
            indent=2,
        )
        + "\n"
    )
    return FuseResult(
        output=out_dir,
        modules=len(fused),
        requantized=len(errors),
        mean_update_error=sum(errors) / len(errors) if errors else None,
        worst_update_error=max(errors) if errors else None,
    )
