"""`lora_ops.atomic`: atomic replace of files and folders, cleanup on every failure, the sweep of stale temps, and
a few real ``kill -9`` of ``lora-ops convert`` mid-write (the full loop: benchmarks/kill_loop.py)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_ops import atomic, io
from lora_ops.cli import main as cli_main
from lora_ops.files import save_lora
from lora_ops.testing.fixtures import random_lora


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def stale_temp(folder: Path, target: str, pid: int, *, host: str | None = None, age_s: float = 0.0) -> Path:
    """A temp folder as a killed writer leaves it (payload half written)."""
    name = atomic.temp_name(target, pid)
    if host is not None:
        name = name.replace(f"-{atomic.host_tag()}-", f"-{host}-")
    path = folder / name
    path.mkdir()
    (path / target).write_bytes(b"half a file")
    if age_s:
        when = time.time() - age_s
        for p in (path / target, path):
            os.utime(p, (when, when))
    return path


# ------------------------------------------------------------------------------------------------ atomic_write


def test_success_replaces_keeps_mode_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    if os.name != "nt":
        os.chmod(target, 0o640)
    with atomic.atomic_write(target) as tmp:
        assert tmp.name == "a.bin" and tmp.parent.parent == tmp_path and atomic.is_temp(tmp.parent.name)
        assert tmp.parent.name.startswith(".a.bin.lora-ops-") and f"-{os.getpid()}-" in tmp.parent.name
        assert target.read_bytes() == b"old"  # nothing visible until the end
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and names(tmp_path) == ["a.bin"]
    if os.name != "nt":
        assert target.stat().st_mode & 0o777 == 0o640
    atomic.write_text(tmp_path / "sub" / "t.txt", "ü")
    assert (tmp_path / "sub" / "t.txt").read_text(encoding="utf-8") == "ü" and names(tmp_path / "sub") == ["t.txt"]


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt(), SystemExit(3)])
def test_failure_mid_write_leaves_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"old bytes")
    with pytest.raises(type(error)):
        with atomic.atomic_write(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise error
    assert target.read_bytes() == b"old bytes" and names(tmp_path) == ["keep.safetensors"]
    with pytest.raises(KeyboardInterrupt):  # no old file: none appears
        with atomic.atomic_write(tmp_path / "new.safetensors") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert names(tmp_path) == ["keep.safetensors"]


def test_failing_rename_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "replace", boom)
        with pytest.raises(OSError, match="No space"), atomic.atomic_write(target) as tmp:
            tmp.write_bytes(b"new")
    assert target.read_bytes() == b"old" and names(tmp_path) == ["keep.bin"]


def test_library_temps_inside_ours_go_with_it(tmp_path):
    """A library that makes its own temp beside the path it is given (safetensors >= 0.8) leaves nothing outside."""
    with pytest.raises(RuntimeError), atomic.atomic_write(tmp_path / "x.safetensors") as tmp:
        (tmp.parent / ".tmpAbC123").write_bytes(b"the library's own temp")
        raise RuntimeError
    assert names(tmp_path) == []


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_folder_swap(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    make_tree(target, {"unet/w.safetensors": b"old", "old_only.txt": b"x"})
    with atomic.atomic_write(target, folder=True) as tmp:
        assert tmp.is_dir() and tmp.name == "model"
        make_tree(tmp, {"unet/w.safetensors": b"new", "model_index.json": b"{}"})
    assert tree(target) == {"model_index.json": b"{}", "unet/w.safetensors": b"new"}
    assert names(tmp_path) == ["model"]
    with pytest.raises(KeyboardInterrupt), atomic.atomic_write(target, folder=True) as tmp:
        make_tree(tmp, {"unet/w.safetensors": b"partial"})
        raise KeyboardInterrupt
    assert tree(target)["unet/w.safetensors"] == b"new" and names(tmp_path) == ["model"]
    with atomic.atomic_write(tmp_path / "fresh", folder=True) as tmp:
        make_tree(tmp, {"a": b"1"})
    assert tree(tmp_path / "fresh") == {"a": b"1"} and names(tmp_path) == ["fresh", "model"]


def test_folder_swap_restores_the_old_folder_when_the_second_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    make_tree(target, {"w": b"old"})
    real = os.replace

    def second_fails(src, dst):
        if Path(dst) == target and Path(src).name == "model":  # the new folder (the old one is aside by now)
            raise OSError(5, "I/O error")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_fails)
    with pytest.raises(OSError, match="I/O error"), atomic.atomic_write(target, folder=True) as tmp:
        make_tree(tmp, {"w": b"new"})
    monkeypatch.setattr(atomic.os, "replace", real)
    assert tree(target) == {"w": b"old"} and names(tmp_path) == ["model"]


# ------------------------------------------------------------------------------------------------- the sweep


def test_sweep_removes_dead_processes_temps_only(tmp_path):
    dead = stale_temp(tmp_path, "a.safetensors", dead_pid())
    mine = stale_temp(tmp_path, "b.safetensors", os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = stale_temp(tmp_path, "c.safetensors", child.pid)
        other_host = stale_temp(
            tmp_path, "d.safetensors", dead_pid(), host="abcdef" if atomic.host_tag() != "abcdef" else "fedcba"
        )
        aged_other_host = stale_temp(tmp_path, "e.safetensors", 12345, host="000000", age_s=atomic.STALE_AFTER_S + 60)
        (tmp_path / "a.safetensors").write_bytes(b"user file")
        (tmp_path / ".hidden.tmp").write_bytes(b"not ours")
        assert atomic.sweep_stale(tmp_path, "other.safetensors") == []  # only that target's temps
        removed = atomic.sweep_stale(tmp_path)
        assert sorted(removed) == sorted([dead, aged_other_host])
        assert all(p.exists() for p in (mine, live, other_host, tmp_path / "a.safetensors", tmp_path / ".hidden.tmp"))
    finally:
        child.kill()
        child.wait()
    assert atomic.sweep_stale(tmp_path) == [live]  # its process is gone now


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times from /proc (Linux)")
def test_sweep_sees_pid_reuse(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a temp last written an hour ago cannot belong to a process started now
        reused = stale_temp(tmp_path, "a.safetensors", child.pid, age_s=3600)
        recent = stale_temp(tmp_path, "b.safetensors", child.pid)
        assert atomic.sweep_stale(tmp_path) == [reused] and recent.exists()
    finally:
        child.kill()
        child.wait()


def test_sweep_of_older_versions_leftovers(tmp_path):
    old = time.time() - atomic.STALE_AFTER_S - 60
    paths = {}
    for name in (
        ".x.safetensors.0a1b2c3d.tmp",
        ".y.safetensors.0a1b2c3d.tmp",
        ".model.0a1b2c3d.old",
        ".gone.0a1b2c3d.old",
    ):
        paths[name] = tmp_path / name
        paths[name].write_bytes(b"left by an old version")
    (tmp_path / "model").mkdir()
    for name in (".x.safetensors.0a1b2c3d.tmp", ".model.0a1b2c3d.old", ".gone.0a1b2c3d.old"):
        os.utime(paths[name], (old, old))
    removed = {p.name for p in atomic.sweep_stale(tmp_path)}
    # an aged temp and a set-aside folder whose target exists go; a recent temp, and a set-aside folder that is
    # the only copy of its target, stay
    assert removed == {".x.safetensors.0a1b2c3d.tmp", ".model.0a1b2c3d.old"}


def test_sweep_puts_back_a_folder_left_aside_by_a_crash(tmp_path):
    staging = tmp_path / atomic.temp_name("model", dead_pid())
    make_tree(staging / atomic.ASIDE, {"w": b"old"})
    make_tree(staging / "model", {"w": b"new"})
    assert atomic.sweep_stale(tmp_path) == [staging]
    assert tree(tmp_path / "model") == {"w": b"old"} and names(tmp_path) == ["model"]


def test_every_save_sweeps_its_folder(tmp_path):
    stale = stale_temp(tmp_path, "a.safetensors", dead_pid())
    io.save_state_dict(tmp_path / "b.safetensors", {"w": torch.ones(2)})
    assert not stale.exists() and names(tmp_path) == ["b.safetensors"]


# -------------------------------------------------------------------------------------------- kill -9 for real

CHILD = """
import sys
import lora_ops.cli, lora_ops.files  # imports done before the parent says go
sys.stdin.readline()
sys.exit(lora_ops.cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_kill_9_mid_write_never_corrupts_and_the_next_run_sweeps(tmp_path):
    shapes = {
        f"te2.text_model.encoder.layers.{i}.mlp.fc{j}": (5120, 1280) if j == 1 else (1280, 5120)
        for i in range(8)
        for j in (1, 2)
    }
    lora = random_lora(shapes, rank=32, family="sdxl", seed=0)  # 16 layers: 26 MB
    src = save_lora(lora, tmp_path / "in.safetensors", "kohya")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "x.safetensors"
    argv = ["convert", str(src), "--to", "diffusers", "--family", "sdxl", "-o", str(target), "--overwrite"]
    assert cli_main(argv) == 0
    reference = io.load_state_dict(target)
    old = b"the previous file"

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kids = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, *argv],
            stdin=subprocess.PIPE,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(3)
    ]
    rng = random.Random(0)
    left_by_kills = 0
    try:
        for n, kid in enumerate(kids):
            if n % 2:
                target.write_bytes(old)
            else:
                target.unlink(missing_ok=True)
            before = set(os.listdir(out_dir))
            kid.stdin.write(b"go\n")
            kid.stdin.flush()
            deadline = time.monotonic() + 60
            while kid.poll() is None and time.monotonic() < deadline:
                if any(a.startswith(".") and a not in before for a in os.listdir(out_dir)):
                    break
                time.sleep(0.0005)
            time.sleep(0 if n == 0 else rng.uniform(0, 0.05))  # the first exactly when the write starts
            if kid.poll() is None:
                os.kill(kid.pid, signal.SIGKILL)
            kid.wait()
            assert kid.returncode in (0, -signal.SIGKILL)
            left_by_kills += any(atomic.is_temp(a) and a not in before for a in os.listdir(out_dir))
            assert all(a == "x.safetensors" or atomic.is_temp(a) for a in os.listdir(out_dir))
            if not target.exists():
                assert n % 2 == 0  # absent only where it was absent before
            elif target.read_bytes() != old:
                got = io.load_state_dict(target)  # else: the complete new file
                assert got[1] == reference[1] and got[0].keys() == reference[0].keys()
                assert all(torch.equal(got[0][k], reference[0][k]) for k in got[0])
    finally:
        for kid in kids:
            if kid.poll() is None:
                kid.kill()
                kid.wait()
    assert left_by_kills >= 1  # the kills did land mid-write
    assert cli_main(argv) == 0  # the next run of the command sweeps what the killed ones left
    assert names(out_dir) == ["x.safetensors"]
