"""Per-family facts about the SD-style UNet layouts, in one small table.

Everything else in `lora_ops.keymap` derives the module names from these facts; adding an SD-style UNet family
means adding one row. Transformer-based families (SD3, Flux) get their own keymap module instead.
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


UNET_LAYOUTS: dict[str, UnetLayout] = {
    # SD 1.x and SD 2.x: 4 levels, attention in the top three, depth 1 everywhere.
    "sd1": UnetLayout("sd1", down_attention=(True, True, True, False), up_attention=(False, True, True, True)),
    # SDXL base: 3 levels, no attention at the full-resolution level, depth (1, 2, 10) in the real model.
    "sdxl": UnetLayout(
        "sdxl",
        down_attention=(False, True, True),
        up_attention=(True, True, False),
        max_transformer_depth=10,
        text_time_embedding=True,
    ),
}


def unet_layout(family: str) -> UnetLayout:
    """The layout row of ``family``; unknown families raise `LoraValueError` listing the known ones."""
    try:
        return UNET_LAYOUTS[family]
    except KeyError:
        raise LoraValueError(
            f"unknown UNet family '{family}'", hint=f"known families: {', '.join(sorted(UNET_LAYOUTS))}"
        ) from None
