"""Crash safety: ``kill -9`` the writing commands at random moments, then check the target and the leftovers.

    python benchmarks/kill_loop.py [--kills 30] [--commands convert,resize,merge,bake,bake-folder] [--keep DIR]

Builds its inputs in a temp folder: an SDXL-shaped kohya LoRA (986 layers, rank 16, fp16: 114 MB) for ``convert``
and ``resize``, two rank-8 ones (57 MB each) for ``merge`` (concat: a 114 MB output), and the tiny SD1.5-shaped
model (`lora_ops.testing.tiny`) with a LoRA on it for ``bake``: as a single-file checkpoint and as a diffusers
folder (``bake-folder``), each padded with a 160 MB VAE tensor so that the write takes a while.

Each command first runs twice to completion (the reference output; the two must agree). Then, ``--kills``
times, the command (``python -m lora_ops.cli …``) is started and SIGKILLed. Two kills in three land while it
writes: when a random fraction (0-115 %) of the output's bytes is in its temp, 115 % standing for "written, now
being fsynced, renamed or cleaned up" (the kill lands 0-50 ms after the last byte). The others land at a random
moment of the whole run (start-up, loading and the math included; some land after it finished: "missed", not
counted). Every other run starts with an old file (or folder) at the target, which the command is told to
``--overwrite``. After each kill the target must be either what it was before (absent, or the old bytes) or the
complete new output (the reference's safetensors header and data bytes); anything else counts as a corrupt
target. Temps a kill left are counted ("mid-write": the kill landed between making the temp and removing it),
as are files a kill left that are neither the target nor our temps; the next run's sweep removes our temps.
Finally the command runs once more to completion: the output folder must then hold the target and nothing else
(leftover files). ``--code DIR`` runs the commands from another checkout (e.g. ``git archive`` of an older commit
unpacked there), for a before/after comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from _sdxl_shapes import sdxl_shapes  # noqa: E402

from lora_ops import atomic, keymap  # noqa: E402
from lora_ops.errors import LoraFileError  # noqa: E402
from lora_ops.files import save_lora  # noqa: E402
from lora_ops.io import read_safetensors_header, save_state_dict  # noqa: E402
from lora_ops.testing import tiny  # noqa: E402
from lora_ops.testing.fixtures import model_shapes, random_lora  # noqa: E402

PADDING = 40 * 2**20  # fp32 elements: 160 MiB copied byte for byte by bake
POLL_S = 0.001


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ the inputs


def sdxl_lora(path: Path, rank: int, seed: int) -> None:
    lora = random_lora(sdxl_shapes(), rank=rank, alpha=rank / 2, family="sdxl", seed=seed, dtype=torch.float16)
    save_lora(lora, path, "kohya")


def sd1_parts():
    pipe = tiny.tiny_sd1_pipeline()
    shapes = model_shapes(pipe.unet, keymap.unet_canonical_keys(pipe.unet, "sd1"))
    shapes.update(model_shapes(pipe.text_encoder, keymap.te_canonical_keys(pipe.text_encoder, prefix="te1")))
    return pipe, random_lora(shapes, rank=4, family="sd1", seed=3)


def sd1_checkpoint(pipe, path: Path) -> None:
    """The tiny SD1 pipeline as a single-file (LDM names) checkpoint, with a big VAE-side padding tensor."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in pipe.unet.state_dict().items():
        mod, param = name.rsplit(".", 1)
        sd[f"model.diffusion_model.{keymap.unet_diffusers_to_ldm(mod, 'sd1')}.{param}"] = t
    for name, t in pipe.text_encoder.state_dict().items():
        sd["cond_stage_model.transformer." + keymap.te_to_canonical_path(name)] = t
    for name, t in pipe.vae.state_dict().items():
        sd[f"first_stage_model.{name}"] = t
    sd["first_stage_model.padding"] = torch.randn(PADDING, generator=torch.Generator().manual_seed(1))
    save_state_dict(path, {k: v.detach().clone().contiguous() for k, v in sd.items()})


def sd1_folder(pipe, path: Path) -> None:
    """The tiny SD1 pipeline as a diffusers folder, its VAE file padded the same way."""
    pipe.save_pretrained(path, safe_serialization=True)
    vae_file = path / "vae" / "diffusion_pytorch_model.safetensors"
    from lora_ops.io import load_state_dict

    vae, meta = load_state_dict(vae_file)
    vae["padding"] = torch.randn(PADDING, generator=torch.Generator().manual_seed(1))
    save_state_dict(vae_file, vae, meta, overwrite=True)


def build_inputs(root: Path) -> dict[str, Path]:
    inp = root / "in"
    inp.mkdir()
    paths = {
        "a": inp / "a.safetensors",
        "b1": inp / "b1.safetensors",
        "b2": inp / "b2.safetensors",
        "ckpt": inp / "ckpt.safetensors",
        "folder": inp / "model",
        "sd1": inp / "sd1_lora.safetensors",
        "old": inp / "old.safetensors",
    }
    sdxl_lora(paths["a"], 16, 0)
    sdxl_lora(paths["b1"], 8, 1)
    sdxl_lora(paths["b2"], 8, 2)
    pipe, lora = sd1_parts()
    save_lora(lora, paths["sd1"], "kohya")
    sd1_checkpoint(pipe, paths["ckpt"])
    sd1_folder(pipe, paths["folder"])
    save_state_dict(paths["old"], {"old": torch.arange(1000.0)}, {"what": "the old target"})
    return paths


def commands(p: dict[str, Path], target: Path) -> dict[str, list[str]]:
    common = ["-o", str(target), "--overwrite"]
    return {
        "convert": ["convert", str(p["a"]), "--to", "diffusers", "--family", "sdxl", *common],
        "resize": ["resize", str(p["a"]), "--rank", "8", "--family", "sdxl", "-q", *common],
        "merge": ["merge", str(p["b1"]), str(p["b2"]), "--method", "concat", "--family", "sdxl", "-q", *common],
        "bake": ["bake", str(p["ckpt"]), str(p["sd1"]), "-q", *common],
        "bake-folder": ["bake", str(p["folder"]), str(p["sd1"]), "-q", *common],
    }


# ------------------------------------------------------------------------------------------------- checking


def digest(path: Path) -> str | None:
    """A fingerprint of a file or folder (relative names and contents); None if absent, "unreadable: …" if broken.

    A .safetensors file counts by its parsed header (safetensors writes the metadata map in no fixed order) and
    its data bytes, so a truncated or garbled file never matches; other files by their bytes.
    """
    if not os.path.lexists(path):
        return None
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else "").encode() + b"\0")
        start = 0
        if f.suffix == ".safetensors":
            try:
                header, start = read_safetensors_header(f)
            except LoraFileError as err:
                return f"unreadable: {err}"
            h.update(json.dumps(header, sort_keys=True).encode())
        with open(f, "rb") as fh:
            fh.seek(start)
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def place_old(old: Path, target: Path, folder: bool) -> None:
    if folder:
        (target / "unet").mkdir(parents=True)
        shutil.copyfile(old, target / "unet" / "diffusion_pytorch_model.safetensors")
        (target / "model_index.json").write_text('{"old": true}')
    else:
        shutil.copyfile(old, target)


def clear(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif os.path.lexists(target):
        target.unlink()


def temps(folder: Path) -> list[str]:
    """Our temp names in ``folder``."""
    return [name for name in os.listdir(folder) if atomic.is_temp(name)]


def fresh(folder: Path, before: set[str]) -> list[str]:
    """Hidden entries in ``folder`` that were not there before: the running command's temps, whatever its code."""
    return [name for name in os.listdir(folder) if name.startswith(".") and name not in before]


def others(folder: Path, target: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n != target.name and not atomic.is_temp(n)]


@dataclass
class Tally:
    kills: int = 0
    mid_write: int = 0  # a temp of the killed run was left behind
    kept_old: int = 0
    absent: int = 0
    complete_new: int = 0
    corrupt: int = 0
    foreign: int = 0  # files a kill left beside the target that are neither the target nor our temps
    missed: int = 0  # runs that finished before the kill landed (not counted as kills)
    leftover: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_full(argv: list[str], env: dict[str, str], folder: Path) -> tuple[float, float]:
    """Run to completion; (total seconds, seconds a temp existed in ``folder``)."""
    start = time.perf_counter()
    before = set(os.listdir(folder))
    proc = subprocess.Popen(argv, env=env, cwd=folder.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = gone = None
    while proc.poll() is None:
        now = time.perf_counter()
        if fresh(folder, before):
            seen = seen or now
        elif seen and gone is None:
            gone = now
        time.sleep(POLL_S)
    end = time.perf_counter()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr.read().decode()}")
    return end - start, ((gone or end) - seen) if seen else 0.0


def staged_bytes(folder: Path, before: set[str]) -> int:
    """Bytes written so far under the running command's temps."""
    total = 0
    for name in fresh(folder, before):
        path = folder / name
        try:
            if path.is_dir():
                for dirpath, _dirs, files in os.walk(path):
                    for f in files:
                        with contextlib.suppress(OSError):
                            total += os.lstat(os.path.join(dirpath, f)).st_size
            else:
                total += path.stat().st_size
        except OSError:
            pass
    return total


def kill_once(argv, env, folder, rng, *, run_s: float = 0.0, when: float | None = None, size: int = 0):
    """Start the command and SIGKILL it: (False if it finished first, the folder's entries before it started).

    ``when`` None: at a random moment of the whole run (up to 1.1 × ``run_s``, a clean run's time). Else when that
    fraction of the output's ``size`` is in the temp (0: the temp was just made; ≥ 1: everything is written and it
    is being fsynced, renamed or cleaned up; the kill then lands a random 0-50 ms later).
    """
    before = set(os.listdir(folder))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=folder.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if when is None:
        time.sleep(rng.uniform(0, 1.1) * run_s)
    else:
        deadline = start + 300
        while proc.poll() is None and time.perf_counter() < deadline:
            if fresh(folder, before) and staged_bytes(folder, before) >= min(when, 1.0) * size:
                break
            time.sleep(POLL_S / 2)
        if when >= 1:
            time.sleep(rng.uniform(0, 0.05))
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return (alive and proc.returncode == -signal.SIGKILL), before


def run_command(name: str, argv: list[str], paths: dict[str, Path], root: Path, kills: int, rng, env) -> Tally:
    folder = root / f"out-{name}"
    folder.mkdir()
    target = Path(argv[argv.index("-o") + 1])
    is_folder = name == "bake-folder"
    t = Tally()
    began = time.perf_counter()
    total_s, write_s = run_full(argv, env, folder)
    reference = digest(target)
    out_bytes = tree_bytes(target)
    total_s2, _ = run_full(argv, env, folder)
    if digest(target) != reference:
        raise SystemExit(f"{name}: two clean runs wrote different outputs; cannot compare against a reference")
    out(f"{name}: clean run {min(total_s, total_s2):.1f} s, of which the write {write_s:.2f} s")
    attempts = 0
    seen_foreign: set[str] = set()
    while t.kills < kills and attempts < kills * 3:
        attempts += 1
        clear(target)
        old = None
        if t.kills % 2:
            place_old(paths["old"], target, is_folder)
            old = digest(target)
        if t.kills % 3 == 2 and t.kills != kills - 1:  # (the last kill always leaves the final run a temp)
            killed, before = kill_once(argv, env, folder, rng, run_s=total_s)
        else:
            killed, before = kill_once(argv, env, folder, rng, when=rng.uniform(0, 1.15), size=out_bytes)
        if not killed:
            t.missed += 1
            continue
        t.kills += 1
        t.mid_write += bool(fresh(folder, before))
        foreign = [n for n in others(folder, target) if n not in seen_foreign]
        if foreign:
            seen_foreign.update(foreign)
            t.foreign += len(foreign)
            t.notes.append(f"kill {t.kills}: files that are neither the target nor our temps: {foreign}")
        now = digest(target)
        if now == reference:
            t.complete_new += 1
        elif now is None and old is None:
            t.absent += 1
        elif now is not None and now == old:
            t.kept_old += 1
        else:
            t.corrupt += 1
            t.notes.append(
                f"kill {t.kills}: target is {'absent' if now is None else 'neither old nor new'}"
                f" (old {'present' if old else 'absent'})"
            )
    left_before = [n for n in os.listdir(folder) if n != target.name]
    run_full(argv, env, folder)
    leftover = [n for n in os.listdir(folder) if n != target.name]
    t.leftover = len(leftover)
    if leftover:
        t.notes.append(f"after the final run: {leftover}")
    if digest(target) != reference:
        t.corrupt += 1
        t.notes.append("the final run's output differs from the reference")
    t.seconds = time.perf_counter() - began
    t.notes.append(f"{len(left_before)} temps of killed runs were present before the final run")
    t.notes.append(f"{len(temps(folder))} of ours after it")
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30, help="kills per command (default 30)")
    parser.add_argument("--commands", default="convert,resize,merge,bake,bake-folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="build in this (new) folder and leave it there")
    parser.add_argument(
        "--code",
        help="run the commands from this checkout instead (e.g. `git archive` of an old "
        "commit unpacked there), to compare",
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.perf_counter()
    root = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="lora-ops-kill-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        paths = build_inputs(root)
        out(
            f"inputs built in {time.perf_counter() - began:.0f} s: "
            + ", ".join(f"{k} {digest_size(v)}" for k, v in paths.items())
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if args.code:
            env["PYTHONPATH"] = os.pathsep.join([str(Path(args.code).resolve()), env.get("PYTHONPATH", "")])
        rows = []
        for name in args.commands.split(","):
            target = root / f"out-{name}" / ("model" if name == "bake-folder" else "x.safetensors")
            argv = [sys.executable, "-m", "lora_ops.cli", "--threads", "1", *commands(paths, target)[name]]
            t = run_command(name, argv, paths, root, args.kills, rng, env)
            rows.append((name, t))
            for note in t.notes:
                out(f"  {name}: {note}")
        out()
        out(
            "| command | kills | mid-write | old kept | absent | complete new | corrupt | foreign files | "
            "leftover after next run | missed | s |"
        )
        out("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, t in rows:
            out(
                f"| {name} | {t.kills} | {t.mid_write} | {t.kept_old} | {t.absent} | {t.complete_new} | {t.corrupt} "
                f"| {t.foreign} | {t.leftover} | {t.missed} | {t.seconds:.0f} |"
            )
        kills = sum(t.kills for _, t in rows)
        corrupt = sum(t.corrupt for _, t in rows)
        leftover = sum(t.leftover for _, t in rows)
        out(
            f"\nkills {kills}, corrupt targets {corrupt}, leftover files {leftover} "
            f"({time.perf_counter() - began:.0f} s)"
        )
        sys.exit(1 if corrupt or leftover else 0)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def digest_size(path: Path) -> str:
    return f"{tree_bytes(path) / 1e6:.0f} MB"


if __name__ == "__main__":
    main()
