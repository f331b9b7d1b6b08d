"""LoraOpsInspect: LORA → a readable report (also shown on the node) and a per-layer picture."""

from __future__ import annotations

from ..lora_ops.errors import reword
from ..lora_ops.inspect import format_report, inspect_lora
from ..lora_ops.plots_inspect import layers_plot
from .images import to_image_tensor
from .types import CATEGORY, LORA, NODE_WORDING


class LoraOpsInspect:
    CATEGORY = CATEGORY
    DESCRIPTION = "Show what a LoRA holds: format, family, parts, ranks, alphas, dtypes, trigger words, NaN/Inf."
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "layers_plot")
    OUTPUT_TOOLTIPS = ("The report as text.",
                       "Per layer: strength ‖ΔW‖_F (log scale) and rank, coloured by model part; NaN/Inf marked.")
    FUNCTION = "inspect"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (LORA, {"tooltip": "The LoRA to look at."})}}

    def inspect(self, lora):
        text = reword(format_report(inspect_lora(lora)), NODE_WORDING)
        return {"ui": {"text": [text]}, "result": (text, to_image_tensor(layers_plot(lora)))}
