"""Canonical keys of the LoRA-targetable layers of a live diffusers UNet / transformers CLIP text encoder."""

from __future__ import annotations

import torch

from ..errors import LoraValueError
from .detect import detect_unet_family
from .sd_unet import unet_diffusers_to_ldm
from .text_encoders import te_to_canonical_path

UNET_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)
TE_LAYER_TYPES = (torch.nn.Linear,)


def unet_canonical_keys(unet: torch.nn.Module, family: str | None = None) -> dict[str, str]:
    """``unet.<LDM path>`` → diffusers module path for every Linear/Conv2d of a ``UNet2DConditionModel``.

    ``family`` None detects it from the module names. Expects a plain model (no PEFT/LoRA wrappers injected).
    """
    names = [name for name, module in unet.named_modules() if isinstance(module, UNET_LAYER_TYPES)]
    if family is None:
        family = detect_unet_family(names)
        if family is None:
            raise LoraValueError("cannot tell the UNet family from its module names", hint="pass family=")
    return {"unet." + unet_diffusers_to_ldm(name, family): name for name in names}


def te_canonical_keys(text_encoder: torch.nn.Module, prefix: str = "te1") -> dict[str, str]:
    """``<prefix>.text_model.…`` → module path inside ``text_encoder`` for every Linear of a CLIP text model."""
    return {
        f"{prefix}.{te_to_canonical_path(name)}": name
        for name, module in text_encoder.named_modules()
        if isinstance(module, TE_LAYER_TYPES)
    }
