"""The rank-rule inputs shared by Resize, Combine and Extract, and their translation to a `RankRule`."""

from __future__ import annotations

from ..lora_ops.rank_rules import RankRule, make_rule

RULES = ["rank", "sv_ratio", "sv_fro", "sv_cumulative", "size_mb"]
RULE_TOOLTIP = ("How to choose each layer's rank: a fixed rank, or kohya's dynamic rules (sv_ratio keeps σ > σ₀/x, "
                "sv_fro keeps the fraction x of Σσ², sv_cumulative the fraction x of Σσ), or a total file size in MB.")


def rank_rule_inputs(default_rule: str = "rank", default_value: float = 16.0) -> dict:
    return {
        "rule": (RULES, {"default": default_rule, "tooltip": RULE_TOOLTIP}),
        "value": ("FLOAT", {"default": default_value, "min": 0.0, "max": 100000.0, "step": 0.01,
                            "tooltip": "The rule's parameter: the rank, the ratio, the fraction (0–1] or the MB."}),
        "conv_rank": ("INT", {"default": 0, "min": 0, "max": 4096,
                              "tooltip": "Fixed rank for 3×3 conv layers (0: use the rule above)."}),
    }


def rule_from_inputs(rule: str, value: float) -> RankRule:
    return make_rule("fixed" if rule == "rank" else rule, value)


def conv_rule_from_inputs(conv_rank: int) -> RankRule | None:
    return make_rule("fixed", conv_rank) if conv_rank else None
