"""ComfyUI's own LoRA format, as its LoraSave / TrainLoraNode write it (and ai-toolkit for some DiTs).

Denoiser layers are ``diffusion_model.<original path>.lora_up.weight`` / ``.lora_down.weight`` (+ ``.alpha``):
ComfyUI's internal names, LDM for SD UNets and BFL for FLUX.1, fused weights whole. Text encoders are
``text_encoders.<clip_l|clip_g|t5xxl>.transformer.<path>`` — ComfyUI's generic key map
(`comfy.lora.model_lora_keys_clip`) accepts exactly these names. Also read: ``diffusion_model.<diffusers
path>`` (some trainers), which ComfyUI itself drops.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import families, fused
from ..errors import LoraFormatError
from ..lora import LoRA
from . import names
from .layers import ANY_SUFFIXES, LayerTable, group_by_module, layer_tensors

UNET_PREFIX = "diffusion_model."
TE_ROOT = "text_encoders."


def detect(keys: list[str], metadata: Mapping[str, str]) -> bool:
    return any(k.startswith((UNET_PREFIX, TE_ROOT)) for k in keys)


def _te_prefixes(family: str | None) -> dict[str, str]:
    """ComfyUI text-encoder prefix → canonical part, for ``family`` or every registered family."""
    fams = [families.get(family)] if family is not None else list(families.REGISTRY.values())
    return {te.comfyui: te.part for fam in fams for te in fam.text_encoders}


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    modules, unused = group_by_module(tensors, ANY_SUFFIXES, file=file)
    located: dict[str, tuple[str, str]] = {}
    prefixes = _te_prefixes(None)
    for module in list(modules):
        if module.startswith(UNET_PREFIX):
            located[module] = ("unet", module[len(UNET_PREFIX) :])
            continue
        prefix = next((p for p in prefixes if module.startswith(p)), None)
        if prefix is None:
            unused.extend(modules.pop(module).values())
            continue
        located[module] = (prefixes[prefix], module[len(prefix) :])
    fam = names.guess_family([p for part, p in located.values() if part == "unet"],
                             (part for part, _ in located.values()), family, file=file, metadata=metadata)
    table = LayerTable(tensors, file=file)
    for module, roles in modules.items():
        part, path = located[module]
        if part == "unet":
            names.add_denoiser_layer(table, path, fam, module, roles)
        else:
            table.add(names.te_key(part, path, fam), module, roles)
    return LoRA(table.layers, dict(metadata), family=fam, source_format="comfyui"), unused


def write(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    lora = fused.fuse(lora)
    out: dict[str, torch.Tensor] = {}
    for key, layer in lora.layers.items():
        part, path = names.split_canonical(key)
        if part == "unet":
            module = UNET_PREFIX + names.unet_path(key, lora.family, "original")
        else:
            te = names.text_encoder(part, lora.family)
            if te is None:
                raise LoraFormatError(f"model part '{part}' has no ComfyUI text-encoder name", key=key,
                                      hint="pass family=")
            module = te.comfyui + path
        for suffix, t in layer_tensors(layer, "kohya").items():
            out[module + suffix] = t
    return out, dict(lora.metadata)
