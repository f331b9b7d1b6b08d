"""LoraOpsResize: LORA + rank rule → smaller LORA, per-layer report, singular-value spectrum plot."""

from __future__ import annotations

from ..lora_ops.plots import spectrum_plot
from ..lora_ops.resize import resize
from . import comfy_env
from .images import to_image_tensor
from .rank_inputs import conv_rule_from_inputs, rank_rule_inputs, rule_from_inputs
from .types import CATEGORY, LORA


def report_text(report) -> str:
    lines = [report.summary()]
    for r in report.layers:
        ratio = f"{r.max_ratio:.3g}" if r.max_ratio is not None else "-"
        lines.append(f"{r.key}: rank {r.old_rank} → {r.new_rank}, kept {r.fro_retained_pct:.2f}% (σ₀/σ_r {ratio})")
    return "\n".join(lines)


class LoraOpsResize:
    CATEGORY = CATEGORY
    DESCRIPTION = "Shrink a LoRA by exact low-rank SVD (never forms ΔW): fixed rank or kohya's dynamic rules."
    RETURN_TYPES = (LORA, "STRING", "IMAGE")
    RETURN_NAMES = ("lora", "report", "spectrum")
    OUTPUT_TOOLTIPS = ("The resized LoRA (same strength, up to the truncation).",
                       "Per layer: old → new rank, retained Frobenius %, σ₀/σ_r.",
                       "Singular values of every layer, the kept part coloured.")
    FUNCTION = "resize"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (LORA, {"tooltip": "The LoRA to shrink."}), **rank_rule_inputs()}}

    def resize(self, lora, rule, value, conv_rank=0):
        out, report = resize(lora, rule_from_inputs(rule, value), conv_rule=conv_rule_from_inputs(conv_rank),
                             progress=comfy_env.layer_progress())
        return (out, report_text(report), to_image_tensor(spectrum_plot(report)))
