"""SD 1.x and SD 2.x: a 4-level UNet with attention in the top three levels, one CLIP text encoder.

SD 2.x uses OpenCLIP-H as its text encoder; LoRA files and ComfyUI spell it like SD 1.x's CLIP-L, so one family
covers both. kohya's trainers write SD 1.x UNets in diffusers spelling (``lora_unet_down_blocks_0_…``).
"""

from __future__ import annotations

from .base import TextEncoder
from .sd import sd_family
from .unet_layout import UnetLayout

LAYOUT = UnetLayout("sd1", down_attention=(True, True, True, False), up_attention=(False, True, True, True))

# A diffusers UNet2DConditionModel config with the released layout and tiny widths (lora_ops.testing.tiny).
TINY_CONFIG: dict[str, object] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64, 64),
    layers_per_block=2,
    attention_head_dim=4,  # SD 1.5 spells heads as attention_head_dim (8 there)
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=False,  # SD 1.5: proj_in/proj_out are 1x1 convs
)

FAMILY = sd_family(
    "sd1",
    "SD1.x",
    LAYOUT,
    (TextEncoder("te1", "clip", ("lora_te_", "lora_te1_"), "text_encoders.clip_l.transformer.", "text_encoder"),),
    kohya_style="diffusers",
    tiny_config=TINY_CONFIG,
    ss_base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1/lora",
)
