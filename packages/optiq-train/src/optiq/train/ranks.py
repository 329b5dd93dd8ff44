"""Per-module LoRA ranks: constant, following quantization bits, or following sensitivity.

``by_bits`` gives low-bit layers more adapter capacity, since their weights carry more
quantization error for the adapter to absorb::

    rank(bits) = clamp(floor(R * reference_bits / bits + 0.5), 1, min(in_dims, out_dims))

with ``R = --rank`` and ``reference_bits = 4``: with R = 8 a 2-bit layer gets 16, 3-bit 11,
4-bit 8, 5-bit 6, 6-bit 5, 8-bit 4, and a float (unquantized, counted as 16-bit) layer 2.
When no adapted module is quantized at all the rule would shrink every rank, so it falls
back to constant rank R (and says so).

``by_sensitivity`` uses the sensitivities ``optiq convert`` measured (``optiq_metadata.json``:
per module, the KL divergence its quantization causes at each candidate bit width). ``s``
is the value at the bits the module actually got – the damage its quantization leaves
for the adapter to repair. KL grows with the square of an output error, so ranks follow
its square root::

    rank = clamp(floor(R * sqrt(s) / mean(sqrt(s)) + 0.5), 1, min(in_dims, out_dims, 4 * R))

over the adapted modules, so the mean rank stays near R (before clamping). A float
module has ``s = 0`` (nothing to repair) and gets rank 1.

Bits come from ``optiq_metadata.json`` (written by ``optiq convert``) when the model dir
has one, else from the ``quantization`` entries of ``config.json`` (per-module dicts keyed
by module path, then the global default); both are checked against the loaded weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from optiq.core.errors import ConfigError

from .targets import Target

RANK_SCALINGS = ("constant", "by_bits", "by_sensitivity")
REFERENCE_BITS = 4
FLOAT_BITS = 16
METADATA_FILE = "optiq_metadata.json"


@dataclass(frozen=True)
class ModuleQuant:
    bits: int  # FLOAT_BITS for an unquantized module
    sensitivity: dict[int, float] | None = None  # bits -> measured KL (or one value: {bits: s})

    def sensitivity_at(self, bits: int) -> float | None:
        """The sensitivity at ``bits`` (the module's own bits), if measured."""
        if bits >= FLOAT_BITS:
            return 0.0
        if not self.sensitivity:
            return None
        return self.sensitivity.get(bits)


@dataclass(frozen=True)
class QuantInfo:
    """Per-module quantization facts of a model dir and where they were read from."""

    modules: dict[str, ModuleQuant]
    source: str
    default_bits: int | None = None  # global default of config.json, if any
    has_sensitivity: bool = False


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def rank_for_bits(base_rank: int, bits: int, reference_bits: int = REFERENCE_BITS) -> int:
    """The documented by_bits rule before clamping to the module's shape."""
    return max(1, _round(base_rank * reference_bits / bits))


# ---------------------------------------------------------------------------- reading bits


def _metadata_entries(meta: Any) -> dict[str, dict[str, Any]]:
    """Module path -> entry, from the layouts optiq convert may write.

    optiq convert writes ``{"layers": {path: {"bits", "sensitivity": {bits: kl}, ...}}}``
    (docs/convert.md); ``"modules"`` and lists of entries with a ``path`` are read too.
    """
    if not isinstance(meta, dict):
        return {}
    for key in ("layers", "modules", "per_layer"):
        section = meta.get(key)
        if isinstance(section, dict):
            return {k: v for k, v in section.items() if isinstance(v, dict)}
        if isinstance(section, list):
            out = {}
            for e in section:
                if isinstance(e, dict):
                    name = e.get("path") or e.get("name") or e.get("module")
                    if isinstance(name, str):
                        out[name] = e
            if out:
                return out
    return {}


def _sensitivity(entry: dict[str, Any], bits: int) -> dict[int, float] | None:
    """bits -> sensitivity of one metadata entry: ``{"4": kl4, "8": kl8}`` as optiq convert
    writes it, or one number (taken as measured at the entry's own bits)."""
    for key in ("sensitivity", "kl"):
        v = entry.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return {bits: float(v)}
        if isinstance(v, dict):
            out = {int(float(k)): float(x) for k, x in v.items()
                   if _is_number(k) and isinstance(x, (int, float))}
            return out or None
    return None


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_metadata(model_dir: Path) -> QuantInfo | None:
    file = Path(model_dir) / METADATA_FILE
    if not file.exists():
        return None
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    modules = {}
    for path, entry in _metadata_entries(meta).items():
        bits = entry.get("bits")
        if bits is None and entry.get("quantized") is False:
            bits = FLOAT_BITS
        if not isinstance(bits, (int, float)):
            continue
        modules[path] = ModuleQuant(bits=int(bits), sensitivity=_sensitivity(entry, int(bits)))
    if not modules:
        return None
    return QuantInfo(
        modules=modules,
        source=METADATA_FILE,
        has_sensitivity=any(m.sensitivity is not None for m in modules.values()),
    )


def read_config_quantization(config: dict[str, Any]) -> QuantInfo | None:
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    modules = {}
    for k, v in q.items():
        if isinstance(v, dict) and "bits" in v:
            modules[k] = ModuleQuant(bits=int(v["bits"]))
        elif v is False:
            modules[k] = ModuleQuant(bits=FLOAT_BITS)
    default = q.get("bits")
    return QuantInfo(
        modules=modules,
        source="config.json quantization",
        default_bits=int(default) if isinstance(default, (int, float)) else None,
    )


def read_quant_info(model_dir: Path | None, config: dict[str, Any] | None) -> QuantInfo | None:
    """optiq_metadata.json first, then config.json ``quantization``; None if neither."""
    info = read_metadata(Path(model_dir)) if model_dir is not None else None
    if info is None and config is not None:
        info = read_config_quantization(config)
    return info


def _lookup(info: QuantInfo, path: str) -> ModuleQuant | None:
    if path in info.modules:
        return info.modules[path]
    # metadata may name modules without the wrapper prefix (e.g. "model.layers.0...")
    for key, value in info.modules.items():
        if path.endswith("." + key) or key.endswith("." + path):
            return value
    return None


def resolve_bits(targets: Iterable[Target], info: QuantInfo | None) -> dict[str, int]:
    """Bits of each target, read from ``info`` and checked against the loaded weights."""
    out = {}
    for t in targets:
        actual = t.bits if t.bits is not None else FLOAT_BITS
        entry = _lookup(info, t.path) if info else None
        if entry is not None:
            bits = entry.bits
        elif info is not None and t.bits is not None and info.default_bits is not None:
            bits = info.default_bits
        else:
            bits = actual
        if bits != actual:
            src = info.source if info else "the model"
            raise ConfigError(
                f"{src} says {t.path} has {bits}-bit weights but the loaded weights are "
                f"{'float' if t.bits is None else f'{actual}-bit'}: the file is stale or "
                "belongs to another model"
            )
        out[t.path] = bits
    return out


# ---------------------------------------------------------------------------- assigning ranks


@dataclass(frozen=True)
class RankPlan:
    """Rank and scale per target, with what they were derived from."""

    targets: list[Target]
    ranks: dict[str, int]
    scales: dict[str, float]
    bits: dict[str, int]
    sensitivity: dict[str, float]
    scaling: str  # the rule actually applied
    requested: str  # the rule asked for
    base_rank: int
    bits_source: str
    notes: tuple[str, ...] = ()

    @property
    def trainable_parameters(self) -> int:
        return sum(t.lora_params(self.ranks[t.path]) for t in self.targets)


def plan_ranks(
    targets: list[Target],
    *,
    rank: int = 8,
    scaling: str = "constant",
    scale: float | None = None,
    alpha: float | None = None,
    quant: QuantInfo | None = None,
    reference_bits: int = REFERENCE_BITS,
) -> RankPlan:
    """Per-target ranks by ``scaling``; scale is ``scale`` for all, or ``alpha / rank``."""
    if scaling not in RANK_SCALINGS:
        raise ConfigError(f"--rank-scaling must be one of {', '.join(RANK_SCALINGS)}, got {scaling!r}")
    if rank < 1:
        raise ConfigError(f"--rank must be at least 1, got {rank}")
    if scale is not None and alpha is not None:
        raise ConfigError("give either --scale or --alpha, not both")
    if reference_bits < 1:
        raise ConfigError(f"reference bits must be positive, got {reference_bits}")
    bits = resolve_bits(targets, quant)
    notes: list[str] = []
    applied = scaling
    sens: dict[str, float] = {}
    if scaling == "by_bits" and all(t.bits is None for t in targets):
        applied = "constant"
        notes.append(
            "by_bits: no adapted module is quantized, so every module gets the constant rank "
            f"{rank} (quantize the model with optiq convert to vary ranks by bits)"
        )
    if scaling == "by_sensitivity":
        if quant is None or not quant.has_sensitivity:
            raise ConfigError(
                "--rank-scaling by_sensitivity needs the layer sensitivities that optiq convert "
                f"writes to {METADATA_FILE}; this model has none (use by_bits or constant)"
            )
        for t in targets:
            entry = _lookup(quant, t.path)
            value = entry.sensitivity_at(bits[t.path]) if entry else (0.0 if t.bits is None else None)
            if value is None:
                raise ConfigError(
                    f"{METADATA_FILE} has no sensitivity for {t.path} at its {bits[t.path]} bits"
                )
            sens[t.path] = max(value, 0.0)
        roots = {p: math.sqrt(v) for p, v in sens.items()}
        mean = sum(roots.values()) / len(roots)
        if mean <= 0:
            applied = "constant"
            notes.append("by_sensitivity: all sensitivities are zero, using constant rank")

    ranks: dict[str, int] = {}
    clamped: dict[str, set[int]] = {}
    for t in targets:
        if applied == "by_bits":
            r = rank_for_bits(rank, bits[t.path], reference_bits)
        elif applied == "by_sensitivity":
            r = max(1, _round(rank * roots[t.path] / mean))
            if r > 4 * rank:
                clamped.setdefault(t.name, set()).add(4 * rank)
                r = 4 * rank
        else:
            r = rank
        if r > t.max_rank:
            clamped.setdefault(t.name, set()).add(t.max_rank)
            r = t.max_rank
        ranks[t.path] = r
    if clamped:
        what = ", ".join(f"{n} to {'/'.join(map(str, sorted(v)))}" for n, v in sorted(clamped.items()))
        notes.append(f"ranks above a module's smaller dimension (or 4x --rank) were clamped: {what}")
    if alpha is not None:
        scales = {p: float(alpha) / r for p, r in ranks.items()}
    else:
        s = 20.0 if scale is None else float(scale)
        scales = {p: s for p in ranks}
    return RankPlan(
        targets=list(targets),
        ranks=ranks,
        scales=scales,
        bits=bits,
        sensitivity=sens,
        scaling=applied,
        requested=scaling,
        base_rank=rank,
        bits_source=quant.source if quant else "loaded weights (no quantization config)",
        notes=tuple(notes),
    )
