"""Part keys: ``unet.<module>[<part>]`` names a layer on one part's rows of a fused weight (`lora_ops.fused`).

String functions only, with no imports, so that the key maps (`lora_ops.keymap`) and the family registry can use
them without importing the conversions in `lora_ops.fused`, which need the registry.
"""

from __future__ import annotations


def part_key(module_key: str, part: str | None) -> str:
    """``unet.single_blocks.0.linear1`` + ``mlp`` → ``unet.single_blocks.0.linear1[mlp]``."""
    return module_key if part is None else f"{module_key}[{part}]"


def parse_key(key: str) -> tuple[str, str | None]:
    """``unet.x.qkv[q]`` → (``unet.x.qkv``, ``q``); a whole-weight key → (key, None)."""
    if key.endswith("]") and "[" in key:
        module, _, part = key[:-1].rpartition("[")
        return module, part
    return key, None
