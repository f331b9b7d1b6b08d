"""Bake LoRAs into a model checkpoint on disk: W' = W + Σ s·ΔW, streamed tensor by tensor.

Why streaming: an SDXL checkpoint is 7 GB in fp16 and 14 GB in fp32; loading it, patching it and saving it (what
ComfyUI's CheckpointSave does) needs the whole model in memory at least once, often twice, and writes fp32 on CPU.
Here the output header is computed from the input header alone, written first, and each tensor's bytes follow
(`lora_ops.streaming`): tensors no LoRA touches are copied byte for byte, patched ones are read, patched and
written a block of rows at a time. Peak memory is a few fixed blocks plus the fp64 factors of the layers patching
the current tensor, whatever the size of the model.

Why fp64 for the add: the result is rounded once, to the output dtype, so it is the correctly rounded
W + Σ s·ΔW (fp32 accumulation would lose up to a few fp32 ulps where W and ΔW nearly cancel). Blocks keep the
fp64 temporaries small. Low-rank layers never form ΔW: each block of rows is ``up[rows] @ down`` (LoHa and LoKr
are row-sliced the same way); only a transposed slot (OpenCLIP ``text_projection``) forms its small dense ΔW.

FLUX.1 single files (BFL names, top level as ``flux1-dev.safetensors`` or under ``model.diffusion_model.``) are
baked the same way. Their q/k/v (and a single block's mlp) projections are fused into one tensor
(``img_attn.qkv``, ``linear1``): a whole-weight layer (kohya, ComfyUI files) patches all its rows, and a layer
on one part (``unet.X[q]``: diffusers-format files) patches only that part's rows of the fused tensor, in place —
what `lora_ops.fused.fuse` followed by a whole-weight bake would write, without forming its block-diagonal up
(so LoHa/LoKr part layers bake too, and the result is still rounded once). The part's rows come from the
stored tensor's shape and the family's `FusedWeight`, so any width works.

Z-Image single files come in two layouts: ComfyUI's names fuse q, k, v into ``attention.qkv`` (baked as FLUX.1's
fused weights), the official names store ``to_q``, ``to_k``, ``to_v`` apart (`checkpoint_targets` gives them part
keys). There a whole-qkv layer (kohya, ComfyUI files) patches each part tensor with that part's rows of its ΔW
(row-sliced as above, so exact whatever the layer kind, and still rounded once per element), and a part layer
patches its own tensor only.

Why atomic: a crash or a refusal (NaN/Inf result, full disk) must leave no partial output. Bytes go to a hidden
temp file (or temp folder, for diffusers folders) beside the target, are fsynced, then ``os.replace``-d into place
(`lora_ops.atomic`); any failure removes the temp and leaves the target as it was, and the temps a killed run
left are swept by the next save into that folder. The input can never be the output, whatever the
spelling (symlinks, ``..``, hard links, a folder that contains it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from . import atomic, families, fused, io, streaming
from .coverage import CoverageReport, combine_reports
from .errors import LoraFileError, LoraOpsError, LoraValueError
from .hosts.base import ApplyItem, check_items, is_item, strength_for
from .keymap.checkpoints import COMPONENTS, WeightSlot, checkpoint_family, checkpoint_targets
from .lora import Layer, LoRA, LoRALayer, LycorisLayer, part_of

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Shape = tuple[int, ...]

DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}
"""Output dtype choices for floating tensors; "keep" writes each tensor in its input dtype."""

_ST_NAME = {dt: name for name, (dt, _bits) in io.SAFETENSORS_DTYPES.items()}
# Dtypes that hold real numbers the add and a cast can work on (not ints, packed fp4 or the e8m0 scale format).
_NUMERIC = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ"})
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_GROUPS_SHOWN = 6


@dataclass(frozen=True)
class BakeReport:
    """What `bake` wrote.

    ``files``: the weight files baked (relative to the folder for a diffusers folder). ``patched``: the tensors
    that changed (``file:name`` in a folder). ``layers``: LoRA layers baked in (zero strengths skipped).
    ``coverage``: which LoRA layers found a weight; with ``strict=False`` its ``unmatched`` lists what was left out.
    """

    output: Path
    family: str
    dtype: str
    files: tuple[str, ...]
    tensors: int
    patched: tuple[str, ...]
    layers: int
    bytes_written: int
    coverage: CoverageReport = field(repr=False)

    @property
    def unmatched(self) -> Mapping[str, tuple[str, ...]]:
        return self.coverage.unmatched

    def summary(self) -> str:
        """One line for a log, the CLI or a node output."""
        text = (
            f"baked {self.layers} LoRA layers into {len(self.patched)} of {self.tensors} tensors → {self.output} "
            f"({self.dtype}, {self.bytes_written / 2**20:.1f} MiB)"
        )
        if self.coverage.unmatched_count:
            text += f"; {self.coverage.unmatched_count} layers had no weight: {_groups_text(self.coverage.unmatched)}"
        return text


# ------------------------------------------------------------------------------------------------- the sources


@dataclass
class _Source:
    """One safetensors weight file of the checkpoint, with its validated header."""

    path: Path
    rel: str
    header: dict
    data_start: int
    component: str | None  # diffusers-folder component, None for a single file

    @property
    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def info(self, name: str) -> dict:
        return self.header[name]


def _open_source(path: Path, rel: str, component: str | None) -> _Source:
    header, data_start = io.read_safetensors_header(path)
    return _Source(path, rel, header, data_start, component)


def _folder_sources(root: Path) -> tuple[list[_Source], set[Path]]:
    """The weight files of a diffusers folder's unet / text encoders, and the stale pickles to leave out.

    A pickle (.bin) beside a .safetensors of the same component would be copied unbaked while diffusers loads
    the baked .safetensors, or the reverse with ``use_safetensors=False``: leaving it out avoids two
    disagreeing copies of one model.
    """
    sources, stale = [], set()
    for component in COMPONENTS:
        folder = root / component
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file())
        weights = [p for p in files if p.name.endswith(".safetensors")]
        sources += [_open_source(p, p.relative_to(root).as_posix(), component) for p in weights]
        if weights:
            stale |= {p for p in files if p.name.endswith(_PICKLE_SUFFIXES)}
    if not sources:
        raise LoraFileError(
            "folder holds no .safetensors weights in unet/, text_encoder/ or text_encoder_2/",
            file=root,
            hint="give a single-file .safetensors checkpoint or a diffusers pipeline folder",
        )
    return sources, stale


def _refuse_dit_folder(root: Path) -> None:
    """A diffusers folder with ``transformer/`` (FLUX.1: its ``text_encoder_2/`` is T5, not SDXL's CLIP-G)."""
    if (root / "transformer").is_dir() and not (root / "unet").is_dir():
        raise LoraFileError(
            "diffusers folders of transformer (DiT) models such as FLUX.1 are not supported",
            file=root,
            hint="bake into the single-file checkpoint (e.g. flux1-dev.safetensors) instead",
        )


def _detect_family(sources: Sequence[_Source], checkpoint: Path) -> str:
    if any(s.component == "text_encoder_2" for s in sources):
        return "sdxl"
    family = checkpoint_family(k for s in sources if s.component in (None, "unet") for k in s.names)
    if family is None:
        raise LoraValueError(
            "cannot tell the model family from the checkpoint's tensor names", file=checkpoint, hint="pass family="
        )
    return family


def _refuse_other_family(items: Sequence[ApplyItem], family: str, checkpoint: Path) -> None:
    """A LoRA for another family (a FLUX.1 LoRA on an SDXL checkpoint, or the reverse): one error naming both,
    before any matching.

    Refused when none of its denoiser modules exists in the checkpoint's family but another family knows them, or
    when its family (its own, else what its paths say) differs and it has modules the checkpoint's family lacks but
    that family has: Z-Image and FLUX.1 share the names ``final_layer.linear`` / ``final_layer.adaLN_modulation.1``,
    so a Z-Image LoRA is still refused on FLUX.1. Between two SD-style UNets (one LDM name space, SD 1.x and SDXL)
    only the first rule applies: the modules they share go on to the shape checks, which name the layers.
    """
    model = families.get(family)
    for n, item in enumerate(items):
        if not is_item(item):
            continue  # check_items says what is wrong with it
        lora = item[0]
        paths = {fused.parse_key(k)[0].removeprefix("unet.") for k in lora.layers if part_of(k) == "unet"}
        foreign = sorted(p for p in paths if not model.knows(p))
        if not foreign:
            continue
        own = lora.family if lora.family is not None else families.detect(paths)
        other = own is not None and own != family
        telling = other and _not_both_unets(model, own) and any(families.get(own).knows(p) for p in foreign)
        if not telling and len(foreign) < len(paths):
            continue  # some modules exist here: the coverage report lists the rest
        # its own family (or the one its paths say), else every family that knows one of them
        others = [own] if other else sorted(set().union(*(families.candidates(p) for p in paths)))
        if not others:
            continue  # names no family knows: the coverage report lists them
        theirs = " or ".join(families.label(o) for o in others)
        missing = (f"none of its {len(paths)} denoiser modules exists" if len(foreign) == len(paths)
                   else f"{len(foreign)} of its {len(paths)} denoiser modules do not exist (e.g. {foreign[0]})")
        raise LoraValueError(
            f"LoRA {n + 1} is for {theirs}, the checkpoint is {model.label}: {missing} in the {model.label} model; "
            "nothing was written",
            file=checkpoint,
            hint=f"bake it into a {theirs} checkpoint, or use a LoRA made for {model.label}",
        )


def _not_both_unets(model: families.Family, other: str) -> bool:
    return model.unet_layout is None or families.get(other).unet_layout is None


def _with_family(lora: LoRA, family: str) -> LoRA:
    """Part keys need a family to place their rows: a LoRA that names none takes the checkpoint's."""
    return lora.replace(family=family) if lora.family is None and fused.has_parts(lora) else lora


def _refuse_scaled_fp8(source: _Source, names: Sequence[str], cast: bool) -> None:
    """ComfyUI's "scaled fp8" files store W / scale: adding ΔW to (or casting) the stored value would be wrong."""
    scaled = "scaled_fp8" in source.header
    for name in names:
        if scaled or (name.endswith(".weight") and name[: -len(".weight")] + ".scale_weight" in source.header):
            raise LoraValueError(
                "scaled-fp8 checkpoints are not supported (the stored values are not the weights)",
                file=source.path,
                key=name,
                hint="bake into the fp16/bf16 checkpoint instead",
            )
    if scaled and cast:
        raise LoraValueError("cannot change the dtype of a scaled-fp8 checkpoint", file=source.path)


# ------------------------------------------------------------------------------------------------- the deltas


def _loha_part(t: Tensor | None, a: Tensor, b: Tensor, i: int, j: int) -> Tensor:
    """Rows i:j of one Hadamard factor: a @ b, or LyCORIS's Tucker form (a is then (r, out))."""
    if t is None:
        return a[i:j] @ b  # (rows, in·kh·kw)
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a[:, i:j]).flatten(1)  # (rows, in·kh·kw)


Adder = Callable[[Tensor, int, int, float], None]


def _adder(layer: Layer) -> Adder:
    """``add(acc, i, j, s)``: acc += s · ΔW[i:j] (ΔW flattened to (out, rest), fp64, alpha/r included).

    A plain LoRA adds ``up[i:j] @ down`` straight into acc (one BLAS call, no temporary); LoHa and LoKr form only
    the rows asked for.
    """
    f64 = torch.float64
    scale = layer.scale
    if isinstance(layer, LoRALayer):
        up = layer.up.to(f64).flatten(1)  # (out, r)
        down = layer.down.to(f64)
        if layer.mid is not None:  # fold the Tucker core into down: (r, in, kh, kw)
            down = torch.einsum("ijkl,jc->ickl", layer.mid.to(f64), down.flatten(1))
        core = down.flatten(1)  # (r, in·kh·kw)
        return lambda acc, i, j, s: acc.addmm_(up[i:j], core, alpha=s * scale)
    if isinstance(layer, LycorisLayer) and layer.kind == "loha":
        p = {k: v.to(f64) for k, v in layer.parts.items()}

        def loha(acc: Tensor, i: int, j: int, s: float) -> None:
            w1 = _loha_part(p.get("hada_t1"), p["hada_w1_a"], p["hada_w1_b"], i, j)
            w2 = _loha_part(p.get("hada_t2"), p["hada_w2_a"], p["hada_w2_b"], i, j)
            acc.addcmul_(w1, w2, value=s * scale)

        return loha
    if isinstance(layer, LycorisLayer) and layer.kind == "lokr":
        p = {k: v.to(f64) for k, v in layer.parts.items()}
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]  # (a1, b1)
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:  # Tucker: (a2, b2, kh, kw)
            # contiguous: torch.kron views its inputs, which fails on this permuted einsum output
            w2 = torch.einsum("ijkl,jr,ip->prkl", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"]).contiguous()
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]  # (a2, b2)
        a2 = w2.shape[0]

        def lokr(acc: Tensor, i: int, j: int, s: float) -> None:
            first, last = i // a2, -(-j // a2)  # the rows of w1 whose Kronecker blocks cover i:j
            block = w1[first:last]
            if w2.ndim == 4:
                block = block[:, :, None, None]  # (a, b, 1, 1): kron over channel dims only
            rows = torch.kron(block, w2).flatten(1)[i - first * a2 : j - first * a2]  # (j-i, rest)
            acc.add_(rows, alpha=s * scale)

        return lokr
    dense = layer.delta(f64).flatten(1)  # any other layer kind: its dense ΔW, (out, rest)
    return lambda acc, i, j, s: acc.add_(dense[i:j], alpha=s)


@dataclass
class _Term:
    """One LoRA layer's contribution to one stored tensor: strength · ΔW into the slot's rows."""

    key: str
    layer: Layer
    strength: float
    slot: WeightSlot
    stored: Shape
    rows: tuple[int, int] | None = None  # (start, stop) of a fused weight's part (a ``unet.X[q]`` layer)
    offset: int = 0  # the layer's ΔW row at the slot's first row (a whole layer on a tensor holding one part)
    _add: Adder | None = None

    @property
    def span(self) -> tuple[int, int]:
        if self.rows is not None:
            return self.rows
        rows = self.slot.row_slice(self.stored)
        return (0, self.stored[0]) if rows is None else (rows.start, rows.stop)

    def add(self, acc: Tensor, i: int, j: int) -> None:
        """acc += strength · rows i:j (relative to the slot) of ΔW, in the stored orientation."""
        if self._add is None:
            if self.slot.transpose:  # a small dense ΔW (text_projection), stored transposed
                shape = self.slot.shape(self.stored)
                dense = self.layer.delta(torch.float64).reshape(shape).T.contiguous()
                self._add = lambda acc, i, j, s: acc.add_(dense[i:j], alpha=s)
            else:
                self._add = _adder(self.layer)
        self._add(acc, i + self.offset, j + self.offset, self.strength)

    def release(self) -> None:
        """Drop the fp64 factors once the tensor is written."""
        self._add = None


# ---------------------------------------------------------------------------------------------------- planning


def _groups_text(groups: Mapping[str, tuple[str, ...]]) -> str:
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    shown = "; ".join(
        f"{g}: {len(keys)} layer{'s' * (len(keys) != 1)} (e.g. {keys[0]})" for g, keys in ordered[:MAX_GROUPS_SHOWN]
    )
    more = f"; and {len(ordered) - MAX_GROUPS_SHOWN} more groups" if len(ordered) > MAX_GROUPS_SHOWN else ""
    return shown + more


Target = tuple[int, WeightSlot, str | None]
"""(source index, slot, part): the part of the fused weight the slot's tensor holds alone, None for all of it."""


def _targets(sources: Sequence[_Source], family: str) -> dict[str, list[Target]]:
    """Whole canonical key → every (source index, slot, part) holding that weight (fp16 and fp32 variants of a
    folder; one tensor per part where a file stores a fused weight's parts apart: Z-Image's ``to_q``, ``to_k``,
    ``to_v``)."""
    out: dict[str, list[Target]] = {}
    for idx, source in enumerate(sources):
        for key, slot in checkpoint_targets(source.names, family, component=source.component).items():
            module, part = fused.parse_key(key)
            out.setdefault(module, []).append((idx, slot, part))
    return out


def _shapes(sources: Sequence[_Source], targets: Mapping[str, list[Target]], family: str) -> dict[str, Shape]:
    """Whole canonical key → the weight's shape; a weight stored as part tensors is their stack (all parts needed)."""
    shapes: dict[str, Shape] = {}
    for key, slots in targets.items():
        found: set[Shape] = set()
        held = {part: [] for _, _, part in slots if part is not None}
        for i, slot, part in slots:
            shape = slot.shape(tuple(sources[i].info(slot.tensor)["shape"]))
            if part is None:
                found.add(shape)
            else:
                held[part].append(shape)
        if held:
            spec = families.get(family).fused_weight(key.removeprefix("unet."))  # checkpoint_targets: fused only
            found.add(fused.stacked_shape(spec, key, held, where="the checkpoint", error=LoraFileError))
        if len(found) > 1:
            raise LoraFileError(f"the files disagree on this weight's shape: {sorted(found)}", key=key)
        shapes[key] = found.pop()
    return shapes


def _part_span(family: str | None, key: str, stored: Shape) -> tuple[int, int] | None:
    """(start, stop) rows of the stored fused tensor that part key ``key`` patches; None for a whole-weight key."""
    rows = fused.part_rows(family, key, stored[0])
    return None if rows is None else (rows[0], rows[0] + rows[1])


def _held_offset(family: str, key: str, held: str, stored: Shape) -> int | None:
    """The row of layer ``key``'s ΔW at the first row of a tensor holding only part ``held`` of its fused weight:
    0 for a layer on that part, the part's first row for a whole layer, None for a layer on another part."""
    module, part = fused.parse_key(key)
    if part is not None:
        return 0 if part == held else None
    spec = families.get(family).fused_weight(module.removeprefix("unet."))
    return spec.rows(held, spec.unit_of_part(held, stored[0], key=key))[0]


def _plan(
    items: Sequence[ApplyItem],
    reports: Sequence[CoverageReport],
    sources: Sequence[_Source],
    targets: Mapping[str, list[Target]],
    family: str,
) -> tuple[dict[tuple[int, str], list[_Term]], int]:
    """(source index, tensor name) → terms, in LoRA order; and the number of layers baked.

    A part key (``unet.X[q]``) patches its rows of the whole weight ``unet.X``. Where the checkpoint stores the
    parts of ``unet.X`` as tensors of their own, a whole layer patches each with its rows and a part layer its own.
    """
    plan: dict[tuple[int, str], list[_Term]] = {}
    layers = 0
    for n, ((lora, sm, st), report) in enumerate(zip(items, reports)):
        for key in report.matched:
            strength = strength_for(key, sm, st)
            if strength == 0.0:
                continue
            layer = lora.layers[key]
            bad = io.find_non_finite(layer.tensors())
            if bad:
                raise LoraValueError(
                    f"LoRA {n + 1} holds NaN/Inf ({bad[0]}); nothing was written",
                    key=key,
                    hint="the LoRA file is broken; re-download or retrain it",
                )
            layers += 1
            for idx, slot, held in targets[fused.parse_key(key)[0]]:
                info = sources[idx].info(slot.tensor)
                stored = tuple(info["shape"])
                if held is None:
                    term = _Term(key, layer, float(strength), slot, stored, _part_span(lora.family, key, stored))
                else:
                    offset = _held_offset(family, key, held, stored)
                    if offset is None:
                        continue
                    term = _Term(key, layer, float(strength), slot, stored, offset=offset)
                if info["dtype"] not in _NUMERIC:
                    raise LoraValueError(
                        f"cannot add a LoRA to a {info['dtype']} tensor", file=sources[idx].path, key=slot.tensor
                    )
                plan.setdefault((idx, slot.tensor), []).append(term)
    return plan, layers


# ----------------------------------------------------------------------------------------------------- writing


def _out_dtype(info: dict, want: torch.dtype | None) -> str:
    return _ST_NAME[want] if want is not None and info["dtype"] in _NUMERIC else info["dtype"]


def _checker(terms: Sequence[_Term], name: str, path: Path) -> Callable[[Tensor], None]:
    def check(result: Tensor) -> None:
        probe = result.float() if result.element_size() == 1 else result
        if not bool(torch.isfinite(probe).all()):
            raise LoraValueError(
                f"baking would put NaN/Inf into this tensor ({terms[0].key}, {len(terms)} LoRA layers); "
                "nothing was written",
                file=path,
                key=name,
                hint="the LoRA is too strong for the weight's dtype, or the weight already holds NaN/Inf",
            )

    return check


def _patcher(terms: Sequence[_Term]) -> Callable[[Tensor, int, int], None]:
    """``add(acc, a, b)`` for rows a:b of the stored tensor: every term whose slot overlaps them, in LoRA order."""
    spans = [t.span for t in terms]

    def add(acc: Tensor, a: int, b: int) -> None:
        for term, (lo, hi) in zip(terms, spans):
            i, j = max(a, lo), min(b, hi)
            if i < j:
                term.add(acc[i - a : j - a], i - lo, j - lo)

    return add


def _bake_source(
    source: _Source,
    plan: Mapping[str, list[_Term]],
    want: torch.dtype | None,
    metadata: Mapping[str, str],
    out: BinaryIO,
    progress: bool,
) -> int:
    """Write one baked safetensors file to ``out``; returns the bytes written."""
    tensors = {name: source.info(name) for name in source.names}
    entries = streaming.layout(tensors, {k: _out_dtype(v, want) for k, v in tensors.items()})
    header = streaming.header_bytes(
        entries, {k: v["shape"] for k, v in tensors.items()}, {**source.header.get("__metadata__", {}), **metadata}
    )
    total = len(header) + (entries[-1][3] if entries else 0)
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc=source.rel, disable=not progress, leave=False) as bar,
        open(source.path, "rb") as f,
    ):
        writer = streaming.StreamWriter(out, bar)
        writer.write(header)
        for name, dtype, _begin, _end in entries:
            info = tensors[name]
            start, stop = info["data_offsets"]
            pos = source.data_start + start
            dtypes = (io.SAFETENSORS_DTYPES[info["dtype"]][0], io.SAFETENSORS_DTYPES[dtype][0])
            terms = plan.get(name)
            if terms:
                shape = tuple(info["shape"])
                writer.patch(f, pos, shape, dtypes, _patcher(terms), _checker(terms, name, source.path), source.path)
                for term in terms:
                    term.release()
            elif dtype == info["dtype"]:
                writer.copy(f, pos, stop - start, source.path)
            else:
                writer.cast(f, pos, math.prod(info["shape"]), dtypes, source.path)
    return writer.written


# -------------------------------------------------------------------------------------------------- the entry


def _refuse_input_as_output(src: Path, dst: Path) -> None:
    same = src == dst or dst.is_relative_to(src) or src.is_relative_to(dst)
    if not same and dst.exists():
        with contextlib.suppress(OSError):
            same = os.path.samefile(src, dst)  # hard links
    if same:
        raise LoraFileError(
            f"the output {dst} is (or contains, or lies inside) the input checkpoint; refusing to overwrite it",
            file=src,
            hint="write the baked checkpoint to a new file, then replace the original yourself if you want to",
        )


def _parse_dtype(dtype: str) -> torch.dtype | None:
    if dtype not in DTYPES:
        raise LoraValueError(f"unknown output dtype '{dtype}'", hint=f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def bake(
    checkpoint: str | os.PathLike,
    loras: Sequence[ApplyItem],
    out: str | os.PathLike,
    *,
    dtype: str = "keep",
    overwrite: bool = False,
    progress: bool = False,
    strict: bool = True,
    family: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> BakeReport:
    """Write ``checkpoint`` with the LoRAs baked in to ``out``: every weight W becomes W + Σ s·ΔW.

    ``checkpoint``: a single-file ``.safetensors`` (original/LDM names, as ComfyUI and A1111 save them; FLUX.1 in
    BFL names, top level or under ``model.diffusion_model.``; Z-Image in ComfyUI's or the official names) or an SD
    diffusers folder (``unet/``, ``text_encoder/``, ``text_encoder_2/`` are baked, every other file is copied).
    ``loras``: (LoRA, strength_model, strength_text) triples; text-encoder layers use strength_text.
    ``dtype``: "keep" (each tensor as stored), or "fp16" / "bf16" / "fp32" for every floating tensor.
    ``strict``: every LoRA layer must find its weight, else `LoraValueError` listing the unmatched keys by group;
    False bakes what matches (the report lists the rest). ``family``: a family id ("sd1", "sdxl", "flux1",
    "zimage" …), detected when None. Layers on part of a fused weight (``unet.X[q]``, as diffusers-format FLUX.1
    files hold them) patch that part's rows of the fused tensor; on a file that stores the parts apart (official
    Z-Image names), whole layers patch each part's tensor with its rows.
    ``metadata``: str→str entries added to the input's safetensors metadata.

    Refuses, with nothing written: ``out`` being the input (any spelling) or existing without ``overwrite``, DoRA
    layers, LoRA factors or results holding NaN/Inf, layers whose ΔW does not fit their weight's shape, a LoRA
    for another model family (the error names both).
    """
    if sys.byteorder != "little":
        raise LoraValueError("baking needs a little-endian machine (safetensors data is little-endian)")
    want = _parse_dtype(dtype)
    src, dst = io.resolve_path(checkpoint), io.resolve_path(out)
    if not src.exists():
        raise LoraFileError("checkpoint not found", file=src, hint="check the path")
    _refuse_input_as_output(src, dst)
    if dst.exists() and not overwrite:
        raise LoraFileError("output already exists", file=dst, hint="pass overwrite=True to replace it")
    if dst.exists() and dst.is_dir() != src.is_dir():
        kind = "folder" if dst.is_dir() else "file"
        raise LoraFileError(f"output is a {kind}, the checkpoint is not", file=dst, hint="choose another output path")
    extra = io.check_metadata(metadata, dst) or {}

    if src.is_dir():
        _refuse_dit_folder(src)
    sources, stale = _folder_sources(src) if src.is_dir() else ([_open_source(src, src.name, None)], set())
    fam = family or _detect_family(sources, src)
    targets = _targets(sources, fam)
    _refuse_other_family(loras, fam, src)  # before a LoRA without a family takes the checkpoint's
    loras = [(_with_family(it[0], fam), *it[1:]) if is_item(it) else it for it in loras]
    reports = check_items(loras, _shapes(sources, targets, fam), family=fam, min_fraction=0.0)
    coverage = combine_reports(reports)
    if coverage.unmatched and strict:
        raise LoraValueError(
            f"{coverage.unmatched_count} LoRA layers have no weight in this checkpoint "
            f"({_groups_text(coverage.unmatched)}); nothing was written",
            file=src,
            hint="check that the LoRA is for this model family, or pass strict=False to bake the layers that match",
        )
    if not coverage.matched:
        raise LoraValueError(
            "none of the LoRA layers has a weight in this checkpoint; nothing was written",
            file=src,
            hint="check that the LoRA is for this model family",
        )
    plan, layers = _plan(loras, reports, sources, targets, fam)
    by_source: list[dict[str, list[_Term]]] = [{} for _ in sources]
    for (idx, name), terms in plan.items():
        by_source[idx][name] = terms
    for source, terms in zip(sources, by_source):
        _refuse_scaled_fp8(source, list(terms), cast=want is not None)

    written = _write(src, dst, sources, by_source, stale, want, extra, progress)
    patched = tuple(
        (name if s.component is None else f"{s.rel}:{name}") for s, terms in zip(sources, by_source) for name in terms
    )
    report = BakeReport(
        output=dst,
        family=fam,
        dtype=dtype,
        files=tuple(s.rel for s in sources),
        tensors=sum(len(s.names) for s in sources),
        patched=patched,
        layers=layers,
        bytes_written=written,
        coverage=coverage,
    )
    log.info("%s", report.summary())
    return report


def _write(
    src: Path,
    dst: Path,
    sources: Sequence[_Source],
    plans: Sequence[Mapping[str, list[_Term]]],
    stale: set[Path],
    want: torch.dtype | None,
    metadata: Mapping[str, str],
    progress: bool,
) -> int:
    """Everything into a temp beside ``dst`` (`lora_ops.atomic.atomic_write`), fsynced, then swapped in; on any
    failure the temp is removed and ``dst`` is left as it was."""
    folder = src.is_dir()
    entered = False
    try:
        with atomic.atomic_write(dst, folder=folder) as tmp:
            entered = True
            if folder:
                written = _write_folder(src, tmp, sources, plans, stale, want, metadata, progress)
            else:
                with open(tmp, "wb") as out:
                    written = _bake_source(sources[0], plans[0], want, metadata, out, progress)
    except Exception as err:
        if isinstance(err, LoraOpsError):
            raise
        if not entered:
            raise LoraFileError(f"cannot create the output ({io.one_line(err)})", file=dst) from None
        raise LoraFileError(
            f"cannot write the baked checkpoint ({io.one_line(err)}); nothing was changed", file=dst
        ) from err
    return written


def _write_folder(
    src: Path,
    tmp: Path,
    sources: Sequence[_Source],
    plans: Sequence[Mapping[str, list[_Term]]],
    stale: set[Path],
    want: torch.dtype | None,
    metadata: Mapping[str, str],
    progress: bool,
) -> int:
    """Bake the weight files and copy everything else (configs, tokenizers, scheduler, VAE) into ``tmp``."""
    baked = {s.path: (s, plan) for s, plan in zip(sources, plans)}
    written = 0
    for dirpath, _dirs, files in os.walk(src, followlinks=True):
        for file_name in sorted(files):
            path = Path(dirpath) / file_name
            target = tmp / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path in stale:
                log.warning("left out %s: a pickle beside the baked .safetensors would hold the unbaked weights", path)
                continue
            if path in baked:
                source, plan = baked[path]
                with open(target, "wb") as out:
                    written += _bake_source(source, plan, want, metadata, out, progress)
            else:
                shutil.copyfile(path, target)  # follows symlinks (Hugging Face cache snapshots link to blobs)
                written += target.stat().st_size
    return written
