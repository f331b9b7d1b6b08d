"""FLUX.1-dev LoRA: load + convert to diffusers and rank-resize, LoRA Ops against diffusers and kohya, side by side.

    python benchmarks/flux1.py [--rank 32] [--dtype bf16] [--repeats 3] [--spellings kohya,comfyui,...]
                               [--ref-layers few|each|all] [--no-resize]

Builds a synthetic LoRA on every Linear of a FLUX.1-dev transformer at its real widths (314 layers: 19 double and
38 single blocks, img_in 64→3072, txt_in 4096→3072, vector_in 768, time/guidance 256, final layer; see
_flux1_shapes.py), rank 32, alpha 16, bf16 (``--dtype fp16`` for the other precision trainers save), random factors
whose rows fade as 1/(1+i/8) so the spectra decay like trained ones, and writes it to a temp folder in each spelling
of `SPELLINGS`:

    kohya       lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / .alpha    (fused BFL names)
    comfyui     diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight           (fused BFL names)
    diffusers   transformer.transformer_blocks.0.attn.to_q.lora_A.weight, split, alphas in lora_adapter_metadata
    onetrainer  lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight     (OneTrainer "mixture")
    lycoris_    lycoris_transformer_blocks_0_attn_to_q.lora_down.weight               (SimpleTuner, LoRA factors)
    diffsynth   transformer_blocks.0.attn.to_q.lora_A.weight                          (bare diffusers names)
    bfl-bare    double_blocks.0.img_attn.qkv.lora_A.weight                            (BFL control LoRAs' names)
    fal         base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight, blocks + final_layer.linear only
                (the modules diffusers' fal Kontext converter reads); fal-all: the same with all 314 modules
    peft        base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight        (PEFT's save_pretrained)
    xlabs       double_blocks.0.processor.qkv_lora1.down.weight: attention qkv/proj only, 152 layers, no alpha

Then, with one torch thread:

1. Load + convert. ours: ``files.load_lora(path)`` then ``formats.write_lora(lora, "diffusers")``; reference:
   diffusers' ``FluxLoraLoaderMixin.lora_state_dict(path)`` (it converts kohya-suffixed files, XLabs and fal; other
   spellings come back as stored). Each (spelling, side) runs in a fresh process forked from this one, which holds
   nothing big: CPU seconds, median of ``--repeats``; peak = ``ru_maxrss`` after the first call minus before it
   (resident set: anonymous copies and touched pages of a mapped file alike). The files were just written, so they
   are in the page cache and neither side waits on the disk. safetensors' ``load_file`` (under diffusers) maps the
   file and reads a page only when a tensor is used; "+ first read" is the extra cost of touching one byte per
   4 KiB page of every tensor it returned, what any later use pays, and "after first read" the peak then. Ours
   copies the file into memory it owns (`io.load_state_dict`), so nothing is left to read.
   "modules as ours": diffusers' ``transformer.`` modules that are also in ours / ours; names no FLUX.1 module has,
   and modules without the ``transformer.`` prefix (``load_lora_weights`` keeps only prefixed keys), are counted
   apart. "ΔW": worst ‖ΔW_diffusers − ΔW_ours‖_F / ‖ΔW_ours‖_F over the modules both have (unprefixed ones
   included), from the factors alone, ΔW = scale·B·A as each output means it (diffusers' converters bake
   alpha/rank into A and B, ours keeps alphas in the metadata); modules off by more than 1e-3 are named.
2. Resize 32 → 16 of the kohya file's LoRA. ours: ``resize.resize(lora, 16)`` (QR of the factors, SVD of a small
   core, no ΔW); reference: kohya sd-scripts' ``networks/resize_lora.py`` method (ΔW = up·down in fp32,
   ``torch.linalg.svd`` with its default full matrices, keep the top 16, up = U·S, down = Vh, alpha = scale·16).
   Both emit fp32 factors, compared as max|ΔW_ours − ΔW_ref| / max|ΔW_ref| per layer (worst layer shown). A dense
   SVD of a 3072-wide FLUX.1 layer takes 10–80 s on one thread, so the reference runs on ``--ref-layers``: ``few``
   (default: 6 layers of 6 shapes, under a minute), ``each`` (one layer of every shape, 23 layers, ~10 min) or
   ``all`` (314 layers, hours); ours runs on the same layers and, for scale, on all 314.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _flux1_shapes import flux1_shapes, one_of_each  # noqa: E402
from load import median_cpu_seconds  # noqa: E402

from lora_ops import families, io  # noqa: E402
from lora_ops import lora as L  # noqa: E402
from lora_ops.files import load_lora  # noqa: E402
from lora_ops.formats import write_lora  # noqa: E402
from lora_ops.formats.diffusers import ADAPTER_METADATA, diffusers_layers  # noqa: E402
from lora_ops.fused import parse_key  # noqa: E402
from lora_ops.keymap import dotted_to_kohya  # noqa: E402
from lora_ops.resize import resize  # noqa: E402

FLUX = families.get("flux1")
NEW_RANK = 16
PAGE = 4096
FEW = ("unet.img_in", "unet.time_in.in_layer", "unet.vector_in.in_layer", "unet.final_layer.linear",
       "unet.double_blocks.0.img_attn.proj", "unet.double_blocks.0.img_attn.qkv")


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- the LoRA and its spellings -----------------------------------------------------------------------------------


def synthetic_lora(rank: int, dtype: torch.dtype, seed: int = 0) -> L.LoRA:
    gen = torch.Generator().manual_seed(seed)
    fade = 1.0 / (1.0 + torch.arange(rank, dtype=torch.float32) / 8)
    layers = {}
    for key, (o, i) in flux1_shapes().items():
        down = torch.randn(rank, i, generator=gen) * (fade[:, None] / math.sqrt(i))  # (r, in)
        up = torch.randn(o, rank, generator=gen) * 0.05  # (out, r)
        layers[key] = L.LoRALayer(down=down.to(dtype), up=up.to(dtype), alpha=rank / 2)
    meta = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)}
    return L.LoRA(layers, meta, family="flux1")


def kohya_flat(prefix: str, split: L.LoRA) -> dict[str, torch.Tensor]:
    """Diffusers module names in kohya suffixes under ``prefix`` (OneTrainer mixture, SimpleTuner lycoris_)."""
    tensors = {}
    for key, layer in split.layers.items():
        module, part = parse_key(key)
        name = prefix + dotted_to_kohya(FLUX.to_diffusers(module.removeprefix("unet."), part))
        tensors.update({name + ".lora_down.weight": layer.down, name + ".lora_up.weight": layer.up,
                        name + ".alpha": torch.tensor(layer.alpha, dtype=layer.down.dtype)})
    return tensors


def xlabs(lora: L.LoRA) -> dict[str, torch.Tensor]:
    """x-flux's attention processors: the qkv/proj layers of the LoRA, the single-block qkv = linear1 rows 0:3H."""
    tensors = {}
    names = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
             "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}
    for key, layer in lora.layers.items():
        block, _, module = key.removeprefix("unet.").partition(".")
        index, _, module = module.partition(".")
        if block not in ("double_blocks", "single_blocks") or module not in names:
            continue
        up = layer.up[: 3 * layer.down.shape[1]] if module == "linear1" else layer.up  # q, k, v rows of 3H + 4H
        name = f"{block}.{index}.processor.{names[module]}"
        tensors.update({name + ".down.weight": layer.down, name + ".up.weight": up.contiguous()})
    return tensors


SPELLINGS = ("kohya", "comfyui", "diffusers", "onetrainer", "lycoris_", "diffsynth", "bfl-bare", "fal",
             "fal-all", "peft", "xlabs")


def peft_suffixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya suffixes as lora_A/lora_B, alphas left out (alpha = rank)."""
    return {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v
            for k, v in tensors.items() if not k.endswith(".alpha")}


def spelling_files(lora: L.LoRA, folder: Path, spellings: list[str]) -> None:
    diffusers, diffusers_meta = write_lora(lora, "diffusers")
    comfy, comfy_meta = write_lora(lora, "comfyui")
    bare = {k.removeprefix("transformer."): v for k, v in diffusers.items()}
    bfl = peft_suffixes({k.removeprefix("diffusion_model."): v for k, v in comfy.items()})
    makers = {
        "kohya": lambda: write_lora(lora, "kohya"),
        "comfyui": lambda: (comfy, comfy_meta),
        "diffusers": lambda: (diffusers, diffusers_meta),
        "onetrainer": lambda: (kohya_flat("lora_transformer_", diffusers_layers(lora)), {}),
        "lycoris_": lambda: (kohya_flat("lycoris_", diffusers_layers(lora)), {}),
        "diffsynth": lambda: (bare, {}),
        "bfl-bare": lambda: (bfl, {}),  # BFL control LoRAs' names, without their norm/bias extras
        # fal's Kontext trainer: the modules diffusers' fal converter reads (blocks, final_layer.linear), and all
        "fal": lambda: ({"base_model.model." + k: v for k, v in bfl.items()
                         if "_blocks." in k or k.startswith("final_layer.linear.")}, {}),
        "fal-all": lambda: ({"base_model.model." + k: v for k, v in bfl.items()}, {}),
        "peft": lambda: ({"base_model.model." + k: v for k, v in bare.items()}, {}),  # PEFT's save_pretrained
        "xlabs": lambda: (xlabs(lora), {}),
    }
    for name in spellings:
        tensors, meta = makers[name]()
        io.save_state_dict(folder / f"{name}.safetensors", tensors, meta, overwrite=True)


def write_files(conn, rank: int, dtype: torch.dtype, folder: str, spellings: list[str]) -> None:
    """In a child process, so that this one never holds the LoRA (its freed heap would hide the children's use)."""
    torch.set_num_threads(1)
    spelling_files(synthetic_lora(rank, dtype), Path(folder), spellings)
    conn.send(True)


# --- load + convert -----------------------------------------------------------------------------------------------


def ours(path: Path) -> dict[str, torch.Tensor]:
    tensors, metadata = write_lora(load_lora(path), "diffusers")
    tensors[ADAPTER_METADATA] = metadata.get(ADAPTER_METADATA, "")  # for the ΔW check only
    return tensors


def theirs(path: Path) -> dict[str, torch.Tensor]:
    from diffusers.loaders import FluxLoraLoaderMixin

    return FluxLoraLoaderMixin.lora_state_dict(str(path))


def first_read(tensors: dict[str, torch.Tensor]) -> None:
    """One byte of every page of every tensor: maps in what a mapped file has not read yet."""
    for t in tensors.values():
        if isinstance(t, torch.Tensor) and t.numel() and t.is_contiguous():
            t.reshape(-1).view(torch.uint8)[::PAGE].sum()


def modules(tensors: dict[str, torch.Tensor], prefix: str = "transformer.") -> set[str]:
    return {k.split(".lora_A.")[0] for k in tensors if k.startswith(prefix) and ".lora_A." in k}


def unprefixed(tensors: dict[str, torch.Tensor]) -> set[str]:
    """Modules outside any diffusers component: ``load_lora_weights`` keeps only ``transformer.``/``text_encoder.``."""
    return {k.split(".lora_A.")[0] for k in tensors
            if ".lora_A." in k and not k.startswith(("transformer.", "text_encoder."))}


def account(mine: dict, got: dict) -> dict:
    """How diffusers' modules compare with ours: in common, named by no module of ours, outside any component."""
    ours_m, theirs = modules(mine), modules(got)
    return {"common": len(ours_m & theirs), "ours": len(ours_m), "unknown": len(theirs - ours_m),
            "unprefixed": len(unprefixed(got))}


def peft_scales(adapter_metadata: str) -> Callable[[str, int], float]:
    """alpha/rank of a ``transformer.`` module from a ``lora_adapter_metadata`` JSON (none: alpha = rank)."""
    config = json.loads(adapter_metadata) if adapter_metadata else {}
    alpha = config.get("transformer.lora_alpha")
    pattern = config.get("transformer.alpha_pattern") or {}

    def scale(module: str, rank: int) -> float:
        a = pattern.get(module.removeprefix("transformer."), alpha)
        return 1.0 if a is None else a / rank

    return scale


def inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    """<B1·A1, B2·A2> (Frobenius) from the factors alone: tr((B1ᵀB2)(A2A1ᵀ)), no ΔW formed."""
    a1, b1, a2, b2 = (t.double() for t in (a1, b1, a2, b2))
    return float(torch.trace((b1.T @ b2) @ (a2 @ a1.T)))


def delta_diff(mine: dict, ref: dict, ref_scale: Callable[[str, int], float]) -> tuple[float | None, list[str]]:
    """Worst ‖ΔW_ref − ΔW_ours‖_F / ‖ΔW_ours‖_F over the modules both have, and the modules off by more than 1e-3."""
    my_scale = peft_scales(mine[ADAPTER_METADATA])
    loose = unprefixed(ref)  # load_lora_weights would drop these; their values are checked all the same
    ref = {("transformer." + k if k.split(".lora_")[0] in loose else k): v for k, v in ref.items()}
    worst, off = None, []
    for m in sorted(modules(mine) & modules(ref)):
        a1, b1 = mine[m + ".lora_A.weight"], mine[m + ".lora_B.weight"]
        a2, b2 = ref[m + ".lora_A.weight"], ref[m + ".lora_B.weight"]
        s1, s2 = my_scale(m, a1.shape[0]), ref_scale(m, a2.shape[0])
        mine_sq = s1 * s1 * inner(a1, b1, a1, b1)
        diff_sq = mine_sq + s2 * s2 * inner(a2, b2, a2, b2) - 2 * s1 * s2 * inner(a1, b1, a2, b2)
        err = math.sqrt(max(diff_sq, 0.0) / max(mine_sq, 1e-300))
        worst = err if worst is None else max(worst, err)
        if err > 1e-3:
            off.append(m.removeprefix("transformer."))
    return worst, off


def measure(conn, side: str, path: str, repeats: int) -> None:
    """Child process: times and peak of one side on one file; the diffusers side also checks against ours."""
    torch.set_num_threads(1)
    path = Path(path)
    fn = ours if side == "ours" else theirs
    import diffusers.utils.logging

    diffusers.utils.logging.set_verbosity_error()
    result: dict = {}
    before = maxrss_mb()
    try:
        start = time.process_time()
        got = fn(path)
        times = [time.process_time() - start]
    except Exception as err:  # diffusers refusing a spelling is a result, not a failure of the benchmark
        conn.send({"error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"})
        return
    result["peak"] = maxrss_mb() - before
    start = time.process_time()
    first_read(got)
    result["read"] = time.process_time() - start
    result["peak_read"] = maxrss_mb() - before
    for _ in range(repeats - 1):
        del got
        start = time.process_time()
        got = fn(path)
        times.append(time.process_time() - start)
    result["seconds"] = sorted(times)[len(times) // 2]
    if side != "ours":
        mine = ours(path)
        result["modules"] = account(mine, got)
        result["empty"] = not got
        file_keys = set(io.read_safetensors_header(path)[0]) - {"__metadata__"}
        passthrough = set(got) == file_keys  # not converted: alphas are still in the file's metadata
        file_meta = io.read_safetensors_header(path)[0].get("__metadata__", {})
        scale = peft_scales(file_meta.get(ADAPTER_METADATA, "")) if passthrough else (lambda m, r: 1.0)
        result["passthrough"] = passthrough
        result["delta"], result["off"] = delta_diff(mine, got, scale)
    conn.send(result)


def in_child(ctx, target, *args):
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:
        proc.join()
        result = {"error": f"child died (exit code {proc.exitcode})"}
    proc.join()
    return result


def mb(value: float) -> str:
    return f"{value:.0f}"


def ratio(a: float, b: float, floor: float) -> str:
    return f"{a / b:.2f}×" if b > floor else "—"


def diffusers_says(res: dict) -> str:
    if "error" in res:
        return f"refused: {res['error']}"
    if res["empty"]:
        return "returned an empty state dict"
    return "returned as stored" if res["passthrough"] else "converted"


def module_note(m: dict) -> str:
    text = f"{m['common']} / {m['ours']}"
    if m["unknown"]:
        text += f", +{m['unknown']} names not in the model"
    if m["unprefixed"]:
        text += f", {m['unprefixed']} without `transformer.`"
    return text


def run_load(ctx, folder: Path, spellings: list[str], repeats: int) -> None:
    out("| spelling | ours s | diffusers s | ours / diffusers | + first read s | ours peak MB | diffusers peak MB "
        "| ours / diffusers | after first read MB | diffusers result | modules as ours (diffusers / ours) "
        "| ΔW rel. diff, worst module |")
    out("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |")
    for name in spellings:
        path = str(folder / f"{name}.safetensors")
        mine = in_child(ctx, measure, "ours", path, repeats)
        ref = in_child(ctx, measure, "diffusers", path, repeats)
        if "error" in mine:
            out(f"| {name} | ours failed: {mine['error']} |")
            continue
        if "error" in ref:
            out(f"| {name} | {mine['seconds']:.2f} | — | — | — | {mb(mine['peak'])} | — | — | — | "
                f"{diffusers_says(ref)} | — | — |")
            continue
        delta = "—" if ref["delta"] is None else f"{ref['delta']:.1e}"
        if ref["off"]:
            delta += f" ({len(ref['off'])} off: {', '.join(ref['off'][:3])}{' …' if len(ref['off']) > 3 else ''})"
        out(f"| {name} | {mine['seconds']:.2f} | {ref['seconds']:.2f} | {ratio(mine['seconds'], ref['seconds'], 1e-3)} "
            f"| {ref['read']:.2f} | {mb(mine['peak'])} | {mb(ref['peak'])} | {ratio(mine['peak'], ref['peak'], 1)} "
            f"| {mb(ref['peak_read'])} | {diffusers_says(ref)} | {module_note(ref['modules'])} | {delta} |")


# --- resize: kohya's dense method (networks/resize_lora.py), reimplemented on our LoRA value ------------------------


def kohya_resize(lora: L.LoRA, rank: int) -> dict[str, torch.Tensor]:
    """ΔW of each layer after kohya's resize to a fixed ``rank`` (fp32 factors, not cast back)."""
    deltas = {}
    for key, layer in lora.layers.items():
        weight = layer.up.float() @ layer.down.float()  # merge_linear: (out, in)
        U, S, Vh = torch.linalg.svd(weight)  # extract_linear: full_matrices=True, as kohya calls it
        k = min(rank, len(S))
        up, down = U[:, :k] @ torch.diag(S[:k]), Vh[:k]
        deltas[key] = (up @ down) * layer.scale  # new alpha = scale·k: the resized layer keeps the scale
        del weight, U, S, Vh
    return deltas


def run_resize(path: Path, ref_layers: str, repeats: int) -> None:
    lora = load_lora(path)
    keys = {"few": FEW, "each": tuple(one_of_each(flux1_shapes())), "all": tuple(lora.layers)}[ref_layers]
    subset = L.filter_layers(lora, lambda k: k in keys)
    torch.linalg.svd(torch.randn(8, 8))  # load LAPACK before any timing
    torch.linalg.qr(torch.randn(8, 8))
    full = median_cpu_seconds(lambda: resize(lora, NEW_RANK, dtype=torch.float32), repeats)
    small = median_cpu_seconds(lambda: resize(subset, NEW_RANK, dtype=torch.float32), repeats)
    result, _ = resize(subset, NEW_RANK, dtype=torch.float32)
    start = time.process_time()
    ref = kohya_resize(subset, NEW_RANK)
    dense = time.process_time() - start
    worst_key, worst = None, -1.0
    for key, want in ref.items():
        err = float((result[key].delta(torch.float32) - want).abs().max() / want.abs().max())
        if err > worst:
            worst_key, worst = key, err
    shapes = sorted({tuple(lo.delta_shape) for lo in subset.layers.values()}, reverse=True)
    out(f"| resize {lora[next(iter(lora.layers))].rank} → {NEW_RANK}, {len(subset.layers)} layers "
        f"({', '.join('×'.join(map(str, s)) for s in shapes)}) | {small:.3f} | {dense:.1f} | {dense / small:,.0f}× "
        f"| {worst:.1e} ({worst_key}) |")
    out(f"| resize {lora[next(iter(lora.layers))].rank} → {NEW_RANK}, all {len(lora.layers)} layers | {full:.2f} "
        f"| not run | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spellings", default=",".join(SPELLINGS), help=f"comma-separated subset of {SPELLINGS}")
    parser.add_argument("--ref-layers", choices=("few", "each", "all"), default="few",
                        help="layers the dense reference resizes: few (6, <1 min), each (23, ~10 min), all (hours)")
    parser.add_argument("--no-resize", action="store_true")
    args = parser.parse_args()
    spellings = [s.strip() for s in args.spellings.split(",") if s.strip()]
    unknown = set(spellings) - set(SPELLINGS)
    if unknown:
        parser.error(f"unknown spelling(s) {sorted(unknown)}; choose from {', '.join(SPELLINGS)}")
    torch.set_num_threads(1)
    import diffusers
    from diffusers.loaders import FluxLoraLoaderMixin  # noqa: F401  (imported before forking, for the children)

    ctx = multiprocessing.get_context("fork")  # children start with the imports done and nothing big held
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    started = time.perf_counter()
    shapes = flux1_shapes()
    size = sum(o + i for o, i in shapes.values()) * args.rank * dtype.itemsize
    out(f"FLUX.1-dev-shaped LoRA: {len(shapes)} layers (every transformer Linear), rank {args.rank}, alpha "
        f"{args.rank / 2:g}, {args.dtype}, {size / 2**20:.0f} MiB; torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, {torch.get_num_threads()} thread; CPU seconds, median of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="flux1-bench-") as tmp:
        folder = Path(tmp)
        in_child(ctx, write_files, args.rank, dtype, tmp, spellings)
        out()
        out("Load + convert to diffusers layout (ours: load_lora + write_lora 'diffusers'; diffusers: "
            "FluxLoraLoaderMixin.lora_state_dict)")
        out()
        run_load(ctx, folder, spellings, args.repeats)
        if not args.no_resize and "kohya" in spellings:
            out()
            out(f"Resize to rank {NEW_RANK} of the kohya file (ours: lora_ops.resize, median of {args.repeats}; "
                "reference: kohya's dense ΔW + full torch.linalg.svd, once, on the layers named)")
            out()
            out("| task | ours s | dense ref s | ref / ours | max rel. ΔW diff (worst layer) |")
            out("| --- | ---: | ---: | ---: | --- |")
            run_resize(folder / "kohya.safetensors", args.ref_layers, args.repeats)
    out()
    out(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
