"""XLabs FLUX.1 LoRAs: ``double_blocks.N.processor.qkv_lora1.down.weight`` (attention processors), read-only.

XLabs' trainer (x-flux) adds LoRA processors to the attention of each block; as diffusers'
``_convert_xlabs_flux_lora_to_diffusers`` reads them:

    double_blocks.N.processor.qkv_lora1 / proj_lora1   image attention: img_attn.qkv (whole) / img_attn.proj
    double_blocks.N.processor.qkv_lora2 / proj_lora2   text attention:  txt_attn.qkv (whole) / txt_attn.proj
    single_blocks.N.processor.qkv_lora / proj_lora     linear1 rows q, k, v (not mlp) / linear2

The single-block qkv LoRA updates the first three parts of ``linear1``: it becomes three part layers sharing
its down (exact). The files hold no alpha; x-flux applies up·down unscaled, which is alpha = rank.
ComfyUI does not map these names (x-flux-comfyui #37); applied through LoRA Ops they work like kohya files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .. import families
from ..errors import LoraFormatError
from ..fused import part_key
from ..lora import LoRA, LoRALayer
from .layers import LayerTable, group_by_module

SUFFIXES = {".down.weight": "down", ".up.weight": "up"}
_KEY = re.compile(r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12]?)")
TARGETS = {
    ("double", "qkv", "1"): "double_blocks.{i}.img_attn.qkv",
    ("double", "proj", "1"): "double_blocks.{i}.img_attn.proj",
    ("double", "qkv", "2"): "double_blocks.{i}.txt_attn.qkv",
    ("double", "proj", "2"): "double_blocks.{i}.txt_attn.proj",
    ("single", "qkv", ""): "single_blocks.{i}.linear1",
    ("single", "proj", ""): "single_blocks.{i}.linear2",
}


def detect(keys: list[str], metadata: Mapping[str, str]) -> bool:
    return any(".processor." in k and _KEY.match(k) for k in keys)


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    if family not in (None, "flux1"):
        raise LoraFormatError(f"an XLabs FLUX.1 LoRA cannot be read as {families.label(family)}", file=file)
    modules, unused = group_by_module(tensors, SUFFIXES, file=file)
    table = LayerTable(tensors, file=file)
    for module, roles in modules.items():
        m = _KEY.fullmatch(module)
        target = TARGETS.get((m.group(1), m.group(3), m.group(4))) if m else None
        if target is None:
            unused.extend(roles.values())
            continue
        key = "unet." + target.replace("{i}", m.group(2))
        layer = table.add(key, module, roles)
        if m.group(1) == "single" and m.group(3) == "qkv":
            del table.layers[key]
            for name, piece in _qkv_parts(layer, key, file).items():
                table.layers[part_key(key, name)] = piece
    return LoRA(table.layers, dict(metadata), family="flux1", source_format="xlabs"), unused


def _qkv_parts(layer: LoRALayer, key: str, file: str | None) -> dict[str, LoRALayer]:
    """The single-block qkv LoRA as part layers q, k, v of ``linear1``: down shared, up split in three."""
    rows = int(layer.up.shape[0])
    if rows % 3:
        raise LoraFormatError(f"a qkv LoRA with {rows} output rows does not split into q, k, v", file=file, key=key)
    third = rows // 3
    return {name: LoRALayer(down=layer.down.clone(), up=layer.up[i * third : (i + 1) * third].contiguous(),
                            alpha=layer.alpha)
            for i, name in enumerate(("q", "k", "v"))}
