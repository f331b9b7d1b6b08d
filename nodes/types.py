"""The custom socket types our nodes pass between them, and the value carried by LORA_STACK."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..lora_ops.errors import LoraOpsError
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


NODE_WORDING = (
    (r",? or pass allow_pickle=True(?: / --allow-pickle)? if you trust it",
     " first: the nodes never load pickles (if you trust the file: lora-ops convert FILE --allow-pickle --to kohya "
     "-o NEW.safetensors)"),
    (r"pass strict=False(?: / --lenient)? to load the rest and list these",
     "the nodes load a file only when every key is understood; lora-ops inspect FILE --lenient loads the rest"),
    (r"a per-layer rule \(fixed, sv_ratio, sv_fro, sv_cumulative\), then resize to size_mb",
     "rule rank, sv_ratio, sv_fro or sv_cumulative here, then a Rank-Resize node with rule size_mb"),
    (r"\bpass family=(?:'sd1' or 'sdxl')?", "set family on the Load LoRA node"),
    (r"the JSON report lists all", "lora-ops inspect FILE --json lists all"),
)
"""The library's API wording → what a node user can change (regex, replacement): a node input, another node, or
the command line where no node can help. Applied by `reword_errors` to every node's function, and to the
inspect report the Load and Inspect nodes show."""


def reword_errors(cls: type) -> type:
    """Make ``cls``'s node function raise its `LoraOpsError`s reworded by `NODE_WORDING` (same exception object,
    so the type ComfyUI shows and any ``except`` keep working)."""
    name = cls.FUNCTION
    function = vars(cls).get(name)
    if not callable(function) or isinstance(function, (classmethod, staticmethod)) or getattr(
            function, "_reworded", False):
        return cls  # inherited, a class/static method, or wrapped already: left as it is

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except LoraOpsError as err:
            err.args = (err.message(NODE_WORDING),)
            raise

    wrapper._reworded = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)
    return cls
