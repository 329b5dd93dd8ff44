"""Weights read one tensor at a time from a model's safetensors files.

A model loaded lazily (``mlx_lm.load(..., lazy=True)``) keeps every parameter it ever
evaluates: the array object stays in the model and holds its data. Reading each weight
from a fresh lazy dictionary instead, and dropping it when done, keeps at most one
tensor (plus what the caller derives from it) resident -- the way ``mlx_lm.convert``
streams a model through memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import numpy as np

# Elements of one weight chunk handed to the rounding code at a time (times the number of
# widths): rounding holds several float temporaries per element.
CHUNK_ELEMENTS = 1 << 22


class WeightSource:
    """Sanitized weights of a model directory, as fresh unevaluated arrays on each call."""

    def __init__(self, path: Path, model: Any):
        self.files = sorted(Path(path).glob("*.safetensors"))
        self.model = model

    def fresh(self) -> dict[str, mx.array]:
        """Every weight, lazily: nothing is read until an entry is evaluated."""
        weights: dict[str, mx.array] = {}
        for f in self.files:
            weights.update(mx.load(str(f)))
        sanitize = getattr(self.model, "sanitize", None)
        return sanitize(weights) if sanitize is not None else weights


def chunks_along_first_axis(shape: tuple[int, ...], widths: int = 1) -> Iterator[slice]:
    """Slices of axis 0 (rows of a matrix, experts of a pool) of bounded size.

    Rounding is independent along axis 0, so quantizing chunk by chunk gives exactly the
    result of one call while bounding its temporaries (a 248k-row embedding at five
    widths would otherwise need tens of GB).
    """
    per = int(np.prod(shape[1:])) * max(widths, 1)
    step = max(1, CHUNK_ELEMENTS // max(per, 1))
    for s in range(0, shape[0], step):
        yield slice(s, min(s + step, shape[0]))
