"""``kv_config.json``: per-layer K and V bit widths for the mixed-precision KV cache.

The file is versioned (``format``/``version``) and carries the identity of the model it
was measured on (model type, layer count, vocabulary, and the index and K/V shape of
every KV layer), so applying it to another model fails with a clear message instead of
silently misbehaving. See ``docs/kv-cache.md`` for the schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..affine import check_bits
from ..errors import ConfigError
from . import quant
from .layers import KVLayer, KVLayout, SkippedLayer

FORMAT = "optiq-kv-config"
VERSION = 2  # 2 added "rotation"; version-1 files (no rotation) are still read
READ_VERSIONS = (1, 2)
BITS_DEFINITION = (
    "mean stored bits per K/V element over all KV layers, weighted by element count: "
    "the code bits plus each group's fp16 scale and bias (2*16/group_size)"
)


@dataclass
class KVConfig:
    """Per-layer (k_bits, v_bits) for one model's KV layers."""

    model: KVLayout
    group_size: int
    layers: dict[int, tuple[int, int]]  # layer index -> (k_bits, v_bits)
    target_bits: float | None = None
    candidate_bits: tuple[int, ...] = ()
    model_name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # calibration, predicted/measured KL
    rotation: str = "hadamard"  # how K/V are rotated before quantizing (see quant.ROTATIONS)

    def bits(self, layer: int) -> tuple[int, int]:
        return self.layers[layer]

    @property
    def bytes_per_token(self) -> float:
        """KV bytes stored per token over all configured layers (codes + fp16 scales/biases)."""
        g = self.group_size
        total = 0.0
        for kv in self.model.kv_layers:
            kb, vb = self.layers[kv.index]
            total += kv.k_elements * quant.bits_per_element(kb, g) + kv.v_elements * quant.bits_per_element(vb, g)
        return total / 8

    @property
    def achieved_bits(self) -> float:
        """Mean stored bits per K/V element (see :data:`BITS_DEFINITION`)."""
        elements = sum(kv.k_elements + kv.v_elements for kv in self.model.kv_layers)
        return self.bytes_per_token * 8 / elements

    @property
    def fp16_ratio(self) -> float:
        """Stored KV bytes relative to an fp16 KV cache of the same model."""
        return self.bytes_per_token / self.model.fp16_bytes_per_token()

    def to_dict(self) -> dict[str, Any]:
        m = self.model
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {
                "name": self.model_name,
                "model_type": m.model_type,
                "num_layers": m.num_layers,
                "vocab_size": m.vocab_size,
                "kv_layers": [
                    {"layer": k.index, "n_kv_heads": k.n_kv_heads, "k_head_dim": k.k_head_dim, "v_head_dim": k.v_head_dim}
                    for k in m.kv_layers
                ],
            },
            "group_size": self.group_size,
            "rotation": self.rotation,
            "scale_dtype": "float16",
            "bits_definition": BITS_DEFINITION,
            "target_bits": self.target_bits,
            "achieved_bits": round(self.achieved_bits, 6),
            "candidate_bits": list(self.candidate_bits),
            "kv_bytes_per_token": self.bytes_per_token,
            "fp16_kv_bytes_per_token": m.fp16_bytes_per_token(),
            "layers": [
                {"layer": i, "k_bits": kb, "v_bits": vb} for i, (kb, vb) in sorted(self.layers.items())
            ],
            "skipped_layers": [{"layer": s.index, "cache": s.cache, "reason": s.reason} for s in m.skipped],
            **self.extra,
        }


def uniform_kv_config(
    layout: KVLayout,
    k_bits: int,
    v_bits: int | None = None,
    group_size: int = 64,
    model_name: str | None = None,
    rotation: str = "hadamard",
) -> KVConfig:
    """Every KV layer at the same widths (handy for baselines and tests)."""
    v_bits = k_bits if v_bits is None else v_bits
    check_bits(k_bits, "k_bits")
    check_bits(v_bits, "v_bits")
    quant.check_group_divides(group_size, head_dims(layout))
    return KVConfig(
        model=layout,
        group_size=group_size,
        layers={k.index: (k_bits, v_bits) for k in layout.kv_layers},
        model_name=model_name,
        rotation=quant.check_rotation(rotation),
    )


def head_dims(layout: KVLayout) -> list[int]:
    return sorted({d for k in layout.kv_layers for d in (k.k_head_dim, k.v_head_dim)})


def save_kv_config(config: KVConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return path


# ---------------------------------------------------------------- loading / validation


def _need(d: dict, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing '{key}'")
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, types):
        raise ConfigError(f"{where}: '{key}' has the wrong type ({type(v).__name__})")
    return v


def kv_config_from_dict(d: Any, source: str = "kv_config") -> KVConfig:
    """Parse and check a kv_config dict on its own (no model needed)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    if d.get("format") != FORMAT:
        raise ConfigError(f"{source}: not an OptiQ KV config (expected format '{FORMAT}', got {d.get('format')!r})")
    version = d.get("version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise ConfigError(
            f"{source}: unsupported kv_config version {version!r} (this OptiQ reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}); re-run `optiq kv-cache` to regenerate it"
        )
    m = _need(d, "model", dict, source)
    where = f"{source}: model"
    kv_layers = []
    for i, k in enumerate(_need(m, "kv_layers", list, where)):
        w = f"{where}.kv_layers[{i}]"
        if not isinstance(k, dict):
            raise ConfigError(f"{w}: expected an object")
        kv_layers.append(
            KVLayer(
                index=_need(k, "layer", int, w),
                n_kv_heads=_need(k, "n_kv_heads", int, w),
                k_head_dim=_need(k, "k_head_dim", int, w),
                v_head_dim=_need(k, "v_head_dim", int, w),
            )
        )
    skipped = []
    for i, s in enumerate(d.get("skipped_layers") or []):
        w = f"{source}: skipped_layers[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{w}: expected an object")
        skipped.append(SkippedLayer(_need(s, "layer", int, w), str(s.get("cache", "?")), str(s.get("reason", ""))))
    layout = KVLayout(
        model_type=_need(m, "model_type", str, where),
        num_layers=_need(m, "num_layers", int, where),
        vocab_size=_need(m, "vocab_size", int, where),
        kv_layers=tuple(kv_layers),
        skipped=tuple(skipped),
    )
    group_size = _need(d, "group_size", int, source)
    quant.check_group_divides(group_size, head_dims(layout))
    rotation = _rotation(d, version, source)
    layers: dict[int, tuple[int, int]] = {}
    known = {k.index: k for k in layout.kv_layers}
    skipped_idx = {s.index: s for s in layout.skipped}
    for i, entry in enumerate(_need(d, "layers", list, source)):
        w = f"{source}: layers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected an object")
        idx = _need(entry, "layer", int, w)
        kb = check_bits(_need(entry, "k_bits", int, w), f"{w}: k_bits")
        vb = check_bits(_need(entry, "v_bits", int, w), f"{w}: v_bits")
        if idx in layers:
            raise ConfigError(f"{w}: layer {idx} is listed twice")
        if idx not in known:
            if idx in skipped_idx:
                s = skipped_idx[idx]
                raise ConfigError(f"{w}: layer {idx} has no KV cache ({s.cache}: {s.reason})")
            raise ConfigError(f"{w}: layer {idx} is not one of the model's KV layers {sorted(known)}")
        layers[idx] = (kb, vb)
    missing = sorted(set(known) - set(layers))
    if missing:
        raise ConfigError(f"{source}: no bits given for KV layer(s) {missing}")
    target = d.get("target_bits")
    if target is not None and (not isinstance(target, (int, float)) or isinstance(target, bool) or not math.isfinite(target)):
        raise ConfigError(f"{source}: 'target_bits' must be a number or null")
    reserved = {
        "format", "version", "model", "group_size", "rotation", "scale_dtype", "bits_definition", "target_bits",
        "achieved_bits", "candidate_bits", "kv_bytes_per_token", "fp16_kv_bytes_per_token", "layers",
        "skipped_layers",
    }
    return KVConfig(
        model=layout,
        group_size=group_size,
        layers=layers,
        target_bits=target,
        candidate_bits=tuple(d.get("candidate_bits") or ()),
        model_name=m.get("name"),
        extra={k: v for k, v in d.items() if k not in reserved},
        rotation=rotation,
    )


def _rotation(d: dict, version: int, source: str) -> str:
    """The config's rotation; version-1 files predate it and were measured without one."""
    if version == 1:
        return "none"
    rotation = _need(d, "rotation", str, source)
    if rotation not in quant.ROTATIONS:
        raise ConfigError(
            f"{source}: unknown rotation {rotation!r} (supported: {', '.join(quant.ROTATIONS)})"
        )
    return rotation


def check_matches_model(config: KVConfig, layout: KVLayout, source: str = "kv_config") -> None:
    """Raise a :class:`ConfigError` unless ``config`` was made for a model shaped like ``layout``."""
    made_for = config.model
    name = f" ({config.model_name})" if config.model_name else ""
    wrong = (
        f"{source} was made for a different model{name}: {made_for.describe()}; "
        f"this model is {layout.describe()}. Run `optiq kv-cache` on this model"
    )
    if made_for.model_type != layout.model_type or made_for.num_layers != layout.num_layers:
        raise ConfigError(wrong)
    actual = {k.index: k for k in layout.kv_layers}
    skipped = {s.index: s for s in layout.skipped}
    for idx in config.layers:
        if idx >= layout.num_layers:
            raise ConfigError(f"{source}: layer {idx} does not exist (the model has {layout.num_layers} layers)")
        if idx not in actual:
            s = skipped.get(idx)
            detail = f" ({s.cache}: {s.reason})" if s else ""
            raise ConfigError(f"{source}: layer {idx} has no KV cache in this model{detail}")
    if made_for.kv_layers != layout.kv_layers or made_for.vocab_size != layout.vocab_size:
        raise ConfigError(wrong)


def load_kv_config(path: str | Path, model: Any = None) -> KVConfig:
    """Read and validate ``kv_config.json``; with ``model`` (an nn.Module or a
    :class:`KVLayout`), also check that it was made for that model."""
    path = Path(path)
    if path.is_dir():
        path = path / "kv_config.json"
    if not path.exists():
        raise ConfigError(f"KV config {path} does not exist (create one with `optiq kv-cache MODEL -o DIR`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    config = kv_config_from_dict(data, source=str(path))
    if model is not None:
        from .layers import kv_layout

        layout = model if isinstance(model, KVLayout) else kv_layout(model)
        check_matches_model(config, layout, source=str(path))
    return config
