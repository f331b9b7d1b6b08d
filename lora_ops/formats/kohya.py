"""kohya sd-scripts format (also LyCORIS, which uses the same names): ``lora_unet_…`` / ``lora_te{,1,2}_…``.

Module paths are flattened with ``_`` (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``)
and carry ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (LoCon: ``.lora_mid.weight``; DoRA:
``.dora_scale``; LyCORIS: ``.hada_w1_a`` …). The UNet comes in diffusers spelling (usual for SD 1.x) or original
LDM spelling (``lora_unet_input_blocks_4_1_…``, usual for SDXL); both are read. The writer emits what kohya's own
trainers emit for the family: diffusers spelling for SD 1.x, LDM spelling for SDXL.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import keymap
from ..errors import LoraFormatError
from ..lora import LoRA
from . import names
from .layers import KOHYA_SUFFIXES, LYCORIS_PARTS, LayerTable, group_by_module, layer_tensors

PART_PREFIXES = {"lora_unet_": "unet", "lora_te_": "te1", "lora_te1_": "te1", "lora_te2_": "te2"}


def detect(keys: list[str], metadata: Mapping[str, str]) -> bool:
    return any(k.startswith(tuple(PART_PREFIXES)) for k in keys)


def detect_lycoris(keys: list[str], metadata: Mapping[str, str]) -> bool:
    lyco = tuple(f".{p}" for parts in LYCORIS_PARTS.values() for p in parts)
    return detect(keys, metadata) and any(k.endswith(lyco) for k in keys)


def _part_of(module: str) -> tuple[str, str] | None:
    for prefix in sorted(PART_PREFIXES, key=len, reverse=True):
        if module.startswith(prefix):
            return PART_PREFIXES[prefix], module[len(prefix) :]
    return None


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    modules, unused = group_by_module(tensors, KOHYA_SUFFIXES, file=file)
    located: dict[str, tuple[str, str]] = {}  # flat module → (part, dotted path)
    for module in list(modules):
        found = _part_of(module)
        if found is None:
            unused.extend(modules.pop(module).values())
            continue
        part, flat = found
        try:
            located[module] = (part, keymap.kohya_to_dotted(flat))
        except LoraFormatError as err:
            raise LoraFormatError(err.reason, file=file, key=module, hint=err.hint) from None
    unet_paths = [p for part, p in located.values() if part == "unet"]
    fam = names.guess_family(unet_paths, (part for part, _ in located.values()), family)
    table = LayerTable(tensors, file=file)
    for module, roles in modules.items():
        part, path = located[module]
        key = names.unet_key(path, fam, file=file) if part == "unet" else names.te_key(part, path)
        table.add(key, module, roles)
    fmt = "lycoris" if any(layer.kind != "lora" for layer in table.layers.values()) else "kohya"
    return LoRA(table.layers, dict(metadata), family=fam, source_format=fmt), unused


def write(lora: LoRA, *, unet_style: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    style = unet_style or ("diffusers" if lora.family == "sd1" else "ldm")
    has_te2 = any(k.startswith("te2.") for k in lora.layers)
    te_prefix = {"te1": "lora_te1_" if (has_te2 or lora.family == "sdxl") else "lora_te_", "te2": "lora_te2_"}
    out: dict[str, torch.Tensor] = {}
    for key, layer in lora.layers.items():
        part, path = names.split_canonical(key)
        if part == "unet":
            module = "lora_unet_" + keymap.dotted_to_kohya(names.unet_path(key, lora.family, style))
        else:
            module = te_prefix[part] + keymap.dotted_to_kohya(path)
        for suffix, t in layer_tensors(layer, "kohya").items():
            out[module + suffix] = t
    return out, dict(lora.metadata)
