"""ComfyUI's own LoRA format, as its LoraSave / TrainLoraNode write it.

UNet layers are ``diffusion_model.<LDM path>.lora_up.weight`` / ``.lora_down.weight`` (+ ``.alpha``); text encoders
are ``text_encoders.clip_l.transformer.text_model.…`` and, for SDXL, ``text_encoders.clip_g.transformer.…`` —
ComfyUI's generic key map (`comfy.lora.model_lora_keys_clip`) accepts exactly these names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..lora import LoRA
from . import names
from .layers import ANY_SUFFIXES, LayerTable, group_by_module, layer_tensors

UNET_PREFIX = "diffusion_model."
TE_PREFIXES = {"te1": "text_encoders.clip_l.transformer.", "te2": "text_encoders.clip_g.transformer."}


def detect(keys: list[str], metadata: Mapping[str, str]) -> bool:
    return any(k.startswith((UNET_PREFIX, "text_encoders.")) for k in keys)


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    modules, unused = group_by_module(tensors, ANY_SUFFIXES, file=file)
    located: dict[str, tuple[str, str]] = {}
    for module in list(modules):
        if module.startswith(UNET_PREFIX):
            located[module] = ("unet", module[len(UNET_PREFIX) :])
            continue
        part = next((p for p, prefix in TE_PREFIXES.items() if module.startswith(prefix)), None)
        if part is None:
            unused.extend(modules.pop(module).values())
            continue
        located[module] = (part, module[len(TE_PREFIXES[part]) :])
    fam = names.guess_family([p for part, p in located.values() if part == "unet"],
                             (part for part, _ in located.values()), family)
    table = LayerTable(tensors, file=file)
    for module, roles in modules.items():
        part, path = located[module]
        key = names.unet_key(path, fam, file=file) if part == "unet" else names.te_key(part, path)
        table.add(key, module, roles)
    return LoRA(table.layers, dict(metadata), family=fam, source_format="comfyui"), unused


def write(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    for key, layer in lora.layers.items():
        part, path = names.split_canonical(key)
        module = (UNET_PREFIX if part == "unet" else TE_PREFIXES[part]) + path
        for suffix, t in layer_tensors(layer, "kohya").items():
            out[module + suffix] = t
    return out, dict(lora.metadata)
