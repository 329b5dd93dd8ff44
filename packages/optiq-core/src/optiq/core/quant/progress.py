"""Progress of long stages as log lines (``block k of N, elapsed, remaining``).

A tqdm bar written to a file shows nothing for minutes; a convert of a real model runs
for many minutes, so each stage reports plain lines a log keeps.
"""

from __future__ import annotations

import time
from typing import Callable


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts units of work of one stage and logs ``stage: unit k of N (elapsed, ~remaining)``."""

    def __init__(self, stage: str, total: int, log: Callable[[str], None] | None, unit: str = "block"):
        self.stage, self.total, self.unit = stage, max(int(total), 1), unit
        self.log = log or (lambda s: None)
        self.done = 0
        self.t0 = time.time()

    def step(self, what: str = "", n: float = 1) -> None:
        """``n`` more units done (a batch of windows is several; a block of it a fraction)."""
        self.done += n
        elapsed = time.time() - self.t0
        remaining = elapsed / self.done * (self.total - self.done)
        extra = f" {what}" if what else ""
        self.log(
            f"{self.stage}: {self.unit} {int(self.done + 1e-6)} of {self.total}{extra} "
            f"({_clock(elapsed)} elapsed, ~{_clock(remaining)} left)"
        )
