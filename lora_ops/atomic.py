"""Atomic writes: a file or folder appears under its final name complete, or not at all. Leftovers are swept.

Every save goes through `atomic_write`: the LoRA files of ``convert`` / ``resize`` / ``merge`` / the Save node
(`lora_ops.io.save_state_dict`), baked checkpoints and diffusers folders (`lora_ops.bake`), training checkpoints,
loss histories and plots (`lora_ops.train`)::

    with atomic_write(target) as tmp:            # tmp: an empty file to write, e.g. by path
        safetensors.torch.save_file(tensors, tmp)
    # here target is the complete new file; on any exception (Ctrl-C too) it is untouched and tmp is gone

On success the temp is fsynced (for a folder: every file and folder in it), gets the permission bits of the file
it replaces (a new file keeps the umask default), is ``os.replace``-d onto the target, and the parent folder is
fsynced. On any exception, ``KeyboardInterrupt`` and ``SystemExit`` included, the temp is removed, the target is
left as it was and the exception propagates. An existing folder is swapped with the new one in one step where
the OS can (Linux ``renameat2(RENAME_EXCHANGE)``), else it is renamed aside first and restored if the second rename
fails. A symlink at the target is replaced by the new file; resolve the path first to replace what it points to.

Why named temps plus a sweep, and not Linux ``O_TMPFILE`` + ``linkat``: an ``O_TMPFILE`` file has no name, so a
``kill -9`` leaves nothing by construction, but it exists on Linux only (ComfyUI runs on Windows and macOS too)
and not on every filesystem (NFS, SMB/FUSE mounts), it cannot be a folder (diffusers bakes, checkpoints), it
cannot be handed to libraries that write by path (safetensors, PIL), and ``linkat`` cannot replace an existing
file, so a named temp and a rename would be needed anyway. A named temp works everywhere; what it costs is that
``kill -9``, a power cut or a crash leaves it behind, so:

* the name says what it is and whose it is: ``.<target name>.lora-ops-<host>-<pid>-<random>.tmp`` (hidden, the
  target's name first, ``<host>`` a short hash of the host name, ``<pid>`` the writing process);
* it is a private folder holding the payload under the target's own name. Libraries that write by path make
  their own temps next to the path they are given (safetensors >= 0.8 writes ``.tmpXXXXXX`` and renames it onto
  the path): inside our folder those go with it instead of lying, unnamed, beside the user's files. The payload
  keeps the target's name, so a library that picks the format by extension (PIL) still sees it;
* `sweep_stale` runs at the start of every `atomic_write` into a folder and removes our temps there whose process
  is gone: a dead pid on this host; a live pid that belongs to a process started after the temp was last written
  (pid reuse, seen through ``/proc`` on Linux); or a temp untouched for `STALE_AFTER_S` (6 h: another host on a
  shared folder, pid reuse elsewhere). So after a ``kill -9`` the next save into that folder, by any command,
  leaves no temp file. A live process's temp is never touched. Leftovers of versions before this module
  (``.<name>.<8 hex>.tmp``, and ``.old`` folders whose target exists) are removed once older than `STALE_AFTER_S`.
  If a crash hit the one moment of a folder swap without ``RENAME_EXCHANGE`` (the old folder renamed aside, the
  new one not yet in place), the sweep puts the old folder back instead of deleting it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Union

log = logging.getLogger(__name__)

StrPath = Union[str, "os.PathLike[str]"]

STALE_AFTER_S = 6 * 3600
"""A temp of ours untouched this long is removed whoever wrote it (the fallback when the pid cannot decide)."""
MARKER = "lora-ops"
ASIDE = "previous"
"""Name, inside the temp folder, of the folder a non-atomic folder swap moved aside."""

_NAME_BYTES = 180  # the target-name part of a temp name, in UTF-8 bytes (names are at most 255 bytes)
_PID_REUSE_SLACK_S = 2.0  # /proc/stat's boot time has 1 s resolution
TEMP_NAME = re.compile(
    rf"^\.(?P<name>.*)\.{MARKER}-(?P<host>[0-9a-f]{{6}})-(?P<pid>[0-9]{{1,10}})-[0-9a-f]{{8}}\.tmp$", re.DOTALL
)
"""Our temp names; ``host`` and ``pid`` name the writer."""
LEGACY_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.(?P<kind>tmp|old)$", re.DOTALL)
"""Temp (``.tmp``) and set-aside (``.old``) names of lora-ops versions before this module."""


def host_tag() -> str:
    """Six hex digits standing for this host (pids are only meaningful on the host, or container, that made them)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogatepass")).hexdigest()[:6]


def temp_name(target_name: str, pid: int | None = None) -> str:
    """A fresh temp name for ``target_name`` (its first 180 bytes), owned by ``pid`` (default: this process)."""
    short = target_name.encode("utf-8", "surrogatepass")[:_NAME_BYTES].decode("utf-8", "ignore")
    pid = os.getpid() if pid is None else pid
    return f".{short}.{MARKER}-{host_tag()}-{pid}-{secrets.token_hex(4)}.tmp"


def is_temp(name: str) -> bool:
    """Whether ``name`` is one of our temp names (this version's)."""
    return TEMP_NAME.match(name) is not None


# ------------------------------------------------------------------------------------------------------ fsync


def fsync_path(path: StrPath, *, directory: bool = False) -> None:
    """fsync a file, or a folder's entries (a no-op on Windows, which cannot open a folder; NTFS journals renames)."""
    if directory:
        if os.name == "nt":
            return
        fd = os.open(path, os.O_RDONLY)
    else:
        # POSIX fsyncs a read-only descriptor (so read-only files work); Windows needs write access
        fd = os.open(path, (os.O_RDWR | os.O_BINARY) if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder (symlinks are left alone)."""
    if not path.is_dir() or path.is_symlink():
        fsync_path(path)
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_path(p)
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync_path(p, directory=True)
    fsync_path(path, directory=True)


# ---------------------------------------------------------------------------------------------- the writer


@contextlib.contextmanager
def atomic_write(target: StrPath, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``target`` to write; on success it replaces ``target`` atomically, else it is gone.

    ``folder=False``: the temp is an existing empty file (open it, or hand the path to a library). ``folder=True``:
    an empty folder to fill; an existing folder at the target is swapped whole. The parent folder is created.
    Stale temps of dead processes in the parent are swept first (`sweep_stale`). Errors creating the temp are
    ``OSError`` raised on entering, before the body runs.
    """
    target = Path(target)
    if not target.name:
        raise ValueError(f"not a file or folder name: {target}")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent)
    staging = _make_staging(parent, target.name)
    payload = staging / target.name
    try:
        if folder:
            payload.mkdir()
        else:
            os.close(os.open(payload, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666))
        default_mode = stat.S_IMODE(payload.stat().st_mode)  # 0o666 / 0o777 minus the umask
        yield payload
        _commit(staging, payload, target, default_mode)
    except BaseException:
        _discard(staging, target)
        raise
    _remove(staging)  # holds nothing, or the replaced folder


def write_bytes(target: StrPath, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically; returns ``target``."""
    with atomic_write(target) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(target)


def write_text(target: StrPath, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically; returns ``target``."""
    return write_bytes(target, text.encode(encoding))


def _make_staging(parent: Path, name: str) -> Path:
    for _ in range(100):
        staging = parent / temp_name(name)
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        return staging
    raise FileExistsError(f"no free temp name in {parent}")


def _commit(staging: Path, payload: Path, target: Path, default_mode: int) -> None:
    _fsync_tree(payload)
    exists = os.path.lexists(target)
    mode = default_mode
    if exists:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(target.stat().st_mode)  # the mode of what is replaced
    # safetensors >= 0.8 renames its own private (0o600) temp onto the path it was given: re-apply the mode
    if stat.S_IMODE(payload.stat().st_mode) != mode:
        os.chmod(payload, mode)
    if payload.is_dir() and exists:
        if not target.is_dir():
            raise NotADirectoryError(20, "cannot replace a file with a folder", str(target))
        _swap_folder(staging, payload, target)
    else:
        os.replace(payload, target)
    with contextlib.suppress(OSError):  # make the rename itself durable; best effort
        fsync_path(target.parent, directory=True)


def _swap_folder(staging: Path, payload: Path, target: Path) -> None:
    """Put the folder ``payload`` at ``target``, whose current entry ends up inside ``staging`` (removed after)."""
    if _exchange(payload, target):
        return
    aside = staging / ASIDE
    os.replace(target, aside)
    try:
        os.replace(payload, target)
    except BaseException:
        os.replace(aside, target)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / musl >= 1.2.? : fall back
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem or kernel cannot; fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def _discard(staging: Path, target: Path) -> None:
    """After a failure: remove the temp, unless it holds the only copy of the old folder (then put that back)."""
    aside = staging / ASIDE
    if os.path.lexists(aside):
        if not os.path.lexists(target):
            try:
                os.replace(aside, target)
            except OSError:
                log.warning("could not put %s back; it is in %s (the next save there restores it)", target, aside)
                return
    _remove(staging)


def _remove(path: Path) -> None:
    """Best-effort removal of a temp file or folder."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


# ------------------------------------------------------------------------------------------------ the sweep


def sweep_stale(folder: StrPath, target: StrPath | None = None) -> list[Path]:
    """Remove the temps left in ``folder`` by lora-ops processes that are gone; return what was removed.

    With ``target`` (a name or path), only the temps for that target name. Never raises for a folder it cannot
    read or an entry it cannot remove (saving must not fail because of someone else's leftovers).
    """
    folder = Path(folder)
    only = None if target is None else Path(target).name
    removed: list[Path] = []
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if e.name.startswith(".")]
    except OSError:
        return removed
    now = time.time()
    host = host_tag()
    for entry in entries:
        path = Path(entry.path)
        try:
            if m := TEMP_NAME.match(entry.name):
                if only is not None and not _names_match(m["name"], only):
                    continue
                if not _abandoned(path, m["host"] == host, int(m["pid"]), now):
                    continue
                _restore_aside(path, folder)
            elif m := LEGACY_NAME.match(entry.name):
                if only is not None and m["name"] != only:
                    continue
                if now - _last_touched(path) < STALE_AFTER_S:
                    continue
                if m["kind"] == "old" and not os.path.lexists(folder / m["name"]):
                    continue  # an old version's rename-aside whose target is missing: the only copy, keep it
            else:
                continue
        except OSError:
            continue
        _remove(path)
        if not os.path.lexists(path):
            removed.append(path)
            log.info("removed stale temp %s", path)
    return removed


def _names_match(short: str, name: str) -> bool:
    """Whether a temp name's target part ``short`` (possibly cut to 180 bytes) stands for ``name``."""
    if short == name:
        return True
    return len(short.encode("utf-8", "surrogatepass")) > _NAME_BYTES - 4 and name.startswith(short)


def _abandoned(path: Path, this_host: bool, pid: int, now: float) -> bool:
    touched = _last_touched(path)
    if now - touched >= STALE_AFTER_S:
        return True
    if not this_host:
        return False
    if pid == os.getpid():
        return False
    if not _pid_alive(pid):
        return True
    return _started_after(pid, touched + _PID_REUSE_SLACK_S)


def _last_touched(path: Path, limit: int = 10_000) -> float:
    """The newest mtime of ``path`` and everything under it (at most ``limit`` entries looked at)."""
    st = os.lstat(path)
    newest = st.st_mtime
    if not stat.S_ISDIR(st.st_mode):
        return newest
    seen = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            seen += 1
            if seen >= limit:
                return newest
    return newest


def _restore_aside(staging: Path, folder: Path) -> None:
    """A crash between the two renames of a folder swap: put the old folder back where it was."""
    aside = staging / ASIDE
    if not os.path.lexists(aside):
        return
    others = [p for p in staging.iterdir() if p.name != ASIDE]
    if len(others) != 1:
        return
    target = folder / others[0].name
    if not os.path.lexists(target):
        with contextlib.suppress(OSError):
            os.rename(aside, target)
            log.warning("restored %s, left aside by an interrupted save", target)


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (True when it cannot be told: never remove a live one's temp)."""
    if pid <= 0:
        return True
    if os.name == "nt":
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    fields = _proc_stat(pid)
    return fields is None or fields[0] not in ("Z", "X")  # a zombie has finished (it only awaits its parent)


def _pid_alive_windows(pid: int) -> bool:
    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    except (AttributeError, OSError):
        return True


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3… of ``/proc/<pid>/stat`` (state first), or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after ``when`` (so it is not the one that wrote then); False if unknown."""
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return False
    try:
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
        started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return started > when
