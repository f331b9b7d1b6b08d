"""Canonical keys of the LoRA-targetable layers of a live diffusers denoiser / transformers text encoder.

A denoiser of any registered family (SD ``UNet2DConditionModel``, FLUX.1 ``FluxTransformer2DModel`` …) is named
through its family's ``from_diffusers``: a module that is a whole weight of the original model gets its whole
canonical key (``x_embedder`` → ``unet.img_in``), a module that holds PART of a fused original weight gets the part
key (``transformer_blocks.0.attn.to_q`` → ``unet.double_blocks.0.img_attn.qkv[q]``). Nothing here knows a family.
"""

from __future__ import annotations

import torch

from ..errors import LoraFormatError, LoraValueError
from ..part_keys import part_key
from .text_encoders import te_to_canonical_path

UNET_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)
DENOISER_LAYER_TYPES = UNET_LAYER_TYPES
TE_LAYER_TYPES = (torch.nn.Linear,)


def denoiser_layer_names(model: torch.nn.Module) -> list[str]:
    """Module paths of every Linear/Conv2d of ``model`` (the layers a LoRA can patch), in registration order."""
    return [name for name, module in model.named_modules() if isinstance(module, DENOISER_LAYER_TYPES)]


def denoiser_family(model: torch.nn.Module) -> str | None:
    """The registered family whose denoiser has ``model``'s module names (`lora_ops.families.detect`), or None."""
    from .. import families  # the registry imports keymap: look it up at call time

    return families.detect(denoiser_layer_names(model))


def denoiser_canonical_keys(model: torch.nn.Module, family: str | None = None) -> dict[str, str]:
    """Canonical key → module path inside ``model`` for every Linear/Conv2d of a diffusers denoiser.

    Keys are ``unet.<original path>``, or ``unet.<original path>[<part>]`` for a module holding a part of a fused
    original weight (FLUX.1 ``single_transformer_blocks.0.proj_mlp`` → ``unet.single_blocks.0.linear1[mlp]``).
    ``family`` None detects it from the module names and raises when they do not tell (never a default). A
    Linear/Conv2d the family does not know (an injected adapter, diffusers' ``fuse_qkv_projections`` …) raises
    too: a LoRA on a module the forward pass no longer uses would do nothing, silently. Expects a plain model
    (no PEFT/LoRA wrappers injected).
    """
    from .. import families

    names = denoiser_layer_names(model)
    if family is None:
        family = families.detect(names)
        if family is None:
            raise LoraValueError(
                f"cannot tell the model family of {type(model).__name__} from its module names",
                hint=f"pass family= (known families: {', '.join(families.IDS)})",
            )
    fam = families.get(family)
    keys: dict[str, str] = {}
    for name in names:
        try:
            path, part = fam.from_diffusers(name)
        except LoraFormatError as err:
            raise LoraFormatError(
                f"{type(model).__name__} has a layer that is not a module of the {fam.label} model",
                key=name, hint="unload adapters or unfuse fused projections first, or check family=",
            ) from err
        key = part_key("unet." + path, part)
        if key in keys:
            raise LoraFormatError(f"two modules have the canonical key {key}", key=name, hint=f"and {keys[key]}")
        keys[key] = name
    return keys


def unet_canonical_keys(unet: torch.nn.Module, family: str | None = None) -> dict[str, str]:
    """``unet.<LDM path>`` → diffusers module path for every Linear/Conv2d of a ``UNet2DConditionModel``.

    The SD-style case of `denoiser_canonical_keys` (nothing in these UNets is fused, so every key is whole);
    ``family`` None detects it from the module names.
    """
    return denoiser_canonical_keys(unet, family)


def te_canonical_keys(text_encoder: torch.nn.Module, prefix: str = "te1", kind: str = "clip") -> dict[str, str]:
    """``<prefix>.<canonical path>`` → module path inside ``text_encoder`` for every Linear of a text encoder.

    ``kind`` "clip": canonical paths are rooted at ``text_model.`` (whatever the transformers version nests);
    "t5": a ``T5EncoderModel``'s own paths (``encoder.block.0.layer.0.SelfAttention.q``).
    """
    if kind not in ("clip", "t5"):
        raise LoraValueError(f"unknown text encoder kind '{kind}'", hint="clip or t5")
    to_canonical = te_to_canonical_path if kind == "clip" else str
    return {
        f"{prefix}.{to_canonical(name)}": name
        for name, module in text_encoder.named_modules()
        if isinstance(module, TE_LAYER_TYPES)
    }
