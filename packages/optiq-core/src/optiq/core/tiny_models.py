"""Tiny Qwen3.5-architecture models: the shape of the bundled ``optiq-tiny`` model and a
random-weight ``qwen3_5_moe`` sibling for tests.

The bundled model (``assets/optiq-tiny``) is built and trained by
``tools/train_bundled_model.py``; its shape lives here so that the training tool and
:func:`make_tiny_moe` agree on it. Every Linear's input dimension is a multiple of 64
(the default quantization group size) and the attention head_dim is 64 (so a KV-cache
group size of 64 works).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .model_io import bundled_model_path

# The language-model shape of optiq-tiny (flat HF-style config, model_type qwen3_5).
# Layer i is full attention iff (i + 1) % full_attention_interval == 0: layers 3 and 7.
TINY_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_5",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 8,
    "full_attention_interval": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 32,
    "linear_num_value_heads": 4,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "vocab_size": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "max_position_embeddings": 32768,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
    },
    "hidden_act": "silu",
    "initializer_range": 0.02,
}

# Mixture-of-experts variant (same family): every layer's MLP is a sparse MoE block.
TINY_MOE_OVERRIDES: dict[str, Any] = {
    "model_type": "qwen3_5_moe",
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "shared_expert_intermediate_size": 128,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
}

# Files a model directory needs besides config.json and the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def layer_types(config: dict[str, Any]) -> list[str]:
    """HF-style ``layer_types`` for a qwen3_5 config (mlx-lm derives the same pattern)."""
    n, k = config["num_hidden_layers"], config["full_attention_interval"]
    return [
        "full_attention" if (i + 1) % k == 0 else "linear_attention" for i in range(n)
    ]


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A full config.json dict for the tiny shape (HF-style fields included)."""
    cfg = json.loads(json.dumps(TINY_TEXT_CONFIG))  # deep copy
    cfg.update(overrides)
    cfg["layer_types"] = layer_types(cfg)
    cfg.setdefault("torch_dtype", "bfloat16")
    cfg.setdefault("dtype", "bfloat16")
    return cfg


def build_model(config: dict[str, Any], seed: int = 0) -> nn.Module:
    """Instantiate an mlx-lm model from a config dict with seeded random weights (fp32)."""
    from .mlx_lm_seam import model_classes

    config = json.loads(json.dumps(config))  # model args mutate nested dicts (rope_parameters)
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    return model


def _keep_fp32(path: str) -> bool:
    # Like mlx-lm's qwen3_5 cast_predicate (and HF checkpoints): A_log stays fp32.
    return path.endswith("A_log")


def save_model_dir(
    model: nn.Module, config: dict[str, Any], out_dir: Path, dtype: mx.Dtype = mx.bfloat16
) -> Path:
    """Write weights (cast to ``dtype``, A_log kept fp32) and config.json to ``out_dir``."""
    from mlx_lm.utils import save_config, save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = tree_map_with_path(
        lambda p, v: v if _keep_fp32(p) else v.astype(dtype), model.parameters()
    )
    model.update(params)
    mx.eval(model.parameters())
    save_model(out_dir, model)
    save_config(dict(config), config_path=out_dir / "config.json")
    return out_dir


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in ``src_dir``."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.exists():
            shutil.copyfile(src, Path(out_dir) / name)
            copied.append(name)
    return copied


def parameter_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def make_tiny_moe(
    out_dir: Path,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    dtype: mx.Dtype = mx.bfloat16,
) -> Path:
    """Write a tiny random-weight ``qwen3_5_moe`` model to ``out_dir`` and return it.

    Same shape family and tokenizer as the bundled ``optiq-tiny`` model, but every MLP
    is a sparse MoE block: 4 experts, top-2 routing, plus a gated shared expert. The
    weights are random (seeded) and saved as ``dtype`` (bfloat16 by default, like real
    checkpoints and the bundled model; A_log stays fp32), so stock ``mlx_lm.load(out_dir)``
    loads it. Tokenizer files are copied from ``tokenizer_dir`` (default: the bundled
    model).

    Note: MLX's CPU ``gather_mm`` (used by the expert layers) only supports float32, so
    on the CPU cast the loaded model to fp32 (``model.set_dtype(mx.float32)``) or pass
    ``dtype=mx.float32`` before running it.
    """
    out_dir = Path(out_dir)
    src = Path(tokenizer_dir) if tokenizer_dir is not None else bundled_model_path()
    if not (src / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{src} has no tokenizer.json (build the bundled model with "
            "tools/train_bundled_model.py first)"
        )
    config = tiny_config(**TINY_MOE_OVERRIDES)
    gen = src / "generation_config.json"
    if gen.exists():
        config["eos_token_id"] = json.loads(gen.read_text()).get("eos_token_id")
    if dtype != mx.bfloat16:
        config["torch_dtype"] = config["dtype"] = str(dtype).split(".")[-1]
    model = build_model(config, seed=seed)
    save_model_dir(model, config, out_dir, dtype=dtype)
    copy_tokenizer_files(src, out_dir)
    return out_dir


def make_random_llama(out_dir: Path, hidden: int, num_layers: int = 4, seed: int = 0) -> Path:
    """Write a random-weight Llama (``hidden`` wide, bf16, the bundled tokenizer) to ``out_dir``.

    For benchmarks whose cost is dominated by the weight matrices (the bundled model is
    only 128 wide): head_dim 64, GQA 4:1, MLP 3x hidden, vocabulary 2048.
    """
    out_dir = Path(out_dir)
    config = {
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": 3 * hidden,
        "num_hidden_layers": num_layers, "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 256), "vocab_size": 2048, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
    }
    save_model_dir(build_model(config, seed=seed), config, out_dir, dtype=mx.bfloat16)
    copy_tokenizer_files(bundled_model_path(), out_dir)
    return out_dir
