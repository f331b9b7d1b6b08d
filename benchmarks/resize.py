"""Rank-Resize and SVD-Combine: LoRA Ops (QR of the factors, no ΔW) against kohya's dense method, side by side.

    python benchmarks/resize.py [--quick] [--tasks resize,combine] [--no-reference]

``--tasks``: any of ``resize`` (both resize rows), ``resize32``, ``svfro``, ``combine``; default all.

Builds an SDXL-shaped synthetic LoRA (986 layers: the real SDXL UNet attention/ff/proj and CLIP-L + OpenCLIP-G
text-encoder shapes, see _sdxl_shapes.py; rank 128, random Gaussian factors whose rows fade as 1/(1+i/16) so the
spectra decay like trained ones; fp16 like real files) and runs, in one process with one torch thread:

* resize to rank 32, and resize by ``sv_fro 0.9`` — ours: `lora_ops.resize.resize`; reference: kohya sd-scripts'
  ``networks/resize_lora.py`` method (dense ΔW = up·down in fp32, ``torch.linalg.svd`` with its default full
  matrices, kohya's rank functions, up = U·S, down = Vh, alpha = scale·rank);
* an SVD combine of three such LoRAs to rank 128 — ours: `lora_ops.combine.combine(..., "svd")`; reference: kohya's
  ``networks/svd_merge_lora.py`` method (dense Σ wᵢ·scaleᵢ·upᵢ·downᵢ in fp32, ``torch.linalg.svd``, truncate; its
  0.99-quantile clamp of the factors is left out, it only changes the factors, not the spectrum compared here).

Time: wall clock of each call. Peak memory: the process's resident set size sampled every millisecond by a
thread (psutil) during the call, minus the RSS at its start — tracemalloc does not see torch's allocations. The
inputs are resident before either side starts and are not counted; each side's output is. So that RSS follows
live memory, glibc is told to serve every allocation over 128 KiB by mmap (returned to the system on free) and to
trim its heap before each call; allocations that live under a millisecond can still slip between samples, so read
the memory columns as estimates. σ difference: for each layer max_i |σᵢ − σᵢ_ref| / σ₀_ref over
the reference's leading singular values (ΔW's own, alpha/rank included); the table shows the worst layer.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _sdxl_shapes import quick_shapes, sdxl_shapes  # noqa: E402

from lora_ops import rank_rules as R  # noqa: E402
from lora_ops.combine import combine  # noqa: E402
from lora_ops.lora import LoRA, LoRALayer  # noqa: E402
from lora_ops.resize import resize  # noqa: E402

RANK = 128
MIN_SV = 1e-6  # kohya's zero-layer threshold


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def pin_malloc() -> bool:
    """glibc: fixed mmap threshold (no dynamic growth), so freed tensors leave the RSS; False elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def trim_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Measure:
    """Wall time and peak RSS increase (sampled) of a block."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.proc = psutil.Process()

    def __enter__(self) -> Measure:
        gc.collect()
        trim_malloc()
        self.start_rss = self.proc.memory_info().rss
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self._stop.set()
        self._thread.join()
        self.peak_mb = (self.peak - self.start_rss) / 2**20


def synthetic_lora(shapes: dict[str, tuple[int, int]], seed: int) -> LoRA:
    gen = torch.Generator().manual_seed(seed)
    fade = 1.0 / (1.0 + torch.arange(RANK, dtype=torch.float32) / 16)  # (r,)
    layers = {}
    for key, (o, i) in shapes.items():
        down = torch.randn(RANK, i, generator=gen) * (fade[:, None] / math.sqrt(i))  # (r, in)
        up = torch.randn(o, RANK, generator=gen) * 0.05  # (out, r)
        layers[key] = LoRALayer(down=down.half(), up=up.half(), alpha=RANK / 2)
    return LoRA(layers, {"ss_network_dim": str(RANK), "ss_network_alpha": str(RANK / 2)}, family="sdxl")


# --- kohya's method (networks/resize_lora.py, networks/svd_merge_lora.py), reimplemented on our LoRA value ---------


def kohya_rank(S: torch.Tensor, rank: int, method: str | None, param: float | None) -> int:
    if method == "sv_fro":
        sq = S.pow(2)
        cum = torch.cumsum(sq, dim=0) / float(torch.sum(sq))
        index = max(0, min(int(torch.searchsorted(cum, param**2)), len(S) - 1))
        new_rank = index + 1
    else:
        new_rank = rank
    if S[0] <= MIN_SV:
        return 1
    return min(new_rank, rank)


def kohya_resize(lora: LoRA, rank: int, method: str | None = None, param: float | None = None):
    result, spectra = {}, {}
    for key, layer in lora.layers.items():
        weight = layer.up.float() @ layer.down.float()  # merge_linear: (out, in)
        U, S, Vh = torch.linalg.svd(weight)  # extract_linear
        k = kohya_rank(S, rank, method, param)
        scale = layer.scale
        up = (U[:, :k] @ torch.diag(S[:k])).half().contiguous()
        down = Vh[:k].half().contiguous()
        result[key] = (down, up, scale * k)
        spectra[key] = S * scale
        del weight, U, S, Vh
    return result, spectra


def kohya_svd_merge(items: list[tuple[LoRA, float]], rank: int):
    merged: dict[str, torch.Tensor] = {}
    for lora, ratio in items:
        for key, layer in lora.layers.items():
            weight = merged.get(key)
            if weight is None:
                weight = torch.zeros(layer.up.shape[0], layer.down.shape[1])
            merged[key] = weight + ratio * (layer.up.float() @ layer.down.float()) * layer.scale
    result, spectra = {}, {}
    for key in list(merged):
        mat = merged.pop(key)
        U, S, Vh = torch.linalg.svd(mat)
        k = min(rank, *mat.shape)
        result[key] = ((U[:, :k] @ torch.diag(S[:k])).half().contiguous(), Vh[:k].half().contiguous(), float(k))
        spectra[key] = S
        del mat, U, S, Vh
    return result, spectra


# --- comparison -----------------------------------------------------------------------------------------------


def sv_diff(report, ref_spectra: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for rec in report.layers:
        ref = ref_spectra[rec.key].double()
        ours = torch.tensor(rec.singular_values, dtype=torch.float64)
        n = min(len(ours), len(ref))
        worst = max(worst, float((ours[:n] - ref[:n]).abs().max()) / float(ref[0]))
    return worst


def ranks_equal(report, ref_result) -> str:
    same = sum(rec.new_rank == ref_result[rec.key][0].shape[0] for rec in report.layers)
    return f"{same}/{len(report.layers)}"


def row_ours_only(task: str, ours: Measure) -> str:
    """A row without the dense reference (``--no-reference``): its columns stay empty."""
    return f"| {task} | {ours.seconds:.1f} s | — | — | {ours.peak_mb:.0f} MiB | — | — | — | — |"


def row(task: str, ours: Measure, ref: Measure, diff: float, ranks: str) -> str:
    mem_ratio = f"{ref.peak_mb / ours.peak_mb:.1f}×" if ours.peak_mb > 1 else "—"
    return (
        f"| {task} | {ours.seconds:.1f} s | {ref.seconds:.1f} s | {ref.seconds / ours.seconds:.0f}× | "
        f"{ours.peak_mb:.0f} MiB | {ref.peak_mb:.0f} MiB | {mem_ratio} | {diff:.1e} | {ranks} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset of layers (a few seconds)")
    parser.add_argument("--tasks", default="resize32,svfro,combine", type=parse_tasks,
                        help="comma-separated subset of: resize (= resize32,svfro), resize32, svfro, combine "
                             "(default: all)")
    parser.add_argument("--no-reference", action="store_true",
                        help="time ours only (the dense reference takes ~1 h on the full LoRA)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pinned = pin_malloc()
    shapes = quick_shapes() if args.quick else sdxl_shapes()
    torch.linalg.svd(torch.randn(8, 8))  # load LAPACK before any timing
    torch.linalg.qr(torch.randn(8, 8))

    loras = [synthetic_lora(shapes, seed) for seed in range(3)]
    size = sum(t.numel() * t.element_size() for ly in loras[0].layers.values() for t in ly.tensors().values())
    out(f"SDXL-shaped LoRA: {len(shapes)} layers, rank {RANK}, fp16, {size / 2**20:.0f} MiB each; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, "
        f"{'glibc mmap threshold pinned' if pinned else 'allocator not pinned: memory columns are rough'}")
    out()
    out("| task | ours | dense ref (kohya) | speed-up | ours peak mem | ref peak mem | mem ratio "
        "| max σ diff (rel. σ₀) | same ranks |")
    out("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    run_resize(loras[0], args.tasks, not args.no_reference)
    if "combine" in args.tasks:
        run_combine(loras, not args.no_reference)


TASKS = ("resize32", "svfro", "combine")


def parse_tasks(text: str) -> set[str]:
    """``--tasks``: names from TASKS, ``resize`` standing for both resize rows."""
    tasks = {t.strip() for t in text.split(",") if t.strip()}
    if "resize" in tasks:
        tasks = (tasks - {"resize"}) | {"resize32", "svfro"}
    unknown = tasks - set(TASKS)
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {sorted(unknown)}; choose from resize, {', '.join(TASKS)}")
    return tasks


def run_resize(lora: LoRA, tasks: set[str], reference: bool) -> None:
    for name, task, rule, kohya in [("resize32", "resize → rank 32", R.Fixed(32), (32, None, None)),
                                    ("svfro", "resize sv_fro 0.9", R.SvFro(0.9), (RANK, "sv_fro", 0.9))]:
        if name not in tasks:
            continue
        with Measure() as ours:
            result, report = resize(lora, rule)
        del result
        if not reference:
            out(row_ours_only(task, ours))
            continue
        with Measure() as ref:
            ref_result, ref_spectra = kohya_resize(lora, *kohya)
        out(row(task, ours, ref, sv_diff(report, ref_spectra), ranks_equal(report, ref_result)))
        del report, ref_result, ref_spectra


def run_combine(loras: list[LoRA], reference: bool) -> None:
    task, weights = f"combine 3 (svd) → rank {RANK}", [1.0, 0.7, -0.5]
    with Measure() as ours:
        result, report = combine([(lo, w, None) for lo, w in zip(loras, weights)], "svd", R.Fixed(RANK))
    del result
    if not reference:
        out(row_ours_only(task, ours))
        return
    with Measure() as ref:
        ref_result, ref_spectra = kohya_svd_merge(list(zip(loras, weights)), RANK)
    same = sum(rec.new_rank == ref_result[rec.key][1].shape[0] for rec in report.layers)
    out(row(task, ours, ref, sv_diff(report, ref_spectra), f"{same}/{len(report.layers)}"))


if __name__ == "__main__":
    main()
