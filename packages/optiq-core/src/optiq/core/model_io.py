"""Find, validate and load models from local HF-style directories.

A model is named by a local directory, ``bundled`` / ``bundled-quant``, or a Hugging
Face id ``org/name`` already in the local Hugging Face cache (never downloaded: see
:func:`resolve_hf_id`). Stock ``mlx_lm.load`` fails late and unclearly on bad
directories (and "succeeds" with an empty tokenizer when ``tokenizer.json`` is
missing), so everything is checked here first and reported as a
:class:`ModelLoadError` a user can act on.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MODEL_NAME = "optiq-tiny"
BUNDLED_QUANT_NAME = "optiq-tiny-optiq"


def bundled_model_path() -> Path:
    """The tiny trained Qwen3.5-style model shipped inside optiq-core."""
    return ASSETS / BUNDLED_MODEL_NAME


def bundled_quant_path() -> Path:
    """The bundled model's OptiQ quant (``optiq convert`` output, made by
    ``tools/build_bundled_quant.py``), shipped beside it so QLoRA works out of the box."""
    return ASSETS / BUNDLED_QUANT_NAME


def has_bundled_quant() -> bool:
    """Whether the bundled quant is installed (a source checkout may not have built it)."""
    return (bundled_quant_path() / "config.json").is_file()


# a Hugging Face repo id: "org/name" (no leading ".", "/" or "~", so never a path form)
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_HF_SNAPSHOT = re.compile(r"models--(.+?)--(.+)")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it: ``$HF_HUB_CACHE``,
    else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def is_hf_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face model id (``org/name``)."""
    return _HF_ID.fullmatch(name) is not None


def resolve_hf_id(model_id: str) -> Path:
    """The snapshot directory of ``model_id`` in the local cache, at the revision its
    ``refs/main`` names. Reads the cache layout only: no network, nothing downloaded
    (a model that is not there is an error, as with ``HF_HUB_OFFLINE=1``)."""
    cache = hf_hub_cache()
    repo = cache / ("models--" + model_id.replace("/", "--"))
    where = (f"model {model_id!r} is not a local directory, and as a Hugging Face id it is not "
             f"in the local cache {cache} (HF_HUB_CACHE, else HF_HOME/hub)")
    fix = (f"download it first (e.g. `huggingface-cli download {model_id}`), point HF_HUB_CACHE "
           "at the cache that has it, or give a local directory")
    if not repo.is_dir():
        raise ModelLoadError(f"{where}: no {repo}; {fix}")
    ref = repo / "refs" / "main"
    snapshots = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    if not ref.is_file():
        have = f"snapshots there: {', '.join(snapshots)}" if snapshots else "no snapshots there"
        raise ModelLoadError(
            f"{where}: {repo} has no refs/main to name the revision ({have}); {fix}, "
            "or give a snapshot directory as a path"
        )
    revision = ref.read_text().strip()
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        raise ModelLoadError(f"{where}: {ref} names revision {revision!r} but {snapshot} is missing; {fix}")
    return snapshot


def model_name(path: Path) -> str:
    """A short name for a model directory: ``org/name`` for a Hugging Face cache
    snapshot, else the directory's name."""
    path = Path(path)
    if path.parent.name == "snapshots":
        m = _HF_SNAPSHOT.fullmatch(path.parent.parent.name)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return path.name


def resolve_model_path(model: str | Path | None) -> Path:
    """``None`` or ``"bundled"`` means the bundled model, ``"bundled-quant"`` its OptiQ
    quant, ``org/name`` a Hugging Face id in the local cache; a local directory that
    exists always wins (over a bundled name or an id it shares)."""
    if model is None or str(model) == "":
        return bundled_model_path()
    name = str(model)
    if Path(name).expanduser().exists():
        return Path(name).expanduser()
    if name in ("bundled", BUNDLED_MODEL_NAME):
        return bundled_model_path()
    if name in ("bundled-quant", BUNDLED_QUANT_NAME):
        if not has_bundled_quant():
            raise ModelLoadError(
                f"the bundled quant is not installed at {bundled_quant_path()}: build it with "
                "`uv run python tools/build_bundled_quant.py`, or use 'bundled' (the float model)"
            )
        return bundled_quant_path()
    if isinstance(model, str) and is_hf_id(name):
        return resolve_hf_id(name)
    return Path(model).expanduser()


def read_config(path: Path) -> dict[str, Any]:
    """Read ``config.json`` of a model directory, with clear errors."""
    cfg_file = path / "config.json"
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory (expected an HF-style model directory)")
    if not cfg_file.exists():
        raise ModelLoadError(f"{path} has no config.json: not an HF-style model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelLoadError(f"{cfg_file} has no 'model_type'")
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (flat, or nested under ``text_config``)."""
    return {**config, **config.get("text_config", {})}


def check_model_type(config: dict[str, Any]) -> None:
    """Raise unless mlx-lm has an implementation for ``config['model_type']``."""
    from .mlx_lm_seam import model_classes

    try:
        model_classes(config)
    except ValueError:
        raise ModelLoadError(
            f"unsupported model_type '{config['model_type']}': mlx-lm has no implementation of it"
        ) from None


def check_tokenizer(path: Path) -> None:
    """Stock mlx_lm.load returns an empty tokenizer without these files: refuse instead."""
    if not ((path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()):
        raise ModelLoadError(
            f"{path} has no tokenizer.json (or tokenizer.model): copy the tokenizer files "
            "of the original model into it"
        )


def safetensors_header(file: Path) -> dict[str, Any]:
    """Read and check a safetensors header; raise if the file is truncated or corrupt."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} is not a valid safetensors file ({e})") from None
    end = max(
        (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
    )
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{file} is truncated: header promises {8 + n + end} bytes, file has {size}"
        )
    return header


def check_weights(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weight files")
    for f in files:
        safetensors_header(f)
    return files


def validate_model_dir(model: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """All checks that can run before loading; returns the path and its config."""
    path = resolve_model_path(model)
    config = read_config(path)
    check_model_type(config)
    check_tokenizer(path)
    check_weights(path)
    return path, config


@dataclass
class LoadedModel:
    """A model ready to run, its tokenizer, its config and where it came from."""

    model: Any
    tokenizer: Any
    config: dict[str, Any]
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def load_model(
    model: str | Path | None = None,
    *,
    fast_cpu: bool = True,
    lazy: bool = False,
) -> LoadedModel:
    """Validate and load a model with mlx-lm.

    ``fast_cpu`` (default) applies OptiQ's CPU layer path when MLX runs on the CPU:
    fp32 compute, and dequantize + GEMM for multi-row inputs (see :mod:`optiq.core.cpu`).
    The weights are read lazily and (unless ``lazy``) evaluated one tensor at a time, so
    the CPU path's fp32 cast holds one tensor twice, never the whole model.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load as mlx_load

    path, config = validate_model_dir(model)
    try:
        m, tok = mlx_load(str(path), lazy=True)
    except Exception as e:  # mlx-lm raises many kinds; the user needs one line
        raise ModelLoadError(f"could not load {path}: {type(e).__name__}: {e}") from None
    if len(tok.vocab) == 0 if hasattr(tok, "vocab") else False:
        raise ModelLoadError(f"{path}: the tokenizer loaded empty")
    if fast_cpu:
        from .cpu import prepare_for_cpu

        prepare_for_cpu(m)
    if not lazy:
        for _, p in tree_flatten(m.parameters()):
            mx.eval(p)
    return LoadedModel(model=m, tokenizer=tok, config=config, path=path)
