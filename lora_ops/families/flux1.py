"""FLUX.1 (dev, schnell; Kontext and Fill share the names): a double-/single-stream DiT, CLIP-L + T5-XXL.

Canonical names are BFL's single-file names, which ComfyUI uses internally and kohya writes
(``double_blocks.N.img_attn.qkv``). diffusers' `FluxTransformer2DModel` splits three fused weights:

    double_blocks.N.img_attn.qkv   [q; k; v]        ↔ transformer_blocks.N.attn.to_q / to_k / to_v
    double_blocks.N.txt_attn.qkv   [q; k; v]        ↔ transformer_blocks.N.attn.add_q_proj / add_k_proj / add_v_proj
    single_blocks.N.linear1        [q; k; v; mlp]   ↔ single_transformer_blocks.N.attn.to_q / to_k / to_v, proj_mlp

with the part sizes 1:1:1 and 1:1:1:4 of the hidden width (mlp_ratio 4), and stores the final
``adaLN_modulation.1`` output halves swapped (BFL shift, scale; diffusers scale, shift). Sources: ComfyUI
``comfy/utils.py:flux_to_diffusers``, diffusers ``convert_flux_transformer_checkpoint_to_diffusers``.
"""

from __future__ import annotations

from .base import FusedWeight, Part, TextEncoder
from .tables import from_tables

QKV = (Part("q"), Part("k"), Part("v"))
FUSED = (
    FusedWeight(r"double_blocks\.\d+\.(img|txt)_attn\.qkv", QKV),
    FusedWeight(r"single_blocks\.\d+\.linear1", (*QKV, Part("mlp", 4))),
)

# Original module paths with weights a LoRA can target ({i}: a block index).
ORIGINAL = (
    "double_blocks.{i}.img_attn.qkv", "double_blocks.{i}.img_attn.proj",
    "double_blocks.{i}.txt_attn.qkv", "double_blocks.{i}.txt_attn.proj",
    "double_blocks.{i}.img_mlp.0", "double_blocks.{i}.img_mlp.2",
    "double_blocks.{i}.txt_mlp.0", "double_blocks.{i}.txt_mlp.2",
    "double_blocks.{i}.img_mod.lin", "double_blocks.{i}.txt_mod.lin",
    "single_blocks.{i}.linear1", "single_blocks.{i}.linear2", "single_blocks.{i}.modulation.lin",
    "img_in", "txt_in",
    "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
    "guidance_in.in_layer", "guidance_in.out_layer",
    "final_layer.linear", "final_layer.adaLN_modulation.1",
)  # fmt: skip

# diffusers module path → (original path, part of a fused weight or None).
DIFFUSERS = {
    "transformer_blocks.{i}.attn.to_q": ("double_blocks.{i}.img_attn.qkv", "q"),
    "transformer_blocks.{i}.attn.to_k": ("double_blocks.{i}.img_attn.qkv", "k"),
    "transformer_blocks.{i}.attn.to_v": ("double_blocks.{i}.img_attn.qkv", "v"),
    "transformer_blocks.{i}.attn.to_out.0": ("double_blocks.{i}.img_attn.proj", None),
    "transformer_blocks.{i}.attn.add_q_proj": ("double_blocks.{i}.txt_attn.qkv", "q"),
    "transformer_blocks.{i}.attn.add_k_proj": ("double_blocks.{i}.txt_attn.qkv", "k"),
    "transformer_blocks.{i}.attn.add_v_proj": ("double_blocks.{i}.txt_attn.qkv", "v"),
    "transformer_blocks.{i}.attn.to_add_out": ("double_blocks.{i}.txt_attn.proj", None),
    "transformer_blocks.{i}.ff.net.0.proj": ("double_blocks.{i}.img_mlp.0", None),
    "transformer_blocks.{i}.ff.net.2": ("double_blocks.{i}.img_mlp.2", None),
    "transformer_blocks.{i}.ff_context.net.0.proj": ("double_blocks.{i}.txt_mlp.0", None),
    "transformer_blocks.{i}.ff_context.net.2": ("double_blocks.{i}.txt_mlp.2", None),
    "transformer_blocks.{i}.norm1.linear": ("double_blocks.{i}.img_mod.lin", None),
    "transformer_blocks.{i}.norm1_context.linear": ("double_blocks.{i}.txt_mod.lin", None),
    "single_transformer_blocks.{i}.attn.to_q": ("single_blocks.{i}.linear1", "q"),
    "single_transformer_blocks.{i}.attn.to_k": ("single_blocks.{i}.linear1", "k"),
    "single_transformer_blocks.{i}.attn.to_v": ("single_blocks.{i}.linear1", "v"),
    "single_transformer_blocks.{i}.proj_mlp": ("single_blocks.{i}.linear1", "mlp"),
    "single_transformer_blocks.{i}.proj_out": ("single_blocks.{i}.linear2", None),
    "single_transformer_blocks.{i}.norm.linear": ("single_blocks.{i}.modulation.lin", None),
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "proj_out": ("final_layer.linear", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", None),
}

# A diffusers FluxTransformer2DModel config: the released layout with tiny widths (lora_ops.testing.tiny_flux).
# ComfyUI ≥ 0.3.65 detects its BFL-named state dict: it reads hidden from img_in and sets heads = hidden // 128,
# and it fixes out_channels = 16 with 2×2 patches, so the token width must be 64 as in FLUX.1.
TINY_CONFIG: dict[str, object] = dict(
    patch_size=1,  # diffusers' FLUX takes latents already packed 2×2 into tokens
    in_channels=64,  # 16 latent channels × 2×2 packing, as in FLUX.1; out_channels defaults to the same
    num_layers=2,  # double-stream blocks (FLUX.1: 19)
    num_single_layers=2,  # single-stream blocks (FLUX.1: 38)
    attention_head_dim=128,  # as in FLUX.1; must equal sum(axes_dims_rope)
    num_attention_heads=1,  # hidden = 1 × 128 (FLUX.1: 24 × 128 = 3072)
    joint_attention_dim=32,  # T5 width (FLUX.1: 4096)
    pooled_projection_dim=32,  # CLIP-L pooled width (FLUX.1: 768)
    guidance_embeds=True,  # FLUX.1-dev
    axes_dims_rope=(16, 56, 56),
)

FAMILY = from_tables(
    family_id="flux1",
    label="FLUX.1",
    original=ORIGINAL,
    diffusers=DIFFUSERS,
    text_encoders=(
        TextEncoder("te1", "clip", ("lora_te1_", "lora_te_"), "text_encoders.clip_l.transformer.", "text_encoder"),
        # kohya writes T5 as lora_te3_, OneTrainer as lora_te2_
        TextEncoder("te3", "t5", ("lora_te3_", "lora_te2_"), "text_encoders.t5xxl.transformer.", "text_encoder_2"),
    ),
    fused=FUSED,
    swap_halves=frozenset({"final_layer.adaLN_modulation.1"}),
    blocks=("double_blocks.{i}", "single_blocks.{i}"),
    tiny_config=TINY_CONFIG,
    ss_base_model_version="flux1",  # what sd-scripts writes for FLUX.1 LoRAs
    modelspec_architecture="flux-1-dev/lora",
)
