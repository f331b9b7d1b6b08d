"""Hosts: the models LoRAs are applied to, behind one small interface (`LoraHost`).

`DiffusersHost` wraps a diffusers pipeline or denoiser of any registered family (SD 1.x, SDXL, FLUX.1); the
ComfyUI adapter (MODEL + CLIP) lives in ``nodes/`` and implements the same interface. Nothing here imports
diffusers or comfy.
"""

from .base import ApplyItem, LoraHost, check_items, merged_weight, refuse_non_finite, strength_for
from .diffusers_host import DiffusersHost

__all__ = [
    "ApplyItem",
    "DiffusersHost",
    "LoraHost",
    "check_items",
    "merged_weight",
    "refuse_non_finite",
    "strength_for",
]
