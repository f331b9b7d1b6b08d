"""The block layout of an SD-style UNet: the facts `lora_ops.keymap.sd_unet` derives module names from.

Each SD-style family module (`sd1`, `sdxl`) declares one `UnetLayout`; `unet_layout` finds it in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoraValueError


@dataclass(frozen=True)
class UnetLayout:
    """The block layout of an SD-style UNet, as far as module names depend on it.

    ``down_attention[i]`` / ``up_attention[i]``: whether down/up block i has cross-attention transformers.
    ``layers_per_block`` resnets per down block (up blocks have one more). ``max_transformer_depth``: the largest
    number of transformer blocks in any attention (its ``transformer_blocks.N`` index stays below it).
    ``text_time_embedding``: SDXL's ``add_embedding`` (LDM ``label_emb.0``) for pooled text + size conditioning.
    """

    name: str
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    layers_per_block: int = 2
    max_transformer_depth: int = 1
    text_time_embedding: bool = False

    @property
    def levels(self) -> int:
        return len(self.down_attention)


def unet_layout(family: str) -> UnetLayout:
    """The UNet layout of ``family``; unknown or non-UNet families raise `LoraValueError` naming the UNet ones."""
    from . import REGISTRY  # the registry imports this module: look it up at call time

    layout = getattr(REGISTRY.get(family), "unet_layout", None)
    if layout is None:
        known = sorted(f for f, fam in REGISTRY.items() if fam.unet_layout is not None)
        raise LoraValueError(f"unknown UNet family '{family}'", hint=f"known UNet families: {', '.join(known)}")
    return layout
