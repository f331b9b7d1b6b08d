"""Peak memory of `lora_ops.bake.bake` on a full-width FLUX.1 checkpoint: a few blocks of rows, not the model.

    python benchmarks/flux1_bake.py [--double 1] [--single 1] [--rank 32] [--cases kohya,diffusers]

Writes, to a temp folder deleted afterwards, a depth-reduced FLUX.1-dev single file in BFL names (top level, as
``flux1-dev.safetensors``) with the released widths — hidden 3072 (24 heads × 128), MLP 12288, T5 context 4096,
CLIP pooled 768, 64 input channels, guidance embedder — and ``--double`` double-stream + ``--single``
single-stream blocks (FLUX.1-dev has 19 + 38), random bf16 weights: 1 + 1 blocks is 545.5 M parameters, 1.09 GB,
its largest tensor ``single_blocks.0.linear1.weight`` [21504, 3072] (126 MiB). Then a rank-32 LoRA (random
factors, alpha 16, bf16) on every Linear of the denoiser, saved as

* ``kohya``: whole layers on the fused ``qkv`` / ``linear1`` (what kohya and ComfyUI files hold);
* ``diffusers``: the same LoRA split into diffusers' per-projection layers (``to_q`` … ``proj_mlp``: part layers
  ``unet.X[q]`` that patch their rows of the fused tensor in place),

and bakes each (strength 0.8) in a fresh process with one torch thread, started from a small launcher so that its
``ru_maxrss`` does not inherit this process's high-water mark. Peak RSS growth = ``ru_maxrss`` at the end − RSS
after the imports (the kernel's VmHWM is printed as a cross-check); it includes the loaded LoRA, whose size is
shown beside it. Ratios are to the largest tensor's bytes: streaming should stay well under 1, whereas loading,
patching and saving the model needs ≥ 1 × the whole file. A few rows of three patched tensors are checked against
W + s·up·down computed here in fp64 (≤ 1 bf16 ulp).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lora_ops import fused  # noqa: E402
from lora_ops.files import save_lora  # noqa: E402
from lora_ops.lora import LoRA, LoRALayer  # noqa: E402

H, MLP, CONTEXT, POOLED, IN, FREQ = 3072, 12288, 4096, 768, 64, 256  # FLUX.1-dev widths
STRENGTH = 0.8


def flux1_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.1-dev transformer with ``double`` + ``single`` blocks, BFL names → shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    linear("img_in", H, IN)
    linear("txt_in", H, CONTEXT)
    for emb, width in (("time_in", FREQ), ("vector_in", POOLED), ("guidance_in", FREQ)):
        linear(f"{emb}.in_layer", H, width)
        linear(f"{emb}.out_layer", H, H)
    for i in range(double):
        b = f"double_blocks.{i}."
        for s in ("img", "txt"):
            linear(b + f"{s}_mod.lin", 6 * H, H)
            linear(b + f"{s}_attn.qkv", 3 * H, H)
            linear(b + f"{s}_attn.proj", H, H)
            linear(b + f"{s}_mlp.0", MLP, H)
            linear(b + f"{s}_mlp.2", H, MLP)
            for norm in ("query_norm", "key_norm"):
                shapes[b + f"{s}_attn.norm.{norm}.scale"] = (128,)
    for i in range(single):
        b = f"single_blocks.{i}."
        linear(b + "linear1", 3 * H + MLP, H)
        linear(b + "linear2", H, H + MLP)
        linear(b + "modulation.lin", 3 * H, H)
        for norm in ("query_norm", "key_norm"):
            shapes[b + f"norm.{norm}.scale"] = (128,)
    linear("final_layer.linear", IN, H)
    linear("final_layer.adaLN_modulation.1", 2 * H, H)
    return shapes


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        for rows in t.split(2048):  # fp32 noise a slab at a time: no 2 GB fp32 temporary
            rows.copy_(torch.randn(rows.shape, generator=g) * 0.02)
        tensors[name] = t
    save_file(tensors, str(path), metadata={"modelspec.title": "flux1-dev, depth-reduced (benchmark)"})


def make_lora(shapes: dict[str, tuple[int, ...]], rank: int) -> LoRA:
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, shape in shapes.items():
        if name.endswith(".weight") and len(shape) == 2:
            out, inp = shape
            layers["unet." + name.removesuffix(".weight")] = LoRALayer(
                down=(torch.randn(rank, inp, generator=g) / math.sqrt(inp)).bfloat16(),
                up=(torch.randn(out, rank, generator=g) * 0.01).bfloat16(), alpha=rank / 2)
    return LoRA(layers, family="flux1")


LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', *sys.argv[1:]]).returncode)"
CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    torch.set_num_threads(1)
    from lora_ops.bake import bake
    from lora_ops.files import load_lora
    from lora_ops.lora import nbytes

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    src, lora_path, out, strength = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    baseline = rss()
    start = time.perf_counter()
    lora = load_lora(lora_path)
    report = bake(src, [(lora, strength, strength)], out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "vm_hwm": hwm(), "lora_bytes": nbytes(lora),
                      "layers": len(lora.layers), "patched": len(report.patched), "seconds": seconds,
                      "written": report.bytes_written}))
    """
)


def run_child(src: Path, lora_path: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", LAUNCHER, CHILD, str(src), str(lora_path), str(out), str(STRENGTH)],
                            capture_output=True, text=True, env=env, timeout=900, check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"bake failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def spot_check(src: Path, out: Path, lora: LoRA, checks: dict[str, slice]) -> float:
    """Worst difference, in bf16 ulps, of a few patched rows against W + s·ΔW done here in fp64."""
    from safetensors import safe_open

    worst = 0
    with safe_open(str(src), framework="pt") as fin, safe_open(str(out), framework="pt") as fout:
        for name, rows in checks.items():
            layer = lora.layers["unet." + name.removesuffix(".weight")]
            w = fin.get_slice(name)[rows].double()
            exp = (w + STRENGTH * layer.scale * (layer.up[rows].double() @ layer.down.double())).bfloat16()
            got = fout.get_slice(name)[rows]
            worst = max(worst, int((_ordered(got) - _ordered(exp)).abs().max()))
    return worst


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as integers ordered like the values (adjacent values differ by 1)."""
    i = t.contiguous().view(torch.int16).to(torch.int64)
    mag = i & 0x7FFF
    return torch.where(i < 0, -mag, mag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=1)
    parser.add_argument("--single", type=int, default=1)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--cases", default="kohya,diffusers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = flux1_shapes(args.double, args.single)
    params = sum(math.prod(s) for s in shapes.values())
    largest_name = max(shapes, key=lambda k: math.prod(shapes[k]))
    largest = math.prod(shapes[largest_name]) * 2
    with tempfile.TemporaryDirectory(prefix="flux1_bake_") as tmp:
        src = Path(tmp) / "flux1-dev-reduced.safetensors"
        start = time.perf_counter()
        write_checkpoint(src, shapes)
        size = src.stat().st_size
        print(f"checkpoint: {args.double} double + {args.single} single blocks, hidden {H}, bf16, {params / 1e6:.1f} M "
              f"params, {size / 2**30:.2f} GiB, written in {time.perf_counter() - start:.0f} s; largest tensor "
              f"{largest_name} {list(shapes[largest_name])} = {largest / 2**20:.1f} MiB")
        lora = make_lora(shapes, args.rank)
        rows = slice(3 * H, 3 * H + 64)  # linear1's first mlp rows (a diffusers part layer)
        checks = {"double_blocks.0.img_attn.qkv.weight": slice(H, H + 64), largest_name: rows, "img_in.weight":
                  slice(0, 64)}  # fmt: skip
        files = {"kohya": save_lora(lora, Path(tmp) / "kohya.safetensors", "kohya"),
                 "diffusers": save_lora(fused.split(lora), Path(tmp) / "diffusers.safetensors", "diffusers")}
        print()
        print("| LoRA file | layers | LoRA MiB | bake s | peak RSS growth MiB | VmHWM − baseline MiB "
              "| growth / largest tensor | (growth − LoRA) / largest | worst ulp |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for case in args.cases.split(","):
            out = Path(tmp) / f"baked-{case}.safetensors"
            stats = run_child(src, files[case], out)
            assert stats["written"] == out.stat().st_size == size, "output and input sizes differ"
            ulps = spot_check(src, out, lora, checks)
            growth = stats["peak"] - stats["baseline"]
            print(f"| {case} | {stats['layers']} | {stats['lora_bytes'] / 2**20:.1f} | {stats['seconds']:.1f} | "
                  f"{growth / 2**20:.1f} | {(stats['vm_hwm'] - stats['baseline']) / 2**20:.1f} | "
                  f"{growth / largest:.2f} | {(growth - stats['lora_bytes']) / largest:.2f} | {ulps} |")
            out.unlink()


if __name__ == "__main__":
    main()
