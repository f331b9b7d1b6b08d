"""Qwen-Image (and Qwen-Image-Edit, Edit-2509, Edit-2511): a dual-stream DiT with Qwen2.5-VL-7B as text encoder.

Released in diffusers format, and ComfyUI's ``comfy/ldm/qwen_image/model.py`` uses the same names, so the original
and diffusers names are one (``transformer_blocks.N.attn.to_q``, ``img_mod.1``, ``img_mlp.net.0.proj`` …) and
nothing is fused. Several of these names are also FLUX.1's diffusers names for other modules (the double-block
attention projections, ``norm_out.linear``, ``proj_out``, the timestep embedder), with the same shapes at the
released widths: a LoRA touching only those fits both families. The modulation and MLP layers, which trainers
include by default, tell them apart; otherwise the file's metadata (``ss_base_model_version``,
``modelspec.architecture``) or ``family=`` must. Text-encoder LoRAs are not seen in the wild.
"""

from __future__ import annotations

from .tables import from_tables

_BLOCK = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)  # fmt: skip
ORIGINAL = (
    *(f"transformer_blocks.{{i}}.{m}" for m in _BLOCK),
    "img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear", "proj_out",
)  # fmt: skip

# A diffusers QwenImageTransformer2DModel config: the released layout with tiny widths (hidden 32 = 2 heads × 16).
# ComfyUI reads only in_channels and the layer count (width fixed at 3072), so its tiny model needs a config.
TINY_CONFIG: dict[str, object] = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
)  # fmt: skip

FAMILY = from_tables(
    family_id="qwen_image",
    label="Qwen-Image",
    original=ORIGINAL,
    diffusers={t: (t, None) for t in ORIGINAL},
    text_encoders=(),
    blocks=("transformer_blocks.{i}",),
    tiny_config=TINY_CONFIG,
    ss_base_model_version="qwen_image",
    modelspec_architecture="qwen-image/lora",
)
