"""LoraOpsCombine: LORA_STACK → one LORA (concat / svd / linear / ties / dare), with a report."""

from __future__ import annotations

from ..lora_ops.combine import combine
from ..lora_ops.errors import LoraValueError
from . import comfy_env
from .rank_inputs import conv_rule_from_inputs, rank_rule_inputs, rule_from_inputs
from .resize_node import report_text
from .types import CATEGORY, LORA, LORA_STACK

METHODS = ["concat", "svd", "linear", "ties", "dare_linear", "dare_ties"]


class LoraOpsCombine:
    CATEGORY = CATEGORY
    DESCRIPTION = ("Merge a stack into one LoRA file. concat is exact (rank = Σ ranks); svd is exact, then "
                   "truncated by the rank rule; linear/ties/dare work on ΔW per layer.")
    RETURN_TYPES = (LORA, "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The combined LoRA (the stack's strengths are baked in).", "What each layer kept.")
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_stack": (LORA_STACK, {"tooltip": "The LoRAs and their strengths (from LoRA Stack)."}),
                "method": (METHODS, {"default": "concat", "tooltip": "How to combine (see the node description)."}),
                **rank_rule_inputs("rank", 32.0),
                "density": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "ties/dare: the fraction of ΔW entries kept."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                 "tooltip": "dare: random seed (same seed, same result)."}),
            }
        }

    def combine(self, lora_stack, method, rule, value, conv_rank=0, density=0.5, seed=0):
        if not lora_stack:
            raise LoraValueError("the stack is empty", hint="enable at least one row in LoRA Stack")
        items = [(e.lora, e.strength_model, e.strength_clip) for e in lora_stack]
        use_rule = method != "concat"
        out, report = combine(items, method, rule_from_inputs(rule, value) if use_rule else None,
                              conv_rule=conv_rule_from_inputs(conv_rank) if use_rule else None,
                              seed=seed, density=density, progress=comfy_env.layer_progress())
        return (out, report_text(report))
