"""Write a safetensors file tensor by tensor from another one, without ever holding a whole model in memory.

Why not ``safetensors.torch.save_file``: it needs every tensor in memory at once (a 7-14 GB checkpoint, twice
when patched copies sit beside the originals). The format makes streaming easy: 8-byte little-endian header
length, a JSON header giving each tensor's dtype, shape and byte range, then the raw little-endian data. When
the output tensors are the input's (same names and shapes, possibly new dtypes), the whole header is known from
the input header alone, so it is written first and the data follows in order.

Why plain reads instead of ``safe_open`` (mmap): pages of a mapped file count in the process's resident set as
they are touched, so mapping a 7 GB checkpoint and reading it through makes the process look 7 GB big (and
competes with everything else for memory); ``readinto`` a reused buffer keeps the data in the page cache only.
Every block goes through three buffers allocated once per writer (raw bytes in, fp64 rows, raw bytes out), so
memory stays flat and the allocator does not fragment, whatever the number and size of the tensors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from . import io, rounding
from .errors import LoraFileError

Tensor = torch.Tensor
Shape = tuple[int, ...]
Entry = tuple[str, str, int, int]  # (name, safetensors dtype, begin, end) in the output's data buffer

BLOCK_ELEMS = 1 << 19
"""Elements per block when casting or patching (4 MiB of fp64): bounds the buffers, not the tensor size."""
MAX_ELEMENT_BYTES = 8


def element_bits(dtype: str) -> int:
    return io.SAFETENSORS_DTYPES[dtype][1]


def layout(tensors: Mapping[str, dict], out_dtypes: Mapping[str, str]) -> list[Entry]:
    """The output's entries in write order, from the input header's entries and each tensor's output dtype.

    Stable by element size, largest first (every tensor then starts aligned to its element size, as the
    safetensors library lays files out), then in the input's data order (sequential reads).
    """
    names = sorted(tensors, key=lambda k: tensors[k]["data_offsets"][0])
    names.sort(key=lambda k: -element_bits(out_dtypes[k]))
    out, cursor = [], 0
    for name in names:
        size = math.prod(tensors[name]["shape"]) * element_bits(out_dtypes[name]) // 8
        out.append((name, out_dtypes[name], cursor, cursor + size))
        cursor += size
    return out


def header_bytes(entries: Sequence[Entry], shapes: Mapping[str, list[int]], metadata: Mapping[str, str]) -> bytes:
    """8-byte LE length + compact UTF-8 JSON, space-padded so that the data starts 8-byte aligned."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, dtype, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class StreamWriter:
    """Copies, casts and patches tensors from an open input file into an open output file, block by block.

    ``patch`` reads a block of rows as fp64, lets the caller add into it (``add(rows, a, b)`` for rows a:b of the
    stored tensor, viewed as (b-a, rest)), rounds once to the output dtype, lets the caller check the result,
    and writes it. Untouched tensors in their own dtype are copied as raw bytes (byte-identical by construction).
    """

    def __init__(self, out: BinaryIO, bar: tqdm | None = None, block_elems: int = BLOCK_ELEMS) -> None:
        self.out, self.bar, self.block = out, bar, block_elems
        self._raw = bytearray(block_elems * MAX_ELEMENT_BYTES)
        self._res = bytearray(block_elems * MAX_ELEMENT_BYTES)
        self._acc = torch.empty(block_elems, dtype=torch.float64)
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.write(data)
        self.written += len(data)
        if self.bar is not None:
            self.bar.update(len(data))

    def _read(self, f: BinaryIO, pos: int, size: int, path: Path) -> memoryview:
        """``size`` bytes at ``pos`` into the reused input buffer (grown for a single row larger than a block)."""
        if size > len(self._raw):
            self._raw = bytearray(size)
        view = memoryview(self._raw)[:size]
        f.seek(pos)
        done = 0
        while done < size:
            n = f.readinto(view[done:])
            if not n:
                raise LoraFileError("file ended early while reading tensor data (was it changed meanwhile?)", file=path)
            done += n
        return view

    def copy(self, f: BinaryIO, pos: int, size: int, path: Path) -> None:
        """Bytes verbatim."""
        step = self.block * MAX_ELEMENT_BYTES
        for start in range(0, size, step):
            self.write(self._read(f, pos + start, min(step, size - start), path))

    def _output(self, acc: Tensor, dst: torch.dtype) -> tuple[Tensor, memoryview]:
        """``acc`` rounded to ``dst`` in the reused output buffer: (tensor view, bytes view)."""
        size = acc.numel() * dst.itemsize
        if size > len(self._res):
            self._res = bytearray(size)
        result = torch.frombuffer(self._res, dtype=dst, count=acc.numel())
        flat = acc.reshape(-1)
        # fp64 → fp16/bf16/fp8 would round twice through fp32; round-to-odd first makes it one rounding
        result.copy_(rounding.fp32_round_to_odd(flat) if rounding.needs_odd_step(flat.dtype, dst) else flat)
        return result, memoryview(self._res)[:size]

    def cast(self, f: BinaryIO, pos: int, numel: int, dtypes: tuple[torch.dtype, torch.dtype], path: Path) -> None:
        """A tensor in a new dtype, a block of elements at a time."""
        src, dst = dtypes
        for start in range(0, numel, self.block):
            n = min(self.block, numel - start)
            raw = self._read(f, pos + start * src.itemsize, n * src.itemsize, path)
            _result, data = self._output(torch.frombuffer(raw, dtype=src, count=n), dst)
            self.write(data)

    def patch(
        self,
        f: BinaryIO,
        pos: int,
        shape: Shape,
        dtypes: tuple[torch.dtype, torch.dtype],
        add: Callable[[Tensor, int, int], None],
        check: Callable[[Tensor], None],
        path: Path,
    ) -> None:
        """Rows read as fp64, ``add`` into them, one rounding to the output dtype, ``check`` the result, write."""
        src, dst = dtypes
        rows, row_numel = shape[0], math.prod(shape[1:])
        step = max(1, self.block // max(1, row_numel))
        if step * row_numel > self._acc.numel():
            self._acc = torch.empty(step * row_numel, dtype=torch.float64)
        for a in range(0, rows, step):
            b = min(rows, a + step)
            n = (b - a) * row_numel
            raw = self._read(f, pos + a * row_numel * src.itemsize, n * src.itemsize, path)
            acc = self._acc[:n].view(b - a, row_numel)  # (rows, rest)
            acc.copy_(torch.frombuffer(raw, dtype=src, count=n).view(b - a, row_numel))
            add(acc, a, b)
            result, data = self._output(acc, dst)
            check(result)
            self.write(data)
