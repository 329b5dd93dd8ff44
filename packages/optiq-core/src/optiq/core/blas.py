"""Use the system OpenBLAS for MLX's CPU matmuls when one is installed.

MLX's Linux wheel ships the reference BLAS, which makes fp32 GEMM ~15-40x slower than
OpenBLAS. Loading OpenBLAS with ``RTLD_GLOBAL`` *before* MLX is imported makes the
dynamic linker resolve MLX's ``cblas_*`` symbols to it, with no re-exec needed.
Set ``OPTIQ_OPENBLAS=0`` to turn this off, or ``OPTIQ_OPENBLAS=/path/libopenblas.so``
to choose the library.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

_loaded: str | None = None


def find_openblas() -> str | None:
    """Return the OpenBLAS library to preload, or None (disabled or not found)."""
    choice = os.environ.get("OPTIQ_OPENBLAS", "").strip()
    if choice.lower() in ("0", "off", "false", "no"):
        return None
    if choice and choice.lower() not in ("1", "on", "true", "yes"):
        return choice if Path(choice).exists() else None
    return next((c for c in CANDIDATES if Path(c).exists()), None)


def preload_openblas() -> str | None:
    """Load OpenBLAS globally on Linux if MLX is not imported yet; return its path."""
    global _loaded
    if _loaded or not sys.platform.startswith("linux"):
        return _loaded
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS symbols
    path = find_openblas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _loaded = path
    return path


def loaded_openblas() -> str | None:
    """The OpenBLAS path this process preloaded, if any."""
    return _loaded
