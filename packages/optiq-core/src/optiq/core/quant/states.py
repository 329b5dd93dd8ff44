"""Hidden states at decoder-block boundaries, for every calibration batch.

The streamed stages keep only block inputs (tokens x hidden per boundary, fp32) -- never
a leaf's activations for the whole model. When they would take more memory than the
plan allows, they live in ``.npy`` memory maps in a temporary directory instead.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np


class BoundaryStates:
    """``h_j`` for boundaries ``j = 0..n_boundaries-1`` (block ``j``'s input; the last is the
    output of the last block), stored per boundary as one ``[tokens, hidden]`` array."""

    def __init__(self, n_boundaries: int, batch_shapes: list[tuple[int, int]], hidden: int, spill: bool = False):
        self.batch_shapes = batch_shapes
        self.hidden = hidden
        self.offsets = np.cumsum([0] + [b * t for b, t in batch_shapes])
        n_tokens = int(self.offsets[-1])
        self.dir: Path | None = Path(tempfile.mkdtemp(prefix="optiq-states-")) if spill else None
        self.arrays: list[np.ndarray] = []
        for j in range(n_boundaries):
            if self.dir is not None:
                a = np.lib.format.open_memmap(self.dir / f"h{j}.npy", mode="w+", dtype=np.float32, shape=(n_tokens, hidden))
            else:
                a = np.empty((n_tokens, hidden), dtype=np.float32)
            self.arrays.append(a)

    @staticmethod
    def nbytes(n_boundaries: int, n_tokens: int, hidden: int) -> int:
        return n_boundaries * n_tokens * hidden * 4

    def put(self, j: int, b: int, h: mx.array) -> None:
        s, e = self.offsets[b], self.offsets[b + 1]
        self.arrays[j][s:e] = np.asarray(h.astype(mx.float32)).reshape(e - s, self.hidden)

    def get(self, j: int, b: int) -> mx.array:
        s, e = self.offsets[b], self.offsets[b + 1]
        return mx.array(np.ascontiguousarray(self.arrays[j][s:e])).reshape(*self.batch_shapes[b], self.hidden)

    def drop(self, j: int) -> None:
        """Free boundary ``j`` (no stage needs it any more)."""
        self.arrays[j] = np.empty((0, self.hidden), dtype=np.float32)

    def close(self) -> None:
        self.arrays = []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
