"""Wrap a model with per-module-rank LoRA layers, and save / load / remove adapters.

The layers are mlx-lm's (``LoRALinear`` over ``Linear``/``QuantizedLinear`` – including
OptiQ's CPU subclasses – and ``LoRASwitchLinear`` over MoE expert pools), each built with
its own rank and scale. The saved files follow mlx-lm's layout:

* ``adapters.safetensors`` – ``<module path>.lora_a`` [in, r] and ``.lora_b`` [r, out]
  (expert pools: [E, r, in] and [E, out, r]);
* ``adapter_config.json`` – mlx-lm's fields (``fine_tune_type``, ``num_layers``,
  ``lora_parameters`` with ``rank``, ``scale``, ``dropout``, ``keys``) plus an ``optiq``
  section with every module's rank, scale and bits.

Stock ``mlx_lm.load(..., adapter_path=...)`` reads this directly when all ranks and scales
are equal (``constant`` rank); for per-module ranks, :func:`export_mlx_lm` writes an
equivalent adapter padded with zeros to one rank, which stock mlx-lm loads with
identical outputs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from optiq.core.errors import ConfigError, ModelLoadError

from .ranks import RankPlan
from .targets import _lora_types, _switch_types, is_adaptable, module_dims

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AdapterModule:
    """What an adapter holds for one module (read back from adapter_config.json)."""

    path: str
    rank: int
    scale: float
    layer: int | None = None
    name: str | None = None
    bits: int | None = None
    num_experts: int = 0


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter directory's configuration."""

    modules: list[AdapterModule]
    dropout: float
    config: dict[str, Any]

    @property
    def uniform(self) -> bool:
        return len({(m.rank, m.scale) for m in self.modules}) <= 1


def module_at(model: nn.Module, path: str) -> nn.Module | None:
    """The module at a dotted path (``model.layers.3.self_attn.q_proj``), or ``None``
    when the path does not lead to one (adapters name modules by path)."""
    node: Any = model
    for part in path.split("."):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return None
            node = node[int(part)]
        elif isinstance(node, dict) or isinstance(node, nn.Module):
            if part not in node:
                return None
            node = node[part]
        else:
            return None
    return node if isinstance(node, nn.Module) else None


def _wrap(module: nn.Module, rank: int, scale: float, dropout: float) -> nn.Module:
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    cls = LoRASwitchLinear if isinstance(module, _switch_types()) else LoRALinear
    wrapped = cls.from_base(module, r=rank, dropout=dropout, scale=scale)
    # from_base draws lora_a in float32 already; keep both factors float32 whatever the base
    wrapped.lora_a = wrapped.lora_a.astype(mx.float32)
    wrapped.lora_b = wrapped.lora_b.astype(mx.float32)
    return wrapped


def wrap_modules(model: nn.Module, modules: list[AdapterModule], dropout: float = 0.0) -> None:
    """Freeze the model and put a LoRA layer of each module's rank/scale in its place."""
    model.freeze()
    updates = []
    for m in modules:
        base = module_at(model, m.path)
        if base is None:
            raise ModelLoadError(f"the model has no module {m.path} (adapter made for another model?)")
        if isinstance(base, _lora_types()):
            raise ConfigError(f"{m.path} already has a LoRA layer: remove_adapters(model) first")
        if not is_adaptable(base):
            raise ModelLoadError(f"{m.path} is a {type(base).__name__}, not a linear layer")
        updates.append((m.path, _wrap(base, m.rank, m.scale, dropout)))
    model.update_modules(tree_unflatten(updates))


def apply_plan(model: nn.Module, plan: RankPlan, dropout: float = 0.0) -> list[AdapterModule]:
    modules = [
        AdapterModule(
            path=t.path,
            rank=plan.ranks[t.path],
            scale=plan.scales[t.path],
            layer=t.layer,
            name=t.name,
            bits=plan.bits[t.path],
            num_experts=t.num_experts,
        )
        for t in plan.targets
    ]
    wrap_modules(model, modules, dropout)
    return modules


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA factors of a wrapped model, keyed as mlx-lm saves them."""
    return {
        k: v
        for k, v in tree_flatten(model.parameters())
        if k.endswith((".lora_a", ".lora_b"))
    }


def save_weights(model: nn.Module, file: Path) -> None:
    weights = adapter_weights(model)
    tmp = Path(file).with_name(Path(file).name + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    tmp.replace(file)  # atomic: an interrupted save never leaves a half-written adapter


def build_config(
    plan: RankPlan,
    n_blocks: int,
    *,
    dropout: float,
    alpha: float | None,
    model_path: str | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """adapter_config.json: mlx-lm's fields plus OptiQ's per-module ranks."""
    first = min(t.layer for t in plan.targets)
    keys = sorted({t.name for t in plan.targets})
    ranks = set(plan.ranks.values())
    scales = set(plan.scales.values())
    config = {
        "fine_tune_type": "lora",
        "num_layers": n_blocks - first,
        "lora_parameters": {
            "rank": plan.base_rank if len(ranks) > 1 else next(iter(ranks)),
            "scale": next(iter(scales)) if len(scales) == 1 else None,
            "dropout": dropout,
            "keys": keys,
        },
        "model": model_path,
        "optiq": {
            "format_version": FORMAT_VERSION,
            "rank_scaling": plan.scaling,
            "requested_rank_scaling": plan.requested,
            "base_rank": plan.base_rank,
            "alpha": alpha,
            "bits_source": plan.bits_source,
            "mlx_lm_compatible": len(ranks) == 1 and len(scales) == 1,
            "trainable_parameters": plan.trainable_parameters,
            "modules": {
                t.path: {
                    "rank": plan.ranks[t.path],
                    "scale": plan.scales[t.path],
                    "bits": plan.bits[t.path],
                    "layer": t.layer,
                    "name": t.name,
                    "layer_kind": t.layer_kind,
                    "input_dims": t.input_dims,
                    "output_dims": t.output_dims,
                    "num_experts": t.num_experts,
                    **({"sensitivity": plan.sensitivity[t.path]} if t.path in plan.sensitivity else {}),
                }
                for t in plan.targets
            },
        },
    }
    if config["lora_parameters"]["scale"] is None:
        # mlx-lm needs one scale; ours are per module (alpha / rank): keep the base one
        config["lora_parameters"]["scale"] = (alpha or 0) / plan.base_rank
    if extra:
        config.update(extra)
    return config


def write_config(config: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")


def read_spec(adapter_dir: Path, weights: dict[str, mx.array] | None = None) -> AdapterSpec:
    """Read an adapter dir written by OptiQ, or a stock mlx-lm one (ranks from shapes)."""
    adapter_dir = Path(adapter_dir)
    cfg_file = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"adapter directory {adapter_dir} does not exist")
    if not cfg_file.exists():
        raise ModelLoadError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not an adapter directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ModelLoadError(f"{cfg_file}: fine_tune_type {kind!r} is not supported (only lora)")
    params = config.get("lora_parameters") or {}
    dropout = float(params.get("dropout", 0.0) or 0.0)
    optiq = config.get("optiq")
    if optiq and isinstance(optiq.get("modules"), dict):
        modules = [
            AdapterModule(
                path=p,
                rank=int(m["rank"]),
                scale=float(m["scale"]),
                layer=m.get("layer"),
                name=m.get("name"),
                bits=m.get("bits"),
                num_experts=int(m.get("num_experts", 0)),
            )
            for p, m in optiq["modules"].items()
        ]
        return AdapterSpec(modules=modules, dropout=dropout, config=config)
    # stock mlx-lm adapter: modules and ranks come from the weight names and shapes
    weights = weights if weights is not None else load_weight_file(adapter_dir)
    if "scale" not in params:
        raise ModelLoadError(f"{cfg_file}: lora_parameters has no 'scale'")
    modules = []
    for key, a in sorted(weights.items()):
        if not key.endswith(".lora_a"):
            continue
        rank = a.shape[-2] if a.ndim == 3 else a.shape[-1]
        modules.append(
            AdapterModule(
                path=key[: -len(".lora_a")],
                rank=int(rank),
                scale=float(params["scale"]),
                num_experts=a.shape[0] if a.ndim == 3 else 0,
            )
        )
    if not modules:
        raise ModelLoadError(f"{adapter_dir / ADAPTER_WEIGHTS} holds no LoRA weights")
    return AdapterSpec(modules=modules, dropout=dropout, config=config)


def load_weight_file(adapter_dir: Path, file: str = ADAPTER_WEIGHTS) -> dict[str, mx.array]:
    path = Path(adapter_dir) / file
    if not Path(adapter_dir).is_dir():
        raise ModelLoadError(f"adapter directory {adapter_dir} does not exist")
    if not path.exists():
        raise ModelLoadError(f"{adapter_dir} has no {file}")
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError/ValueError on bad files
        raise ModelLoadError(f"{path} is not a readable safetensors file ({e})") from None


def expected_shapes(m: AdapterModule, base: nn.Module) -> dict[str, tuple[int, ...]]:
    in_dims, out_dims, n_exp = module_dims(base)
    if n_exp:
        return {"lora_a": (n_exp, m.rank, in_dims), "lora_b": (n_exp, out_dims, m.rank)}
    return {"lora_a": (in_dims, m.rank), "lora_b": (m.rank, out_dims)}


def load_adapters(
    model: nn.Module, adapter_dir: Path, weights_file: str = ADAPTER_WEIGHTS
) -> AdapterSpec:
    """Wrap ``model`` as the adapter says and load its weights; checks every tensor."""
    if not (Path(adapter_dir) / ADAPTER_CONFIG).exists():
        read_spec(adapter_dir, {})  # raises the directory / config error
    weights = load_weight_file(adapter_dir, weights_file)
    spec = read_spec(adapter_dir, weights)
    errors = []
    for m in spec.modules:
        base = module_at(model, m.path)
        if base is None or not (is_adaptable(base) or isinstance(base, _lora_types())):
            errors.append(f"  {m.path}: no such linear layer in the model")
            continue
        if isinstance(base, _lora_types()):
            base = base.linear
        for leaf, shape in expected_shapes(m, base).items():
            w = weights.get(f"{m.path}.{leaf}")
            if w is None:
                errors.append(f"  {m.path}.{leaf}: missing from the adapter weights")
            elif tuple(w.shape) != shape:
                errors.append(f"  {m.path}.{leaf}: shape {tuple(w.shape)}, the model needs {shape}")
    known = {f"{m.path}.{leaf}" for m in spec.modules for leaf in ("lora_a", "lora_b")}
    errors += [f"  {k}: not an adapted module of this adapter" for k in weights if k not in known]
    if errors:
        raise ModelLoadError(
            f"adapter {adapter_dir} does not fit this model:\n" + "\n".join(errors[:20])
        )
    wrap_modules(model, spec.modules, spec.dropout)
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())
    return spec


def remove_adapters(model: nn.Module) -> int:
    """Put the base layers back in place of LoRA layers; returns how many were removed."""
    restore = [(n, m.linear) for n, m in model.named_modules() if isinstance(m, _lora_types())]
    if restore:
        model.update_modules(tree_unflatten(restore))
    return len(restore)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


# ---------------------------------------------------------------------------- stock mlx-lm export


def export_mlx_lm(adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write an adapter stock mlx-lm loads: one rank (the largest) and one scale.

    Smaller ranks are padded with zero rows/columns and per-module scale ratios are folded
    into ``lora_b``, so the padded adapter computes exactly the same update.
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    weights = load_weight_file(adapter_dir)
    spec = read_spec(adapter_dir, weights)
    if out_dir.resolve() == adapter_dir.resolve():
        raise ConfigError("export into a different directory than the adapter's")
    rank = max(m.rank for m in spec.modules)
    scale = max(m.scale for m in spec.modules)
    out = {}
    for m in spec.modules:
        a, b = weights[f"{m.path}.lora_a"], weights[f"{m.path}.lora_b"]
        b = b * (m.scale / scale)
        pad = rank - m.rank
        if m.num_experts:
            a = mx.pad(a, [(0, 0), (0, pad), (0, 0)])
            b = mx.pad(b, [(0, 0), (0, 0), (0, pad)])
        else:
            a = mx.pad(a, [(0, 0), (0, pad)])
            b = mx.pad(b, [(0, pad), (0, 0)])
        out[f"{m.path}.lora_a"] = a
        out[f"{m.path}.lora_b"] = b
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    layers = [m.layer for m in spec.modules if m.layer is not None]
    config["lora_parameters"] = {
        **config.get("lora_parameters", {}),
        "rank": rank,
        "scale": scale,
    }
    config.pop("optiq", None)
    config["exported_from"] = {"adapter": str(adapter_dir), "padded_to_rank": rank}
    if layers and "num_layers" not in config:
        raise ConfigError(f"{adapter_dir}: adapter_config.json has no num_layers")
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / ADAPTER_WEIGHTS), out, metadata={"format": "mlx"})
    write_config(config, out_dir)
    return config


def copy_adapter(src: Path, dst: Path, weights_file: str = ADAPTER_WEIGHTS) -> None:
    """Copy an adapter (config + a chosen weights file saved as adapters.safetensors)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / ADAPTER_CONFIG, dst / ADAPTER_CONFIG)
    shutil.copy2(src / weights_file, dst / ADAPTER_WEIGHTS)

