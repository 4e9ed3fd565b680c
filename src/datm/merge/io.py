"""A streaming safetensors writer: tensors are written as they are made, never all held at once."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from datm.merge.base import MergeError

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
}


class SafetensorsStreamWriter:
    """Writes a .safetensors file one tensor at a time, so the whole output never sits in memory.

    The header (which must come first) needs every tensor's offset, so tensor bytes go to a side
    file as they arrive and `close` writes the header, then copies them in. Tensors are laid out by
    decreasing item size so each one starts aligned to its dtype.
    """

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata or {}
        self._side_path = self.path.with_name(self.path.name + ".data")
        self._side = open(self._side_path, "wb")  # closed in close()
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> dtype, shape, start, size

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise MergeError(f"{self.path}: tensor {name!r} written twice")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise MergeError(f"{self.path}: cannot store dtype {tensor.dtype} for {name!r}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        start = self._side.tell()
        self._side.write(memoryview(flat.numpy()))
        self._entries[name] = (_SAFETENSORS_DTYPES[tensor.dtype], list(tensor.shape), start, flat.numel())

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        self._side.close()
        order = sorted(self._entries, key=lambda n: -_dtype_size(self._entries[n][0]))
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for name in order:
            dtype, shape, _, size = self._entries[name]
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
        header_bytes += b" " * (-len(header_bytes) % 8)  # the format allows space padding; keeps data aligned
        with open(self.path, "wb") as out, open(self._side_path, "rb") as side:
            out.write(struct.pack("<Q", len(header_bytes)))
            out.write(header_bytes)
            for name in order:
                _, _, start, size = self._entries[name]
                side.seek(start)
                while size > 0:
                    block = side.read(min(size, 1 << 24))
                    out.write(block)
                    size -= len(block)
            out.flush()
            os.fsync(out.fileno())
        self._side_path.unlink()
        return self.path.stat().st_size


def _dtype_size(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2}[name]
