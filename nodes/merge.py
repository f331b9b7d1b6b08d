"""LoraOpsMergeUnload: MODEL (+ CLIP) with LoRAs applied → MODEL, CLIP with the LoRAs fused into the weights.

For a ComfyUI MODEL the result holds the merged weights (see `comfy_host.merge_and_unload`): no LoRA product is
computed at sampling time any more, and further LoRAs apply on top of the merged weights. The inputs still give
their own (patched) output, and the base model its base output.
"""

from __future__ import annotations

from typing import Any

from ..lora_ops.errors import LoraValueError
from . import comfy_host
from .apply import check_same_pipeline
from .diffusers_model import DiffusersModel
from .types import CATEGORY


class LoraOpsMergeUnload:
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Fuse the applied LoRAs into the weights (computed in fp32, cast back; refused if a weight would become "
        "NaN/Inf). The outputs carry no adapters; the inputs are not changed."
    )
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = (
        "The model with every applied LoRA fused into its weights.",
        "The text encoder with its LoRAs fused (empty when no CLIP was connected).",
    )
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A model with LoRAs applied (e.g. from Apply LoRA)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "A text encoder with LoRAs applied, to fuse as well."}),
            },
        }

    def merge(self, model: Any, clip: Any = None) -> tuple[Any, Any | None]:
        if isinstance(model, DiffusersModel):
            if clip is not None:
                check_same_pipeline(model, clip)
            merged = model.merge_and_unload()
            return merged, (merged if clip is not None else None)
        if comfy_host.is_model_patcher(model):
            return comfy_host.merge_and_unload(model, clip)
        raise LoraValueError(f"MODEL is neither a ComfyUI model nor a diffusers pipeline (got {type(model).__name__})")
