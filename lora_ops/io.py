"""Safe load and atomic save of tensor state dicts (.safetensors first, legacy pickles only on request).

Why this module parses the safetensors header itself: the safetensors library reports a bad file as a Rust
error string, torch as a traceback, ``json`` as a ValueError, and a git-LFS pointer or an HTML error page saved as
``model.safetensors`` as "header too large". Users download LoRAs from many places, so broken files are common.
Checking the few rules of the format here first turns every bad file into one `LoraFileError` line that names
the file and says what is wrong and how to fix it. Only a file that passed these checks reaches the library.

Why pickles are refused by default: a .pt/.ckpt/.bin file is a Python pickle and can run arbitrary code when
loaded. With explicit permission they are loaded with ``torch.load(weights_only=True)`` only, which restricts the
unpickler to tensors and plain containers; there is deliberately no fallback to full unpickling.

Why saves are atomic: a crash, a full disk or a bad tensor halfway through a save must never leave a truncated
file where a good LoRA used to be. Everything is validated before the first byte is written, the bytes go to a
hidden temp file in the target's own folder (same filesystem, so the rename is atomic), are fsynced, and only then
``os.replace`` swaps it in (`lora_ops.atomic`, which also sweeps the temps that killed runs left there).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import pickle
import re
import stat
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import safetensors
import safetensors.torch
import torch

from . import atomic
from .errors import LoraFileError, UnsafeFileError

log = logging.getLogger(__name__)

Tensor = torch.Tensor
StrPath = str | os.PathLike

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on the JSON header; a larger length means the file is not safetensors."""

MAX_TENSORS = 200_000
"""Most tensor entries a safetensors header may describe; more is refused before any tensor is read.

The largest real files, full FLUX / SDXL checkpoints and LyCORIS "full" LoRAs of every layer, have well under
20_000 tensors, so this leaves ten times that as headroom. What it bounds: every entry costs a few hundred bytes
of Python objects and some microseconds to check and load, and the 100 MB header limit alone would admit some two
million of them (gigabytes of objects, many seconds of work, for a file that is a few MB on disk)."""

_SNIFF_BYTES = 256
_LFS_MAGIC = b"version https://git-lfs.github.com/spec"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_HINT = (
    "pickle files can run code; convert it to .safetensors, or pass allow_pickle=True if you trust it"
)
_REDOWNLOAD_HINT = "re-download the file"


def _dtype_table() -> dict[str, tuple[torch.dtype, int]]:
    """safetensors dtype name → (torch dtype, bits per element), for what both this torch and safetensors load.

    safetensors 0.8 also knows F6_E2M3/F6_E3M2, but torch has no such dtypes, so those files cannot be loaded
    and are reported as unsupported here rather than failing inside the library.
    """
    table: dict[str, tuple[str, int]] = {
        "BOOL": ("bool", 8),
        "U8": ("uint8", 8),
        "I8": ("int8", 8),
        "I16": ("int16", 16),
        "U16": ("uint16", 16),
        "F16": ("float16", 16),
        "BF16": ("bfloat16", 16),
        "I32": ("int32", 32),
        "U32": ("uint32", 32),
        "F32": ("float32", 32),
        "C64": ("complex64", 64),
        "F64": ("float64", 64),
        "I64": ("int64", 64),
        "U64": ("uint64", 64),
        "F8_E4M3": ("float8_e4m3fn", 8),
        "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
        "F8_E5M2": ("float8_e5m2", 8),
        "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
        "F8_E8M0": ("float8_e8m0fnu", 8),
        "F4": ("float4_e2m1fn_x2", 4),  # the header counts 4-bit elements; torch packs two per byte
    }
    return {name: (getattr(torch, attr), bits) for name, (attr, bits) in table.items() if hasattr(torch, attr)}


SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = _dtype_table()
_STORABLE_DTYPES = frozenset(dt for dt, _bits in SAFETENSORS_DTYPES.values())
_BITS = {name: bits for name, (_dt, bits) in SAFETENSORS_DTYPES.items()}
_LOADABLE = {name: (dt, dt.itemsize) for name, (dt, _bits) in SAFETENSORS_DTYPES.items()}  # F4: 2 values per byte
_F4 = getattr(torch, "float4_e2m1fn_x2", None)
_LITTLE_ENDIAN = sys.byteorder == "little"
"""safetensors data is little-endian; the one-read CPU path (`_read_tensors`) takes the bytes as they are, so it is
used on little-endian hosts only (x86-64 and ARM64, all torch ships for). A big-endian host loads through the
library, which byte-swaps."""
_U63 = 2**63


# --------------------------------------------------------------------------------------------------- file kinds


def _stat_file(path: Path) -> os.stat_result:
    """stat() that turns "missing" / "is a folder" / "not a regular file" / "unreadable" into one LoraFileError.

    Only regular files (or symlinks to one) are accepted, and this runs before any open: reading a FIFO blocks
    until another process writes to it, ``/dev/zero`` never ends, and opening some devices has side effects, so a
    workflow or command line naming one must get an error at once, not hang the ComfyUI worker or the CLI.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LoraFileError("file not found", file=path, hint="check the path and file name") from None
    except (OSError, ValueError) as err:
        raise LoraFileError(f"cannot access the file ({one_line(err)})", file=path) from None
    _check_regular(st, path)
    return st


_SPECIAL_FILES = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _check_regular(st: os.stat_result, path: Path) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise LoraFileError("is a folder, not a file", file=path)
    if not stat.S_ISREG(st.st_mode):
        what = next((name for test, name in _SPECIAL_FILES if test(st.st_mode)), "a special file")
        raise LoraFileError(
            f"not a regular file ({what})", file=path, hint="give the path of a weights file, not a pipe or device"
        )


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading, checked to be a regular file, without ever blocking; return ``(file, size)``.

    `_stat_file` refuses FIFOs and devices before the open. The open itself is non-blocking (``O_NONBLOCK``:
    opening a FIFO for reading then returns at once instead of waiting for a writer) and the descriptor is
    fstat-ed again, so a path swapped for a FIFO or device between the stat and the open is refused too. The size
    is that descriptor's, and every later read goes through it, so all checks made against the size hold for
    the bytes actually read, whatever happens to the path meanwhile. The caller closes the file.
    """
    _stat_file(path)
    nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX only; Windows has no FIFOs in the file system
    flags = os.O_RDONLY | nonblock | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise LoraFileError("file not found", file=path, hint="check the path and file name") from None
    except (OSError, ValueError) as err:
        raise LoraFileError(f"cannot read the file ({one_line(err)})", file=path) from None
    try:
        st = os.fstat(fd)
        _check_regular(st, path)
        if nonblock:
            os.set_blocking(fd, True)  # regular files ignore it; cleared so reads mean what they usually do
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _kind_of(head: bytes, size: int) -> str:
    """Classify a file by its first bytes (see `detect_file_kind`)."""
    # safetensors first: its 8-byte length prefix can start with 0x80 (a header of 896 bytes is b"\x80\x03..."),
    # which would otherwise look like a pickle protocol byte.
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(MAX_HEADER_BYTES, size - 8) and head[8:].lstrip(b" \t\r\n")[:1] == b"{":
            return "safetensors"
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(_LFS_MAGIC):
        return "lfs-pointer"
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<!--")):
        return "html"
    return "unknown"


def detect_file_kind(path: StrPath) -> str:
    """What a file really is, from its bytes, never its name.

    Returns "safetensors", "torch-zip" (``torch.save`` zip format), "pickle" (raw pickle / legacy torch format),
    "lfs-pointer" (a git-LFS pointer text checked out instead of the weights), "html" (an error or login page
    saved by a browser or ``wget``) or "unknown". "safetensors" means the header looks plausible, not that it is
    valid; `read_safetensors_header` validates it.
    """
    path = Path(path)
    f, size = _open_regular(path)
    with f:
        return _kind_of(_read(f, _SNIFF_BYTES, path), size)


def _not_safetensors_error(kind: str, path: Path, *, loading: bool = False) -> LoraFileError:
    if kind == "lfs-pointer":
        return LoraFileError(
            "this is a git-LFS pointer, not model weights", file=path, hint=f"{_REDOWNLOAD_HINT} (git lfs pull)"
        )
    if kind == "html":
        return LoraFileError("this is an HTML page, not model weights", file=path, hint=_REDOWNLOAD_HINT)
    what = "a pickle-based torch zip file" if kind == "torch-zip" else "a pickle file"
    if loading:
        reason = f"this is {what} (.pt/.ckpt/.bin); refusing to unpickle it without permission"
    else:
        reason = f"this is {what} (.pt/.ckpt/.bin), not safetensors"
    return UnsafeFileError(reason, file=path, hint=_PICKLE_HINT)


# ------------------------------------------------------------------------------------------ safetensors header


def _text_hint(head: bytes) -> str | None:
    """A hint for a file that starts with text (a JSON error reply, a README …) where binary was expected."""
    sample = head[:40]
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or not all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return None
    shown = " ".join(text.split())[:32]
    return f"the file starts with text '{shown}…', not a safetensors header; {_REDOWNLOAD_HINT}"


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)  # at C speed; the slow search runs only when a key was dropped, to name it
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


class _GcPaused:
    """Pause the cyclic garbage collector while a header is parsed and its tensors are made.

    Why: a header of many tensors becomes about five containers per tensor, and in a small process (the CLI, a
    script) that burst of allocations sets off one full collection after another, each walking every object so
    far: loading a 200_000-tensor file took about 3.2 s of CPU with the collector on and 2 s paused, counting the
    few walks over the new objects once it is back on. In a process that already holds millions of objects
    (ComfyUI) full collections are rare and pausing changes nothing measurable. Parsed JSON and fresh tensors
    hold no reference cycles, so nothing is lost. The collector is process-wide: it is switched back on only if
    it was on (nesting is fine).
    """

    def __enter__(self) -> None:
        self._was_enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was_enabled:
            gc.enable()


def _read(f: BinaryIO, n: int, path: Path) -> bytes:
    try:
        return f.read(n)
    except OSError as err:
        raise LoraFileError(f"cannot read the file ({one_line(err)})", file=path) from None


def _too_many_tensors(count: int | str, path: Path) -> LoraFileError:
    return LoraFileError(
        f"too many tensors: the header describes {count} (limit {MAX_TENSORS:,})",
        file=path,
        hint="no real model file has nearly this many; the file is corrupt or not model weights",
    )


def read_safetensors_header(path: StrPath) -> tuple[dict, int]:
    """Parse and validate a safetensors header without trusting the file.

    Returns ``(header, data_start)``: the JSON header (tensor name → {dtype, shape, data_offsets}, plus
    ``"__metadata__"`` when the file has it) and the byte offset where the data buffer starts (8 + header length),
    which is where tensor ``data_offsets`` count from and where the kohya/addnet model hash starts.

    Checks every rule the safetensors library enforces (and a few it leaves to chance), so any file that passes
    loads, and any that fails raises `LoraFileError` naming the file, the key and the reason. Limits, all checked
    before any tensor is read: a regular file only (never blocks on a FIFO or device), at most `MAX_HEADER_BYTES`
    of header, at most `MAX_TENSORS` entries, and every entry's bytes inside the file. Pass the result to
    `load_state_dict` (``header=``) to load the tensors without parsing it again.
    """
    path = Path(path)
    f, size = _open_regular(path)
    with f, _GcPaused():
        return _read_header(f, size, path)


def _read_header(f: BinaryIO, size: int, path: Path) -> tuple[dict, int]:
    """`read_safetensors_header` on an open file whose size is ``size``."""
    if size == 0:
        raise LoraFileError("empty file (0 bytes)", file=path, hint=_REDOWNLOAD_HINT)
    f.seek(0)
    head = _read(f, _SNIFF_BYTES, path)
    kind = _kind_of(head, size)
    if kind in ("lfs-pointer", "html", "torch-zip", "pickle"):
        raise _not_safetensors_error(kind, path)
    if size < 8:
        raise LoraFileError(
            f"truncated: the file is {size} bytes, shorter than the 8-byte safetensors header length",
            file=path,
            hint=_REDOWNLOAD_HINT,
        )
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise LoraFileError(
            f"not a safetensors file: header length {n} is absurd (limit {MAX_HEADER_BYTES})",
            file=path,
            hint=_text_hint(head) or _REDOWNLOAD_HINT,
        )
    if n > size - 8:
        raise LoraFileError(
            f"truncated: header length {n} is larger than the {size - 8} bytes after it",
            file=path,
            hint=_text_hint(head) or _REDOWNLOAD_HINT,
        )
    f.seek(8)
    raw = _read(f, n, path)
    if len(raw) != n:  # the file shrank under us
        raise LoraFileError("truncated while reading the header", file=path, hint=_REDOWNLOAD_HINT)
    # A first, cheap count (milliseconds even for 100 MB), so a header of millions of entries is refused before
    # parsing builds gigabytes of objects. Every entry names "data_offsets", so for any honest file this is the
    # exact count; a name spelled with JSON escapes slips past it, but not past the exact check after parsing.
    approx = raw.count(b'"data_offsets"')
    if approx > MAX_TENSORS:
        raise _too_many_tensors(f"about {approx:,}", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LoraFileError(f"corrupt header: not UTF-8 text ({err.reason} at byte {err.start})", file=path) from None
    del raw
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as err:
        raise LoraFileError("corrupt header: key appears twice", file=path, key=str(err)) from None
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        raise LoraFileError(f"corrupt header: not valid JSON ({one_line(err)})", file=path) from None
    except RecursionError:
        raise LoraFileError("corrupt header: JSON nested too deeply", file=path) from None
    if not isinstance(header, dict):
        raise LoraFileError(
            f"corrupt header: JSON {type(header).__name__} instead of an object",
            file=path,
            hint="a safetensors header maps tensor names to their dtype, shape and offsets",
        )
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise _too_many_tensors(f"{count:,}", path)
    _check_metadata_entry(header, path)
    _check_tensor_entries(header, path, data_len=size - 8 - n)
    if header.get("__metadata__", False) is None:
        del header["__metadata__"]  # the library accepts null; hand callers a consistent shape
    return header, 8 + n


def _check_metadata_entry(header: dict, path: Path) -> None:
    meta = header.get("__metadata__")
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise LoraFileError(
            f"non-string metadata: __metadata__ is a JSON {type(meta).__name__}, not an object of strings", file=path
        )
    for k, v in meta.items():
        if not isinstance(v, str):
            raise LoraFileError(
                f"non-string metadata: value of '{k}' is a JSON {_json_type(v)}, safetensors metadata maps str to str",
                file=path,
                key="__metadata__",
            )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _check_tensor_entries(header: dict, path: Path, *, data_len: int) -> None:
    """Every entry well-formed, its byte count right for its shape and dtype, and the entries tiling the buffer.

    One tight loop with exact type tests, because it runs once per tensor and a header of `MAX_TENSORS` entries
    must pass in a fraction of a second: parsed JSON holds only plain dict/list/str/int/float/bool/None, and
    ``type(d) is int`` also rules out bools.
    """
    spans: list[tuple[int, int, str]] = []
    bits_of = _BITS
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if type(info) is not dict:
            raise LoraFileError(
                f"corrupt header: entry is a JSON {_json_type(info)}, not an object", file=path, key=key
            )
        try:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        except KeyError as err:
            raise LoraFileError(f"corrupt header: entry has no '{err.args[0]}'", file=path, key=key) from None
        bits = bits_of.get(dtype) if type(dtype) is str else None
        if bits is None:
            raise LoraFileError(
                f"unknown dtype {dtype!r}",
                file=path,
                key=key,
                hint=f"supported: {', '.join(SAFETENSORS_DTYPES)}",
            )
        numel = 1
        if type(shape) is list:
            for d in shape:
                if type(d) is not int or not 0 <= d < _U63:
                    numel = -1
                    break
                numel *= d
        if type(shape) is not list or numel < 0:
            raise LoraFileError(
                f"corrupt header: shape {shape!r} is not a list of non-negative ints", file=path, key=key
            )
        if type(offsets) is not list or len(offsets) != 2:
            begin = end = -1
        else:
            begin, end = offsets
        if type(begin) is not int or type(end) is not int or not 0 <= begin < _U63 or not 0 <= end < _U63:
            raise LoraFileError(
                f"corrupt header: data_offsets {offsets!r} is not a pair [begin, end] of non-negative ints",
                file=path,
                key=key,
            )
        if begin > end:
            raise LoraFileError(
                f"corrupt header: data_offsets [{begin}, {end}] end before they begin", file=path, key=key
            )
        if numel * bits % 8:
            raise LoraFileError(
                f"corrupt header: {numel} elements of {dtype} do not fill whole bytes", file=path, key=key
            )
        if bits == 4 and shape[-1] % 2:
            # torch's float4_e2m1fn_x2 holds two F4 values per element along the last dimension (as the library
            # loads it), so an odd last dimension cannot be loaded; say so here rather than in a library error.
            raise LoraFileError(
                f"shape {shape} of F4 cannot be loaded: torch packs two F4 values per element along the last "
                "dimension, which must be even",
                file=path,
                key=key,
            )
        need = numel * bits // 8
        if end - begin != need:
            raise LoraFileError(
                f"size/shape mismatch: shape {shape} of {dtype} needs {need} bytes, data_offsets [{begin}, {end}] "
                f"hold {end - begin}",
                file=path,
                key=key,
            )
        if end > data_len:
            raise LoraFileError(
                f"data_offsets [{begin}, {end}] out of range: the data buffer has only {data_len} bytes",
                file=path,
                key=key,
                hint=f"the file is truncated or corrupt; {_REDOWNLOAD_HINT}",
            )
        spans.append((begin, end, key))
    # The library demands that tensors tile the buffer exactly: no overlap, no gap, nothing after the last one.
    cursor, previous = 0, None
    spans.sort()
    for begin, end, key in spans:
        if begin < cursor:
            raise LoraFileError(
                f"corrupt header: data_offsets [{begin}, {end}] overlap tensor '{previous}' (which ends at {cursor})",
                file=path,
                key=key,
            )
        if begin > cursor:
            raise LoraFileError(
                f"corrupt header: {begin - cursor} unaccounted bytes before data_offsets [{begin}, {end}]",
                file=path,
                key=key,
            )
        cursor, previous = end, key
    if cursor != data_len:
        raise LoraFileError(
            f"corrupt file: {data_len - cursor} bytes after the last tensor that no header entry describes",
            file=path,
            hint=_REDOWNLOAD_HINT,
        )


# ---------------------------------------------------------------------------------------------------- loading


def load_state_dict(
    path: StrPath,
    *,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    header: tuple[dict, int] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load ``(tensors, metadata)`` from a .safetensors file, or from a legacy pickle only when allowed.

    The kind of file is decided from its bytes, not its extension, so a pickle renamed to .safetensors is still
    treated as a pickle. Only a regular file is read (a FIFO or device is refused at once, never waited on), the
    header passes every check and limit of `read_safetensors_header` before any tensor is read, and everything
    is read through one descriptor, so the bytes loaded are those of the file checked. Tensors come back in the
    dtype stored (bf16/fp16/fp8 stay as they are; callers do their math in fp32). CPU tensors own their memory
    instead of mapping the file (`_read_tensors`), so the same file can be overwritten right after loading
    (Windows refuses to replace a mapped file) and a later in-place rewrite of the file by another program cannot
    change tensors already loaded. Other devices load through the safetensors library, tensor by tensor.

    ``header``: the ``(header, data_start)`` pair `read_safetensors_header` returned for this file, for callers
    that look at the names and metadata first (`lora_ops.files.load_lora` decides the format before loading), so
    the header is not parsed twice. The file is checked to still have that header's length and size; a file
    changed since is refused rather than read with stale offsets.

    Pickles (.pt/.ckpt/.bin) are loaded only with ``allow_pickle=True`` and then only through
    ``torch.load(weights_only=True)``; a checkpoint dict nesting the tensors under "state_dict" is unwrapped.
    """
    path = Path(path)
    f, size = _open_regular(path)
    with f, _GcPaused():
        if header is None:
            kind = _kind_of(_read(f, _SNIFF_BYTES, path), size)
            if kind in ("torch-zip", "pickle"):
                if not allow_pickle:
                    raise _not_safetensors_error(kind, path, loading=True)
                f.seek(0)
                return _load_pickle(f, path, device), {}
            header = _read_header(f, size, path)
        else:
            _check_same_file(f, size, header, path)
        entries, data_start = header
        metadata = dict(entries.get("__metadata__") or {})
        try:
            on_cpu = torch.device(device).type == "cpu"
        except (RuntimeError, TypeError):
            on_cpu = False  # not a device torch knows: let the library word the error
        try:
            if on_cpu and _LITTLE_ENDIAN:
                tensors = _read_tensors(f, entries, data_start, size, path)
            else:
                tensors = _library_tensors(f, entries, path, device)
        except LoraFileError:
            raise
        except Exception as err:  # the header was valid, so this is I/O, a device problem or a library bug
            raise LoraFileError(f"cannot load the tensors ({one_line(err)})", file=path) from err
    log.debug("loaded %d tensors from %s", len(tensors), path)
    return tensors, metadata


def _check_same_file(f: BinaryIO, size: int, header: tuple[dict, int], path: Path) -> None:
    """Refuse a header (from `read_safetensors_header`) that no longer describes the open file."""
    entries, data_start = header
    data_len = max((info["data_offsets"][1] for key, info in entries.items() if key != "__metadata__"), default=0)
    f.seek(0)
    prefix = _read(f, 8, path)
    if len(prefix) != 8 or 8 + struct.unpack("<Q", prefix)[0] != data_start or size != data_start + data_len:
        raise LoraFileError(
            "the file changed after its header was read", file=path, hint="load it again, or pass header=None"
        )


def _read_tensors(f: BinaryIO, entries: dict, data_start: int, size: int, path: Path) -> dict[str, Tensor]:
    """CPU tensors from one read of the data buffer, each a ``torch.frombuffer`` view of its validated bytes.

    Why not the library's ``safe_open(...).get_tensor`` plus a ``clone`` per tensor: for files of many small
    tensors that per-tensor overhead is most of the load (200_000 tensors: about 5 s of the 7), while a frombuffer
    is a few microseconds and the one ``readinto`` a syscall or a few. The buffer is a private bytearray, plain
    process memory and not a mapping of the file, so the file can be replaced or rewritten at once and nothing
    done to it later reaches these tensors. The tensors share that buffer without overlapping (the header check
    made the offsets tile it), are writable, and each has its own storage of exactly its bytes, so saving one
    (safetensors or ``torch.save``) writes only it and sees no shared memory; the buffer is freed with the last
    of them. The data is taken as stored, little-endian, which is why `load_state_dict` uses this only on
    little-endian hosts. A tensor whose offset is not a multiple of its element size (only hand-written files
    have those: the library's writer aligns them) is copied, so no kernel ever sees a misaligned pointer.
    """
    data_len = size - data_start
    buf = bytearray(data_len)
    with memoryview(buf) as view:
        f.seek(data_start)
        filled = 0
        while filled < data_len:
            try:
                got = f.readinto(view[filled:])
            except OSError as err:
                raise LoraFileError(f"cannot read the file ({one_line(err)})", file=path) from None
            if not got:
                raise LoraFileError("truncated while reading the tensors", file=path, hint=_REDOWNLOAD_HINT)
            filled += got
    loadable = _LOADABLE
    frombuffer = torch.frombuffer
    tensors: dict[str, Tensor] = {}
    for name, info in entries.items():
        if name == "__metadata__":
            continue
        dtype, itemsize = loadable[info["dtype"]]
        shape = info["shape"]
        if dtype is _F4:
            shape = [*shape[:-1], shape[-1] // 2]  # the header counts 4-bit values; torch packs two per element
        begin, end = info["data_offsets"]
        if begin == end:  # frombuffer refuses zero bytes
            t = torch.empty(shape, dtype=dtype)
        else:
            t = frombuffer(buf, dtype=dtype, count=(end - begin) // itemsize, offset=begin).view(shape)
            if t.data_ptr() % itemsize:
                t = t.clone()
        tensors[name] = t
    return tensors


def _library_tensors(f: BinaryIO, entries: dict, path: Path, device: str | torch.device) -> dict[str, Tensor]:
    """Tensors through ``safetensors.safe_open``, which places each on ``device`` without a full host copy.

    The library opens files by name. On Linux it gets ``/proc/self/fd/N``, the descriptor already checked to be
    this regular file, so what it maps is the file validated, and a path swapped for a FIFO meanwhile cannot make
    it block; elsewhere it gets the path.
    """
    source = f"/proc/self/fd/{f.fileno()}"
    if not os.path.exists(source):
        source = str(path)
    tensors: dict[str, Tensor] = {}
    with safetensors.safe_open(source, framework="pt", device=str(device)) as lib:
        for name in entries:
            if name != "__metadata__":
                t = lib.get_tensor(name)
                tensors[name] = t.clone() if t.device.type == "cpu" else t
    return tensors


_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.*?)(?:\s+was not an allowed global.*)?$", re.MULTILINE)


def _load_pickle(f: BinaryIO, path: Path, device: str | torch.device) -> dict[str, Tensor]:
    """The tensors of a pickle, read from the already-opened (checked regular) file ``f`` of ``path``."""
    log.info("loading pickle file %s with torch.load(weights_only=True)", path)
    try:
        obj = torch.load(f, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        match = _UNPICKLER_REASON.search(str(err))
        detail = match.group(1).strip() if match else one_line(err)
        raise UnsafeFileError(
            f"holds Python objects that safe loading (weights_only) refuses: {detail}",
            file=path,
            hint="only tensors and plain containers are loaded from pickles; convert the file to .safetensors",
        ) from None
    except Exception as err:
        raise LoraFileError(f"cannot read the torch file ({one_line(err)})", file=path) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise LoraFileError(f"holds a {type(obj).__name__}, not a dict of tensors", file=path)
    tensors: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise LoraFileError(f"tensor name is a {type(key).__name__}, not a string", file=path, key=repr(key))
        if not isinstance(value, Tensor):
            raise LoraFileError(
                f"value is a {type(value).__name__}, not a tensor",
                file=path,
                key=key,
                hint="only flat dicts of tensors (optionally under 'state_dict') are supported",
            )
        tensors[key] = value
    return tensors


# ------------------------------------------------------------------------------------------------ value checks


def find_non_finite(tensors: Mapping[str, Tensor], *, chunk: int = 1 << 22) -> list[str]:
    """Keys whose tensor holds NaN or ±Inf, in input order.

    Only floating and complex tensors are checked (integers cannot hold them; fp4 e2m1 has no NaN/Inf encoding).
    Works a chunk at a time, upcasting fp8 (which ``torch.isfinite`` does not support) per chunk, so checking a
    large model never needs a second full-size copy.
    """
    bad = []
    for key, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        if t.dtype == getattr(torch, "float4_e2m1fn_x2", None):
            continue
        flat = t.detach().reshape(-1)
        upcast = t.element_size() == 1
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk]
            if upcast:
                part = part.float()
            if not bool(torch.isfinite(part).all()):
                bad.append(key)
                break
    return bad


# ----------------------------------------------------------------------------------------------------- saving


def safe_join(root: StrPath, relative: StrPath) -> Path:
    """``root / relative``, resolved, refusing anything that ends up outside ``root``.

    ``..`` parts, absolute paths and symlinks leading out of root are all refused: node inputs such as a filename
    prefix come from a workflow file someone else may have written.
    """
    base = _resolve(Path(root), Path(root))
    target = _resolve(base / Path(relative), Path(relative))
    if target != base and not target.is_relative_to(base):
        raise LoraFileError(
            f"path is outside the allowed folder {base} (resolves to {target})",
            file=relative,
            hint="use a path inside that folder, without '..' or links leading out of it",
        )
    return target


def resolve_path(path: StrPath) -> Path:
    """``path`` with ``~`` expanded and symlinks and ``..`` resolved; a `LoraFileError` naming it if that fails."""
    return _resolve(Path(path), Path(path))


def _resolve(path: Path, shown: Path) -> Path:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as err:  # symlink loops, NUL bytes
        raise LoraFileError(f"cannot resolve the path ({one_line(err)})", file=shown) from None


def _prepare_tensors(tensors: Mapping[str, Tensor], target: Path) -> dict[str, Tensor]:
    """Validated, CPU, contiguous, non-aliased copies of what will be written (checked before any write)."""
    if not isinstance(tensors, Mapping):
        raise LoraFileError(f"expected a dict of tensors, got a {type(tensors).__name__}", file=target)
    out: dict[str, Tensor] = {}
    seen_storage: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise LoraFileError(f"tensor name is a {type(key).__name__}, not a string", file=target, key=repr(key))
        if key == "__metadata__":
            raise LoraFileError("'__metadata__' is reserved by safetensors for metadata", file=target, key=key)
        if not isinstance(t, Tensor):
            raise LoraFileError(f"value is a {type(t).__name__}, not a tensor", file=target, key=key)
        if t.layout != torch.strided:
            raise LoraFileError(f"{t.layout} tensors cannot be saved; make it dense first", file=target, key=key)
        if t.dtype not in _STORABLE_DTYPES:
            raise LoraFileError(f"dtype {t.dtype} cannot be stored in safetensors", file=target, key=key)
        if t.device.type == "meta":
            raise LoraFileError("meta tensor has no data to save", file=target, key=key)
        t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        # safetensors refuses tensors sharing memory (views, tied weights); give each its own copy.
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen_storage:
            t = t.clone()
        elif ptr:
            seen_storage.add(ptr)
        out[key] = t
    return out


def check_metadata(metadata: Mapping[str, str] | None, target: StrPath) -> dict[str, str] | None:
    """``metadata`` as a plain str→str dict (None if empty), or a `LoraFileError` naming ``target`` and the key."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise LoraFileError(f"metadata must be a dict of str to str, got a {type(metadata).__name__}", file=target)
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise LoraFileError(
                f"non-string metadata: {k!r} is a {type(v).__name__}; safetensors metadata maps str to str",
                file=target,
                hint="convert numbers and lists to strings (e.g. json.dumps) before saving",
            )
    return dict(metadata) or None


def _write_safetensors(tensors: dict[str, Tensor], metadata: dict[str, str] | None, tmp: Path) -> None:
    """Serialize to ``tmp`` (a separate function so tests can make the write fail)."""
    safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)


def save_state_dict(
    path: StrPath,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    root: StrPath | None = None,
) -> Path:
    """Write ``tensors`` (+ str→str ``metadata``) as .safetensors, atomically; return the resolved path written.

    Everything is validated before anything is written. An existing file is replaced only with
    ``overwrite=True``. With ``root``, the path must resolve (symlinks and ``..`` included) inside root; a relative
    ``path`` is then taken relative to root. If ``path`` is a symlink, the file it points to is replaced.
    Parent folders are created. The bytes go through `lora_ops.atomic.atomic_write` (a hidden
    ``.<name>.lora-ops-….tmp`` beside the target, fsynced, then ``os.replace``-d onto it; stale temps of killed
    runs in that folder are swept first); on any failure the temp is removed and a previous file at the target is
    left byte-identical, with its permission bits kept when it is replaced.
    """
    target = safe_join(root, path) if root is not None else resolve_path(path)
    prepared = _prepare_tensors(tensors, target)
    meta = check_metadata(metadata, target)
    if target.is_dir():
        raise LoraFileError("is a folder; give a file name ending in .safetensors", file=target)
    if target.exists() and not overwrite:
        raise LoraFileError("file already exists", file=target, hint="pass overwrite=True to replace it")
    entered = False
    try:
        with atomic.atomic_write(target) as tmp:
            entered = True
            _write_safetensors(prepared, meta, tmp)
    except Exception as err:
        if not entered:
            raise LoraFileError(f"cannot create the output folder or file ({one_line(err)})", file=target) from None
        reason = "cannot write" if isinstance(err, OSError) else "cannot serialize"
        raise LoraFileError(f"{reason} the file ({one_line(err)}); nothing was changed", file=target) from err
    log.debug("saved %d tensors to %s", len(prepared), target)
    return target


# ----------------------------------------------------------------------------------------------------- hashing


def _sha256_from(path: Path, offset: int, chunk: int) -> str:
    digest = hashlib.sha256()
    f, _size = _open_regular(path)  # a FIFO or /dev/zero would never end
    try:
        with f:
            f.seek(offset)
            while block := f.read(chunk):
                digest.update(block)
    except OSError as err:
        raise LoraFileError(f"cannot read the file ({one_line(err)})", file=path) from None
    return digest.hexdigest()


def file_sha256(path: StrPath, chunk: int = 1 << 20) -> str:
    """SHA-256 of the whole file, hex (what Civitai and Hugging Face show as the file's hash)."""
    path = Path(path)
    _stat_file(path)
    return _sha256_from(path, 0, chunk)


def safetensors_model_hash(path: StrPath, chunk: int = 1 << 20) -> str:
    """The kohya / AddNet "model hash": SHA-256 (hex) of the bytes after the header (from 8 + header length).

    It ignores the header, so it stays the same when only metadata changes; kohya stores it as
    ``sshs_model_hash``. The header is validated first, so a bad file raises `LoraFileError`.
    """
    path = Path(path)
    _header, data_start = read_safetensors_header(path)
    return _sha256_from(path, data_start, chunk)


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception message (library errors can span a page)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__
