"""How much memory this process may use: what is available now, or a user's cap.

A process that outgrows memory is killed by the kernel with no message, so the commands
that load large models (convert, serve) estimate their peak from shapes first and refuse
with :class:`optiq.core.errors.MemoryBudgetError` when it is over this limit.
"""

from __future__ import annotations

import os

GB = 1 << 30
# Python, MLX, the tokenizer and the lazy model skeleton (measured: ~0.45 GB on Linux).
BASE_BYTES = 600 << 20


def available_bytes() -> int:
    """Memory available to this process now (Linux: MemAvailable; else 80% of RAM)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)


def memory_limit(max_memory_gb: float | None) -> int:
    """The cap in bytes when the user gave one (``--max-memory GB``), else what is available."""
    return int(max_memory_gb * GB) if max_memory_gb is not None else available_bytes()


def describe_parts(parts: dict[str, int]) -> str:
    """``"weights 0.45, runtime 0.59 GB"``: the parts of an estimate, largest first (>= 1 MiB)."""
    top = ", ".join(f"{k} {v / GB:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 1 << 20)
    return f"{top} GB"
