"""Safetensors shards written tensor by tensor, in any order, never held whole.

``mlx_lm.save_model`` needs the whole model in memory; a streamed convert produces one
block's tensors at a time. The names, dtypes and shapes of every output tensor are known
once the widths are chosen, so each shard's header is written first and every tensor's
bytes go to their planned offset as they are produced. Shard split, file names, index
and ``{"format": "mlx"}`` metadata follow ``mlx_lm.save_model``, so stock
``mlx_lm.load`` reads the result.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import ConfigError

MAX_SHARD_BYTES = 5 << 30  # mlx_lm.utils.MAX_FILE_SIZE_GB

_ST_DTYPE = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.uint32: "U32", mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64",
    mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
}
# numpy views of the raw bytes (numpy has no bfloat16)
_RAW = {mx.bfloat16: mx.uint16}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: mx.Dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.size


def _to_bytes(a: mx.array | np.ndarray, spec: TensorSpec) -> bytes:
    if isinstance(a, np.ndarray):
        a = mx.array(a)
    if tuple(a.shape) != spec.shape:
        raise ValueError(f"{spec.name}: shape {tuple(a.shape)} where {spec.shape} was planned")
    a = a.astype(spec.dtype)
    raw = a.view(_RAW[spec.dtype]) if spec.dtype in _RAW else a
    return np.ascontiguousarray(np.asarray(raw)).tobytes()


class ShardWriter:
    """Pre-planned shards in ``dest``; :meth:`write` each tensor once, then :meth:`close`."""

    def __init__(self, dest: Path, specs: list[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES):
        self.dest = Path(dest)
        self.specs = {s.name: s for s in specs}
        groups: list[list[TensorSpec]] = []
        size = 0
        for s in specs:  # mlx_lm.utils.make_shards
            if not groups or size + s.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += s.nbytes
        n = len(groups)
        fmt = "model-{:05d}-of-{:05d}.safetensors" if n > 1 else "model.safetensors"
        self.where: dict[str, tuple[int, int]] = {}  # name -> (fd, absolute offset)
        self.files: list[tuple[str, int]] = []
        self.weight_map: dict[str, str] = {}
        self.pending = set(self.specs)
        for i, group in enumerate(groups):
            fname = fmt.format(i + 1, n)
            header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
            off = 0
            for s in group:
                header[s.name] = {"dtype": _ST_DTYPE[s.dtype], "shape": list(s.shape), "data_offsets": [off, off + s.nbytes]}
                off += s.nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            fd = os.open(self.dest / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, struct.pack("<Q", len(text)) + text, 0)
            base = 8 + len(text)
            os.ftruncate(fd, base + off)
            for s in group:
                self.where[s.name] = (fd, base + header[s.name]["data_offsets"][0])  # type: ignore[index]
                self.weight_map[s.name] = fname
            self.files.append((fname, fd))

    def write(self, name: str, value: mx.array | np.ndarray) -> None:
        spec = self.specs.get(name)
        if spec is None or name not in self.pending:
            raise ValueError(f"{name}: not planned, or written twice")
        if spec.shape:
            self.write_rows(name, value, 0, last=True)
        else:
            self._write_scalar(name, value, spec)

    def _write_scalar(self, name: str, value: mx.array | np.ndarray, spec: TensorSpec) -> None:
        fd, off = self.where[name]
        os.pwrite(fd, _to_bytes(value, spec), off)
        self.pending.discard(name)

    def write_rows(self, name: str, value: mx.array | np.ndarray, row: int, last: bool) -> None:
        """Rows ``row..`` (along axis 0) of ``name``; ``last`` marks the tensor complete."""
        spec = self.specs.get(name)
        if spec is None or name not in self.pending:
            raise ValueError(f"{name}: not planned, or written twice")
        row_spec = TensorSpec(name, spec.dtype, (int(value.shape[0]),) + spec.shape[1:])
        fd, off = self.where[name]
        off += row * (spec.nbytes // max(spec.shape[0], 1))
        view = memoryview(_to_bytes(value, row_spec))
        while view:
            n = os.pwrite(fd, view, off)
            view, off = view[n:], off + n
        if last:
            self.pending.discard(name)

    def close(self, total_parameters: int) -> None:
        """Check every tensor was written, close the files, write the index."""
        for _, fd in self.files:
            os.close(fd)
        self.files = []
        if self.pending:
            raise ConfigError(f"internal error: {len(self.pending)} tensors were never written, e.g. {sorted(self.pending)[0]}")
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in self.specs.values()), "total_parameters": total_parameters},
            "weight_map": {k: self.weight_map[k] for k in sorted(self.weight_map)},
        }
        (self.dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))

    def abort(self) -> None:
        for _, fd in self.files:
            os.close(fd)
        self.files = []
