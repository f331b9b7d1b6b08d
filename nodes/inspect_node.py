"""LoraOpsInspect: LORA → a readable report (also shown on the node)."""

from __future__ import annotations

from ..lora_ops.inspect import format_report, inspect_lora
from .types import CATEGORY, LORA


class LoraOpsInspect:
    CATEGORY = CATEGORY
    DESCRIPTION = "Show what a LoRA holds: format, family, parts, ranks, alphas, dtypes, trigger words, NaN/Inf."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The report as text.",)
    FUNCTION = "inspect"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (LORA, {"tooltip": "The LoRA to look at."})}}

    def inspect(self, lora):
        text = format_report(inspect_lora(lora))
        return {"ui": {"text": [text]}, "result": (text,)}
