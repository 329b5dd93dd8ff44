"""What a loaded model is, as plain data (computed once, on the generation thread)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Used when config.json names no context limit.
DEFAULT_CONTEXT_LENGTH = 4096


@dataclass
class ModelSummary:
    model_id: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    num_parameters: int
    quantized: bool = False
    bits_per_weight: float = 0.0
    default_bits: int = 0
    default_group_size: int = 0
    layers_by_bits: dict[int, int] = field(default_factory=dict)
    quant_summary: str = "not quantized"
    kv_summary: str = "default (model dtype)"
    kv_layers: list[tuple[int, int, int, int]] = field(default_factory=list)  # layer, k, v, group
    kv_bits: float = 0.0
    eos_token_ids: list[int] = field(default_factory=list)
    has_chat_template: bool = False
    think_tags: tuple[str | None, str | None] = (None, None)
    # Tool calling (from mlx-lm's tokenizer, inferred from the chat template): the tags
    # around a call and the mlx_lm.tool_parsers module that parses it; None if unknown.
    tool_tags: tuple[str, str] | None = None
    tool_call_format: str = ""


def summarize(loaded: Any) -> ModelSummary:
    """Describe ``loaded`` (an ``optiq.core.model_io.LoadedModel``)."""
    from optiq.core.architecture import decoder_layers, parameter_count, quantized_modules
    from optiq.core.model_io import model_name, text_config

    cfg = text_config(loaded.config)
    model, tok = loaded.model, loaded.tokenizer
    qmods = quantized_modules(model)
    quant = loaded.config.get("quantization") or {}
    s = ModelSummary(
        model_id=model_name(loaded.path),
        architecture=str(loaded.config.get("model_type", "")),
        num_layers=len(decoder_layers(model)),
        hidden_size=int(cfg.get("hidden_size") or 0),
        vocab_size=int(cfg.get("vocab_size") or len(tok.vocab)),
        context_length=int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT_LENGTH),
        num_parameters=int(parameter_count(model)),
        eos_token_ids=sorted(int(t) for t in tok.eos_token_ids),
        has_chat_template=bool(getattr(tok, "chat_template", None)),
        think_tags=(tok.think_start, tok.think_end) if tok.has_thinking else (None, None),
    )
    if getattr(tok, "has_tool_calling", False) and s.has_chat_template:
        s.tool_tags = (tok.tool_call_start, tok.tool_call_end)
        s.tool_call_format = tok.tool_parser.__module__.rsplit(".", 1)[-1]
    if qmods:
        # Scales/biases count at 16 bits, as stored on disk (the CPU path may hold
        # them in fp32 in memory).
        stored = logical = 0.0
        for _, m in qmods:
            n = m["weight"].size * 32 // m.bits
            extra = 16 * sum(k in m for k in ("scales", "biases")) / m.group_size
            stored += n * (m.bits + extra)
            logical += n
        hist = Counter(int(m.bits) for _, m in qmods)
        s.quantized = True
        s.bits_per_weight = stored / max(logical, 1)
        s.default_bits = int(quant.get("bits") or 0)
        s.default_group_size = int(quant.get("group_size") or 0)
        s.layers_by_bits = dict(sorted(hist.items()))
        widths = "/".join(str(b) for b in s.layers_by_bits)
        kind = "mixed" if len(hist) > 1 else "uniform"
        s.quant_summary = f"{kind} {widths}-bit, {s.bits_per_weight:.2f} bits per weight"
    return s
