"""Builds what the engine runs (model, tokenizer, caches, adapters) on the engine thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import ServeConfig
from .engine import LoadedEngineModel
from .modelinfo import ModelSummary, summarize


def describe_kv(summary: ModelSummary, kv: Any) -> None:
    """Fill the KV fields of ``summary`` from an ``optiq.core.kv.KVConfig``."""
    summary.kv_layers = [(i, kb, vb, kv.group_size) for i, (kb, vb) in sorted(kv.layers.items())]
    summary.kv_bits = float(kv.achieved_bits)
    widths = sorted({b for _, kb, vb, _ in summary.kv_layers for b in (kb, vb)})
    span = f"{widths[0]}-{widths[-1]}" if len(widths) > 1 else f"{widths[0]}"
    summary.kv_summary = (
        f"mixed K/V {span} bit, {kv.achieved_bits:.2f} bits per element "
        f"({kv.fp16_ratio:.0%} of fp16 bytes)"
    )


def make_loader(config: ServeConfig, model_dir: Path) -> Callable[[], LoadedEngineModel]:
    """The engine-thread loader for ``config``: model (CPU fast path), then the
    mixed-precision KV config, then the registered LoRA adapters."""

    def load() -> LoadedEngineModel:
        import optiq.core  # noqa: F401  (OpenBLAS before MLX)
        from mlx_lm.models.cache import make_prompt_cache

        from optiq.core.model_io import load_model

        loaded = load_model(model_dir)
        model = loaded.model
        summary = summarize(loaded)
        if config.max_context is not None:
            summary.context_length = min(summary.context_length, config.max_context)
        if config.kv_config is not None:
            from optiq.core.kv import apply_kv_config, load_kv_config

            kv = load_kv_config(config.kv_config, model)
            apply_kv_config(model, kv)  # every cache built for the model is now mixed
            describe_kv(summary, kv)
        if not config.adapters:
            return LoadedEngineModel(model, loaded.tokenizer, summary)

        from .adapters import install_adapters, tag_cache

        runner, served = install_adapters(model, config.adapters)

        def make_cache(adapter: str | None) -> list:
            return tag_cache(make_prompt_cache(model), adapter, served)

        return LoadedEngineModel(runner, loaded.tokenizer, summary, make_cache, served)

    return load
