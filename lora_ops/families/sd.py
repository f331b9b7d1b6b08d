"""The shared shape of the SD-style UNet families: names derive from a `UnetLayout` (see `keymap.sd_unet`).

Original names are the LDM/SGM paths of single-file checkpoints (``input_blocks.4.1.proj_in``), which ComfyUI
uses internally; diffusers names are ``UNet2DConditionModel`` paths. Nothing in these UNets is fused.
"""

from __future__ import annotations

import re

from ..keymap.kohya_names import CLIP_TEXT, SD_TRANSFORMER, SD_UNET_DIFFUSERS, SD_UNET_LDM
from ..keymap.sd_unet import is_unet_path, unet_diffusers_to_ldm, unet_ldm_to_diffusers
from .base import Family, TextEncoder
from .unet_layout import UnetLayout

DIFFUSERS_ROOTS = (
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "add_embedding",
)  # fmt: skip
_BLOCK = re.compile(r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)(?:\.|$)")


def is_diffusers_unet_path(path: str) -> bool:
    return path.split(".", 1)[0] in DIFFUSERS_ROOTS


def _block_of(path: str) -> str | None:
    m = _BLOCK.match(path)
    return m.group(1) if m else None


def sd_family(
    family_id: str, label: str, layout: UnetLayout, text_encoders: tuple[TextEncoder, ...], *, kohya_style: str,
    tiny_config: dict[str, object], ss_base_model_version: str, modelspec_architecture: str,
) -> Family:
    """A `Family` whose UNet names come from ``layout`` through `lora_ops.keymap.sd_unet`."""

    def original_path(path: str) -> str:
        unet_ldm_to_diffusers(path, family_id)  # raises for a module this UNet does not have
        return path

    return Family(
        id=family_id,
        label=label,
        diffusers_component="unet",
        text_encoders=text_encoders,
        original_path=original_path,
        from_diffusers=lambda path: (unet_diffusers_to_ldm(path, family_id), None),
        to_diffusers=lambda path, part: unet_ldm_to_diffusers(path, family_id),
        is_diffusers_path=is_diffusers_unet_path,
        knows=lambda path: is_unet_path(path, family_id),
        block_of=_block_of,
        kohya_style=kohya_style,
        compound_tokens=SD_UNET_DIFFUSERS + SD_UNET_LDM + SD_TRANSFORMER + CLIP_TEXT,
        tiny_config=tiny_config,
        unet_layout=layout,
        ss_base_model_version=ss_base_model_version,
        modelspec_architecture=modelspec_architecture,
    )
