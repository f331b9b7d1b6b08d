"""SDXL base: a 3-level UNet (no attention at full resolution, depth up to 10), CLIP-L + OpenCLIP-G.

kohya's trainers write SDXL UNets in LDM spelling (``lora_unet_input_blocks_4_1_…``). The refiner has another
layout and is not this family.
"""

from __future__ import annotations

from .base import TextEncoder
from .sd import sd_family
from .unet_layout import UnetLayout

LAYOUT = UnetLayout(
    "sdxl",
    down_attention=(False, True, True),
    up_attention=(True, True, False),
    max_transformer_depth=10,
    text_time_embedding=True,
)

# A diffusers UNet2DConditionModel config with the released layout and tiny widths (lora_ops.testing.tiny).
TINY_CONFIG: dict[str, object] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 2),  # SDXL: (1, 2, 10)
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=2 * 32,  # te1 hidden + te2 hidden
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    upcast_attention=False,
)

FAMILY = sd_family(
    "sdxl",
    "SDXL",
    LAYOUT,
    (
        TextEncoder("te1", "clip", ("lora_te1_", "lora_te_"), "text_encoders.clip_l.transformer.", "text_encoder"),
        TextEncoder("te2", "clip", ("lora_te2_",), "text_encoders.clip_g.transformer.", "text_encoder_2"),
    ),
    kohya_style="original",
    tiny_config=TINY_CONFIG,
    ss_base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
)
