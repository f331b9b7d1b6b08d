"""LoraOpsApply / LoraOpsApplyStack: LoRA(s) onto MODEL (+ CLIP) → new MODEL, CLIP and a coverage report.

The nodes only dispatch: a ComfyUI MODEL (ModelPatcher) goes to `comfy_host`, a `DiffusersModel` (CI, scripts) to
its own methods. Both leave their inputs untouched and refuse a LoRA that mostly misses the model, so a wrong file
is an error with its likely cause instead of a silent no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..lora_ops.errors import LoraValueError
from ..lora_ops.hosts import ApplyItem
from ..lora_ops.lora import LoRA, filter_layers, is_text_encoder_key
from . import comfy_host
from .diffusers_model import DiffusersModel
from .types import CATEGORY, LORA, LORA_STACK, StackEntry

STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
RETURN_TOOLTIPS = (
    "The model with the LoRA(s) applied (a clone: the input MODEL is unchanged).",
    "The text encoder with the LoRA(s) applied (empty when no CLIP was connected).",
    "How many LoRA layers matched the model, and which did not.",
)


def without_text_layers(items: Sequence[ApplyItem]) -> tuple[list[ApplyItem], int]:
    """The items minus their text-encoder layers (no CLIP connected), and how many layers were dropped."""
    out, dropped = [], 0
    for i, (lora, sm, sc) in enumerate(items, 1):
        te = [k for k in lora.layers if is_text_encoder_key(k)]
        if len(te) == len(lora.layers):
            raise LoraValueError(
                f"LoRA {i} only patches the text encoder, and no CLIP is connected",
                hint="connect the CLIP input",
            )
        dropped += len(te)
        out.append((filter_layers(lora, lambda k: not is_text_encoder_key(k)) if te else lora, sm, sc))
    return out, dropped


def check_same_pipeline(model: DiffusersModel, clip: Any) -> None:
    if not model.same_pipeline_state(clip):
        raise LoraValueError(
            "with a diffusers pipeline, MODEL and CLIP must be the same pipeline with the same LoRAs",
            hint="connect both from the same node",
        )


def apply_items(model: Any, clip: Any | None, items: Sequence[ApplyItem]) -> tuple[Any, Any | None, str]:
    """Dispatch to the host of ``model``; returns (model, clip, report text)."""
    for i, (lora, _, _) in enumerate(items, 1):
        if not isinstance(lora, LoRA):
            raise LoraValueError(f"input {i} is not a LORA value (got {type(lora).__name__})")
    dropped = 0
    if clip is None:
        items, dropped = without_text_layers(items)
    if isinstance(model, DiffusersModel):
        if clip is not None:
            check_same_pipeline(model, clip)
        new_model = model.with_loras(items)
        new_clip, report = (new_model if clip is not None else None), new_model.report
    elif comfy_host.is_model_patcher(model):
        new_model, new_clip, report = comfy_host.apply_loras(model, clip, items)
    else:
        raise LoraValueError(f"MODEL is neither a ComfyUI model nor a diffusers pipeline (got {type(model).__name__})")
    text = report.summary()
    if dropped:
        text += f" {dropped} text-encoder layers not applied: no CLIP connected."
    return new_model, new_clip, text


class LoraOpsApply:
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Apply a LoRA to the model and text encoder with separate strengths. The inputs are not changed (clone + "
        "patch); the report says how many layers matched, and a LoRA for another model family is refused."
    )
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "coverage")
    OUTPUT_TOOLTIPS = RETURN_TOOLTIPS
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRA to."}),
                "lora": (LORA, {"tooltip": "The LoRA, from Load LoRA (LoRA Ops) or any node that makes one."}),
                "strength_model": ("FLOAT", {**STRENGTH, "tooltip": "Multiplier of the LoRA on the diffusion model."}),
                "strength_clip": ("FLOAT", {**STRENGTH, "tooltip": "Multiplier of the LoRA on the text encoder."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoder; without it, the LoRA's text-encoder layers are "
                                             "skipped (the report says how many)."}),
            },
        }

    def apply(
        self, model: Any, lora: LoRA, strength_model: float = 1.0, strength_clip: float = 1.0, clip: Any = None
    ) -> tuple[Any, Any | None, str]:
        return apply_items(model, clip, [(lora, float(strength_model), float(strength_clip))])


class LoraOpsApplyStack:
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Apply every enabled LoRA of a stack, each at its own strengths. All are checked before any is applied; "
        "the inputs are not changed."
    )
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "coverage")
    OUTPUT_TOOLTIPS = RETURN_TOOLTIPS
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRAs to."}),
                "lora_stack": (LORA_STACK, {"tooltip": "The LoRAs and their strengths, from LoRA Stack (LoRA Ops)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "The text encoder; without it, text-encoder layers are skipped."}),
            },
        }

    def apply(self, model: Any, lora_stack: tuple[StackEntry, ...], clip: Any = None) -> tuple[Any, Any | None, str]:
        entries: tuple[StackEntry, ...] = tuple(lora_stack or ())
        if not entries:
            return model, clip, "The stack is empty: nothing applied."
        items = [(e.lora, float(e.strength_model), float(e.strength_clip)) for e in entries]
        return apply_items(model, clip, items)
