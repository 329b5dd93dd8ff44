"""Which modules get LoRA adapters: matched by name inside the last N decoder blocks.

A target name matches a module whose path inside its block equals the name or ends with
``.<name>`` (``q_proj`` matches ``self_attn.q_proj``), the rule PEFT uses. Hybrid models
make defaults subtle: Gated DeltaNet blocks have no ``q_proj``/``v_proj``, so the default
targets adapt only the full-attention blocks. :func:`find_targets` says so in its notes
and lists the names a user can target instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import mlx.nn as nn

from optiq.core.architecture import decoder_layers, layer_kind
from optiq.core.errors import ConfigError

DEFAULT_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = "all-linear"
# MoE routers are Linear layers too, but adapting them is rarely wanted: all-linear skips them.
ROUTER_SUFFIXES = ("mlp.gate", "shared_expert_gate")


def _switch_types() -> tuple[type, ...]:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (SwitchLinear, QuantizedSwitchLinear)


def _lora_types() -> tuple[type, ...]:
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    return (LoRALinear, LoRASwitchLinear)


@dataclass(frozen=True)
class Target:
    """One module that gets an adapter, with what its rank depends on."""

    path: str  # full module path in the MLX model
    layer: int  # decoder block index
    name: str  # path inside the block, e.g. "self_attn.q_proj"
    layer_kind: str  # full_attention | linear_attention | ssm | other
    input_dims: int
    output_dims: int
    num_experts: int  # 0 for a plain linear, >0 for an MoE expert pool
    bits: int | None  # quantization bits of the base weight; None for a float weight
    group_size: int | None

    @property
    def max_rank(self) -> int:
        return min(self.input_dims, self.output_dims)

    def lora_params(self, rank: int) -> int:
        """Trainable parameters of a rank-``rank`` adapter on this module."""
        return rank * (self.input_dims + self.output_dims) * max(self.num_experts, 1)


@dataclass
class TargetSelection:
    targets: list[Target]
    adapted_layers: list[int]
    notes: list[str] = field(default_factory=list)


def module_dims(module: nn.Module) -> tuple[int, int, int]:
    """(input_dims, output_dims, num_experts) of a linear or expert pool, quantized or not."""
    if isinstance(module, _switch_types()):
        return module.input_dims, module.output_dims, module.num_experts
    out_dims, in_dims = module.weight.shape
    if isinstance(module, nn.QuantizedLinear):
        in_dims = in_dims * 32 // module.bits
    return in_dims, out_dims, 0


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear) + _switch_types())


def name_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def parse_targets(spec: str | Sequence[str] | None) -> list[str]:
    """``"q_proj, v_proj"`` or a list → clean names; None → the defaults."""
    if spec is None:
        return list(DEFAULT_TARGETS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [s.strip() for s in items if s and s.strip()]
    if not names:
        raise ConfigError("--target-modules is empty: give module names such as q_proj,v_proj")
    return names


def _block_paths(model: nn.Module, blocks: list[nn.Module]) -> list[str]:
    by_id = {id(m): p for p, m in model.named_modules()}
    missing = [i for i, b in enumerate(blocks) if id(b) not in by_id]
    if missing:
        raise ConfigError(f"decoder block {missing[0]} is not reachable from the model's modules")
    return [by_id[id(b)] for b in blocks]


def _adaptable(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_modules() if n and is_adaptable(m)][::-1]


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    num_layers: int = 16,
    train_experts: bool = False,
) -> TargetSelection:
    """Modules to adapt in the last ``num_layers`` blocks (-1: all) whose names match."""
    names = parse_targets(target_modules)
    blocks = decoder_layers(model)
    n_blocks = len(blocks)
    if num_layers == 0 or num_layers < -1:
        raise ConfigError(f"--num-layers must be -1 (all) or a positive number, got {num_layers}")
    notes: list[str] = []
    if num_layers == -1 or num_layers >= n_blocks:
        if num_layers > n_blocks:
            notes.append(f"the model has {n_blocks} decoder blocks: adapting all of them")
        first = 0
    else:
        first = n_blocks - num_layers
    paths = _block_paths(model, blocks)
    lora_types = _lora_types()
    switch = _switch_types()

    all_linear = ALL_LINEAR in names
    explicit = [n for n in names if n != ALL_LINEAR]
    hits = {n: 0 for n in explicit}
    skipped_experts: dict[str, int] = {}
    targets: list[Target] = []
    unmatched_blocks: dict[str, list[int]] = {}
    for i in range(first, n_blocks):
        block = blocks[i]
        kind = layer_kind(block)
        if any(isinstance(m, lora_types) for _, m in block.named_modules()):
            raise ConfigError(f"decoder block {i} already has LoRA layers: load the base model fresh")
        matched_here = 0
        for name, module in _adaptable(block):
            wanted = [t for t in explicit if name_matches(name, t)]
            if all_linear and not name.endswith(ROUTER_SUFFIXES):
                wanted = wanted or [ALL_LINEAR]
            if not wanted:
                continue
            for t in wanted:
                if t in hits:
                    hits[t] += 1
            if isinstance(module, switch) and not train_experts:
                skipped_experts[name] = skipped_experts.get(name, 0) + 1
                continue
            in_dims, out_dims, n_exp = module_dims(module)
            quantized = hasattr(module, "bits") and "scales" in module
            targets.append(
                Target(
                    path=f"{paths[i]}.{name}",
                    layer=i,
                    name=name,
                    layer_kind=kind,
                    input_dims=in_dims,
                    output_dims=out_dims,
                    num_experts=n_exp,
                    bits=module.bits if quantized else None,
                    group_size=module.group_size if quantized else None,
                )
            )
            matched_here += 1
        if not matched_here:
            unmatched_blocks.setdefault(kind, []).append(i)

    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for b in blocks[first:] for n, _ in _adaptable(b)})
        raise ConfigError(
            f"--target-modules {','.join(missing)} matched no module in the adapted blocks "
            f"{first}..{n_blocks - 1}; module names there: {', '.join(available)} "
            f"(or {ALL_LINEAR})"
        )
    if skipped_experts:
        pools = ", ".join(f"{n} ×{c}" for n, c in sorted(skipped_experts.items()))
        notes.append(
            f"MoE expert pools matched but are not adapted without --train-experts: {pools}"
        )
    if not targets:
        raise ConfigError(
            "no module to adapt: the targets matched only MoE expert pools; pass --train-experts"
        )
    for kind, idx in sorted(unmatched_blocks.items()):
        block_names = sorted({n.rsplit(".", 1)[-1] for n, _ in _adaptable(blocks[idx[0]])})
        label = {
            "linear_attention": "linear-attention (Gated DeltaNet) blocks",
            "full_attention": "full-attention blocks",
        }.get(kind, f"{kind} blocks")
        notes.append(
            f"{len(idx)} {label} ({', '.join(map(str, idx))}) have no module named "
            f"{','.join(explicit) or ALL_LINEAR} and get no adapter; their projections are "
            f"{', '.join(block_names)}: add them to --target-modules to adapt these blocks"
        )
    adapted = sorted({t.layer for t in targets})
    return TargetSelection(targets=targets, adapted_layers=adapted, notes=notes)
