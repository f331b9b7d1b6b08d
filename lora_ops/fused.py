"""Layers on fused weights: row-slice keys, and the exact conversions between split and fused layers.

A fused weight stacks several projections by rows (FLUX.1 ``img_attn.qkv`` = [q; k; v]). A LoRA file may update
it whole (kohya, ComfyUI: ``…qkv``) or per part (diffusers: ``to_q``, ``to_k``, ``to_v``), so a LoRA value holds
either a whole layer under ``unet.<module>`` or part layers under ``unet.<module>[<part>]`` whose rows the
family's `FusedWeight` gives. Both conversions are exact in ΔW:

- `fuse`: parts → one layer. down = cat(down_i), up = block-diagonal(up_i) placed at each part's rows; rank
  Σ r_i. alpha is chosen so the scale is unchanged (α' = s·Σr_i when every part has the scale s, else the
  scales are folded into up and α' = Σ r_i). This is what kohya and ComfyUI read.
- `split`: one layer → parts. When up's part row blocks use disjoint columns (a block-diagonal up: our own
  fused output, kohya ``split_qkv`` files) each part keeps only its columns, so the original ranks come back;
  otherwise every part shares down and takes its rows of up (rank unchanged, as diffusers' own converter does).

LoHa/LoKr layers cannot be split or fused exactly (a Hadamard/Kronecker product has no row blocks of the same
form) and are refused with a message saying which format keeps them whole.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import torch

from . import families
from .errors import LoraFormatError
from .lora import Layer, LoRA, LoRALayer
from .part_keys import parse_key, part_key

Tensor = torch.Tensor




def part_rows(family: str | None, key: str, weight_rows: int) -> tuple[int, int] | None:
    """``(start, length)`` of the rows part key ``key`` patches in its fused weight of ``weight_rows`` rows, from the
    family's `FusedWeight` (no widths assumed); None for a whole-weight key. Raises `LoraFormatError` when the
    weight is not a fused weight of ``family``, the part is not one of its parts, or the rows do not split."""
    module, part = parse_key(key)
    if part is None:
        return None
    spec = _fused_weight(family, module, key)
    return spec.rows(spec.part(part).name, spec.unit_of_weight(weight_rows, key=key))


def stacked_shape(spec: families.FusedWeight, key: str, parts: Mapping[str, Iterable[tuple[int, ...]]], *,
                  where: str, error: type[LoraFormatError] = LoraFormatError) -> tuple[int, ...]:
    """The shape of fused weight ``key`` that ``where`` (a model, a checkpoint) holds as one tensor per part.

    ``parts``: part name → the shapes seen for it (several when a folder has fp16 and fp32 copies). Every part is
    needed and all must stack; otherwise ``error`` names what is missing or what does not fit.
    """
    parts = {p: list(shapes) for p, shapes in parts.items()}
    missing = sorted({p.name for p in spec.parts} - set(parts))
    if missing:
        raise error(f"{where} holds parts {sorted(parts)} of this weight but not {missing}", key=key,
                    hint="it is incomplete, or mixes two models")
    units = {spec.unit_of_part(p, s[0], key=part_key(key, p)) for p, shapes in parts.items() for s in shapes}
    rest = {s[1:] for shapes in parts.values() for s in shapes}
    if len(units) > 1 or len(rest) > 1:
        shown = ", ".join(f"{p}: {sorted(set(s))}" for p, s in sorted(parts.items()))
        raise error(f"the part tensors {where} holds do not stack into one weight", key=key, hint=shown)
    return (units.pop() * spec.total, *rest.pop())


def has_parts(lora: LoRA) -> bool:
    return any(parse_key(k)[1] is not None for k in lora.layers)


def _fused_weight(lora_family: str | None, module_key: str, key: str) -> families.FusedWeight:
    if lora_family is None:
        raise LoraFormatError("a layer on part of a fused weight needs the model family to place its rows",
                              key=key, hint="pass family=")
    path = module_key.removeprefix("unet.")
    spec = families.get(lora_family).fused_weight(path) if module_key.startswith("unet.") else None
    if spec is None:
        raise LoraFormatError(f"'{path}' is not a fused weight of {families.label(lora_family)}", key=key)
    return spec


def _plain(layer: Layer, key: str, action: str) -> LoRALayer:
    if not isinstance(layer, LoRALayer):
        if action == "fused":
            raise LoraFormatError(
                f"a LyCORIS {layer.kind} layer on one part of a fused weight cannot be fused into it exactly",
                key=key, hint="it applies and bakes as it is (on its rows); keep the file in its own names",
            )
        raise LoraFormatError(
            f"a LyCORIS {layer.kind} layer on a fused weight cannot be {action} exactly",
            key=key, hint="write it in kohya or comfyui format (fused names), which keep it whole",
        )
    if layer.mid is not None or layer.dora_scale is not None or layer.is_conv:
        raise LoraFormatError(f"a Tucker/DoRA/conv layer on a fused weight cannot be {action} exactly", key=key)
    return layer


def _unit(spec: families.FusedWeight, members: Iterable[tuple[str | None, LoRALayer, str]]) -> int:
    """The fused weight's unit (rows per relative size), the same from every member or an error."""
    units = {}
    for part, layer, key in members:
        rows = int(layer.up.shape[0])
        units[key] = spec.unit_of_weight(rows, key=key) if part is None else spec.unit_of_part(part, rows, key=key)
    if len(set(units.values())) > 1:
        shown = ", ".join(f"{k}: {u}" for k, u in sorted(units.items()))
        raise LoraFormatError(f"parts of one fused weight imply different widths ({shown})", key=min(units))
    return next(iter(units.values()))


def fuse_layers(spec: families.FusedWeight, members: list[tuple[str | None, LoRALayer, str]]) -> LoRALayer:
    """One whole-weight layer whose ΔW is the sum of ``members`` (part or whole layers) placed at their rows."""
    unit = _unit(spec, members)
    ins = {int(layer.down.shape[1]) for _, layer, _ in members}
    if len(ins) > 1:
        raise LoraFormatError(f"parts of one fused weight have different input widths {sorted(ins)}",
                              key=members[0][2])
    scales = {layer.scale for _, layer, _ in members}
    uniform = len(scales) == 1
    dtype = torch.float32 if not uniform else members[0][1].up.dtype
    for _, layer, _ in members:
        dtype = torch.promote_types(dtype, torch.promote_types(layer.down.dtype, layer.up.dtype))
    rank = sum(layer.rank for _, layer, _ in members)
    down = torch.cat([layer.down.to(dtype) for _, layer, _ in members])
    up = torch.zeros(unit * spec.total, rank, dtype=dtype)
    col = 0
    for part, layer, _ in members:
        start, length = (0, unit * spec.total) if part is None else spec.rows(part, unit)
        block = layer.up.to(dtype) if uniform else (layer.up.double() * layer.scale).to(dtype)
        up[start : start + length, col : col + layer.rank] = block
        col += layer.rank
    if uniform:
        (scale,) = scales
        alphas = {layer.alpha for _, layer, _ in members}
        alpha = None if alphas == {None} else scale * rank
    else:
        alpha = float(rank)
    return LoRALayer(down=down, up=up, alpha=alpha)


def fuse(lora: LoRA) -> LoRA:
    """The same LoRA with every fused weight's part layers (and a whole layer beside them) merged into one layer."""
    groups: dict[str, list[tuple[str | None, str]]] = defaultdict(list)
    for key in lora.layers:
        module, part = parse_key(key)
        groups[module].append((part, key))
    if all(len(members) == 1 and members[0][0] is None for members in groups.values()):
        return lora
    out: dict[str, Layer] = {}
    for module, members in groups.items():
        if len(members) == 1 and members[0][0] is None:
            out[module] = lora.layers[members[0][1]]
            continue
        spec = _fused_weight(lora.family, module, members[0][1])
        plain = [(part, _plain(lora.layers[key], key, "fused"), key) for part, key in members]
        out[module] = fuse_layers(spec, plain)
    return lora.replace(layers=out)


def split_layer(spec: families.FusedWeight, layer: LoRALayer, key: str) -> dict[str, LoRALayer]:
    """Part name → layer, together exactly ``layer``'s ΔW; parts whose rows of up are all zero are left out."""
    unit = _unit(spec, [(None, layer, key)])
    blocks = {p.name: layer.up[slice(*_span(spec.rows(p.name, unit)))] for p in spec.parts}
    used = {name: (b != 0).any(dim=0) for name, b in blocks.items()}
    used = {name: cols for name, cols in used.items() if bool(cols.any())}
    disjoint = int(sum(cols.int() for cols in used.values()).max()) <= 1 if used else True
    out = {}
    for name, cols in used.items():
        if disjoint:
            idx = cols.nonzero().flatten()
            rank = int(idx.numel())
            alpha = None if layer.alpha is None else layer.alpha * rank / layer.rank
            out[name] = LoRALayer(down=layer.down[idx].contiguous(), up=blocks[name][:, idx].contiguous(),
                                  alpha=alpha)
        else:
            out[name] = LoRALayer(down=layer.down.clone(), up=blocks[name].contiguous(), alpha=layer.alpha)
    return out


def _span(rows: tuple[int, int]) -> tuple[int, int]:
    start, length = rows
    return start, start + length


def split(lora: LoRA) -> LoRA:
    """The same LoRA with every whole layer on a fused weight replaced by its part layers (see `split_layer`)."""
    fam = families.get(lora.family) if lora.family is not None else None
    out: dict[str, Layer] = {}
    changed = False
    for key, layer in lora.layers.items():
        module, part = parse_key(key)
        spec = None
        if fam is not None and part is None and module.startswith("unet."):
            spec = fam.fused_weight(module.removeprefix("unet."))
        if spec is None:
            out[key] = layer
            continue
        changed = True
        for name, piece in split_layer(spec, _plain(layer, key, "split"), key).items():
            new_key = part_key(module, name)
            if new_key in lora.layers:
                raise LoraFormatError(f"holds both the fused layer and its part '{name}'", key=key,
                                      hint="fuse the LoRA first")
            out[new_key] = piece
    return lora.replace(layers=out) if changed else lora


def scale_split_qkv(lora: LoRA) -> LoRA:
    """kohya ``split_qkv`` files as the trainer meant them: every fused layer's parts at alpha / (rank / parts).

    sd-scripts trains q, k, v (and linear1's mlp) as separate LoRAs of rank r, then saves them fused: down =
    cat(downs), up = block-diagonal, rank n·r, alpha unchanged (sd-scripts #2204). Read naively, each part gets
    alpha / (n·r), n times weaker than trained. Applied only to layers whose up really is block-diagonal over
    the parts, with alpha multiplied by the number of parts that have columns.
    """
    if lora.family is None:
        return lora
    fam = families.get(lora.family)
    out = dict(lora.layers)
    for key, layer in lora.layers.items():
        spec = fam.fused_weight(key.removeprefix("unet.")) if key.startswith("unet.") else None
        if spec is None or not isinstance(layer, LoRALayer) or layer.alpha is None or layer.is_conv:
            continue
        parts = split_layer(spec, layer, key)
        if sum(p.rank for p in parts.values()) == layer.rank and len(parts) > 1:  # block-diagonal
            out[key] = LoRALayer(down=layer.down, up=layer.up, alpha=layer.alpha * len(parts),
                                 mid=layer.mid, dora_scale=layer.dora_scale)
    return lora.replace(layers=out)


def swap_output_halves(layer: Layer, *, key: str) -> Layer:
    """The layer whose ΔW has its two row halves swapped (exact: a row permutation of ``up``).

    FLUX.1's final modulation stores (shift, scale) in BFL names and (scale, shift) in diffusers names.
    A LoHa layer swaps both Hadamard factors' rows; LoKr has no row halves of its own and is refused.
    """
    def swap(t: Tensor) -> Tensor:
        if t.shape[0] % 2:
            raise LoraFormatError(f"cannot swap the halves of {t.shape[0]} rows", key=key)
        h = t.shape[0] // 2
        return torch.cat([t[h:], t[:h]])

    if isinstance(layer, LoRALayer) and layer.dora_scale is None:
        return LoRALayer(down=layer.down, up=swap(layer.up), alpha=layer.alpha, mid=layer.mid)
    if layer.kind == "loha" and "hada_t1" not in layer.parts:
        parts = dict(layer.parts)
        parts["hada_w1_a"], parts["hada_w2_a"] = swap(parts["hada_w1_a"]), swap(parts["hada_w2_a"])
        return layer.with_tensors(parts)
    what = "lora layer with DoRA" if layer.kind == "lora" else f"LyCORIS {layer.kind} layer"
    raise LoraFormatError(f"a {what} on a module stored with swapped halves cannot be converted exactly",
                          key=key, hint="write it with the names it was read with")
