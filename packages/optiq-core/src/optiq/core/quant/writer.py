"""Write a quantized model directory that stock ``mlx_lm.load`` loads, atomically.

Quantized leaves become MLX's own ``QuantizedLinear`` / ``QuantizedEmbedding`` /
``QuantizedSwitchLinear`` holding our codes, scales and biases; every quantized leaf gets
an explicit entry in ``config.json``'s ``quantization`` map. The directory is assembled
under a hidden temporary name next to the destination and renamed into place only when
complete, so an interrupted convert never leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path, tree_unflatten

from ..errors import ConfigError
from .formats import pack
from .rounding import Quantized
from .targets import get_module

# Files copied from the source directory (tokenizer, chat template, generation config...).
COPY_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py")
NEVER_COPY = {"config.json", "model.safetensors.index.json", "optiq_metadata.json"}


def quantized_module(module: nn.Module, q: Quantized, dtype: mx.Dtype) -> nn.Module:
    """MLX's quantized counterpart of ``module`` holding exactly our codes/scales/biases."""
    qm = module.to_quantized(group_size=q.group_size, bits=q.bits, mode="affine")
    qm["weight"] = mx.array(pack(q.codes, q.bits))
    qm["scales"] = mx.array(q.scales).astype(dtype)
    qm["biases"] = mx.array(q.biases).astype(dtype)
    if "bias" in module:
        qm["bias"] = module["bias"]
    return qm


def apply_quantization(model: nn.Module, quantized: dict[str, Quantized], dtype: mx.Dtype) -> None:
    """Replace each leaf in ``quantized`` by its quantized module, in place."""
    new = [(path, quantized_module(get_module(model, path), q, dtype)) for path, q in quantized.items()]
    model.update_modules(tree_unflatten(new))


def restore_dtypes(model: nn.Module, dtypes: dict[str, mx.Dtype]) -> None:
    """Cast float parameters back to the dtype they had in the source checkpoint."""

    def cast(path, p):
        if path.endswith((".scales", ".biases")) or not mx.issubdtype(p.dtype, mx.floating):
            return p
        d = dtypes.get(path)
        return p.astype(d) if d is not None and d != p.dtype else p

    model.update(tree_map_with_path(cast, model.parameters()))


def quantization_config(per_leaf: dict[str, tuple[int, int]], default_group: int) -> dict[str, Any]:
    """``config['quantization']``: a global default plus one entry per quantized leaf."""
    common = Counter(b for b, _ in per_leaf.values()).most_common(1)
    cfg: dict[str, Any] = {
        "group_size": default_group,
        "bits": common[0][0] if common else 4,
        "mode": "affine",
    }
    for path, (bits, g) in per_leaf.items():
        cfg[path] = {"group_size": g, "bits": bits, "mode": "affine"}
    return cfg


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConfigError(f"output directory {out} already exists: choose another -o or pass --force")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write to {parent}")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block completes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.optiq-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not force:
                raise ConfigError(f"output directory {out} appeared while converting: not overwriting")
            old = out.parent / f".{out.name}.optiq-old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_model_dir(
    dest: Path,
    model: nn.Module,
    config: dict[str, Any],
    source: Path,
    metadata: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Weights, config, tokenizer files and ``optiq_metadata.json`` into ``dest``."""
    from mlx_lm.utils import save_model

    save_model(dest, model)
    write_side_files(dest, config, source, metadata, extra_files)


def write_side_files(
    dest: Path,
    config: dict[str, Any],
    source: Path,
    metadata: dict[str, Any] | None,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Everything but the weights: config, tokenizer files, metadata, extra files."""
    from mlx_lm.utils import save_config

    save_config(dict(config), dest / "config.json")
    for pattern in COPY_PATTERNS:
        for f in glob.glob(str(source / pattern)):
            name = os.path.basename(f)
            if name in NEVER_COPY or not os.path.isfile(f):
                continue
            shutil.copy2(f, dest / name)
    if metadata is not None:
        (dest / "optiq_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    for name, data in (extra_files or {}).items():
        (dest / name).write_bytes(data)


def param_dtypes(model: nn.Module) -> dict[str, mx.Dtype]:
    return {k: v.dtype for k, v in tree_flatten(model.parameters())}
