"""LoraOpsExtract: base MODEL + tuned MODEL → the LORA that best approximates their difference."""

from __future__ import annotations

from typing import Any

import torch

from ..lora_ops import keymap
from ..lora_ops.errors import LoraValueError
from ..lora_ops.extract import extract
from . import comfy_env, comfy_host
from .diffusers_model import DiffusersModel
from .rank_inputs import conv_rule_from_inputs, rank_rule_inputs, rule_from_inputs
from .resize_node import report_text
from .types import CATEGORY, LORA


def unet_weights(model: Any) -> dict[str, torch.Tensor]:
    """Canonical key → effective UNet weight of a MODEL (applied LoRAs included) on either host."""
    if isinstance(model, DiffusersModel):
        merged = model.merge_and_unload() if model.items else model
        unet = merged.pipe.unet
        modules = dict(unet.named_modules())
        return {k: modules[p].weight.detach() for k, p in keymap.unet_canonical_keys(unet, model.family).items()}
    if comfy_host.is_model_patcher(model):
        return comfy_host.unet_weights(model)
    raise LoraValueError(f"MODEL is neither a ComfyUI model nor a LoRA Ops diffusers model ({type(model).__name__})")


class LoraOpsExtract:
    CATEGORY = CATEGORY
    DESCRIPTION = ("Extract a LoRA from a fine-tuned (or merged) model against its base: exact truncated SVD per "
                   "layer, no clamping.")
    RETURN_TYPES = (LORA, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The extracted LoRA (UNet layers).", "Per layer: rank kept and retained energy.")
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "base_model": ("MODEL", {"tooltip": "The model before fine-tuning."}),
                "tuned_model": ("MODEL", {"tooltip": "The fine-tuned or merged model."}),
                **rank_rule_inputs("rank", 16.0),
            }
        }

    def extract(self, base_model, tuned_model, rule, value, conv_rank=0):
        lora, report = extract(unet_weights(base_model), unet_weights(tuned_model), rule_from_inputs(rule, value),
                               conv_rule=conv_rule_from_inputs(conv_rank),
                               progress=comfy_env.layer_progress())
        return (lora, report_text(report))
