"""The custom socket types our nodes pass between them, and the value carried by LORA_STACK."""

from __future__ import annotations

from dataclasses import dataclass

from ..lora_ops.lora import LoRA

LORA = "LORA"  # carries a lora_ops LoRA value
LORA_STACK = "LORA_STACK"  # carries a tuple of StackEntry
CATEGORY = "LoRA Ops"


@dataclass(frozen=True)
class StackEntry:
    """One row of a stack: which LoRA, under what name, at which strengths (model / text encoder)."""

    lora: LoRA
    name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0


LoraStack = tuple[StackEntry, ...]
