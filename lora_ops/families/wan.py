"""Wan 2.1 / 2.2 (text/image to video; 2.2 A14B ships two experts, high- and low-noise, as two models and two
LoRA files): a DiT with umT5-XXL as text encoder (and CLIP-H image embeddings in 2.1 I2V).

Original (Wan-Video) names are ComfyUI's internal names (``blocks.N.self_attn.q``, ``cross_attn.k_img``,
``ffn.0``, ``head.head``); diffusers' ``WanTransformer3DModel`` renames them (``blocks.N.attn1.to_q``,
``attn2.add_k_proj``, ``ffn.net.0.proj``, ``proj_out``) — ``single_file_utils.convert_wan_transformer_to_diffusers``.
Nothing is fused. ComfyUI maps no diffusers name for Wan (0 of 406 modules), so diffusers-named Wan LoRAs apply in
ComfyUI only through LoRA Ops. The Conv3d ``patch_embedding`` is not a LoRA target here, and the full-weight deltas
of distillation LoRAs (``.diff`` / ``.diff_b``) are not applied yet (refused with that reason).
"""

from __future__ import annotations

from .tables import from_tables

# Original module → diffusers module, per block ({i}) and outside the blocks.
_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}  # fmt: skip
_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "head.head": "proj_out",
}
ORIGINAL = (*(f"blocks.{{i}}.{o}" for o in _BLOCK), *_TOP)
DIFFUSERS = {**{f"blocks.{{i}}.{d}": (f"blocks.{{i}}.{o}", None) for o, d in _BLOCK.items()},
             **{d: (o, None) for o, d in _TOP.items()}}

# A diffusers WanTransformer3DModel config with tiny widths that ComfyUI (both trees) detects from the original
# names: dim 128 (heads = dim // 128), text_dim 4096 and freq_dim 256 (which ComfyUI's detector fixes).
TINY_CONFIG: dict[str, object] = dict(
    patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
)  # fmt: skip

FAMILY = from_tables(
    family_id="wan",
    label="Wan",
    original=ORIGINAL,
    diffusers=DIFFUSERS,
    text_encoders=(),
    blocks=("blocks.{i}",),
    tiny_config=TINY_CONFIG,
    ss_base_model_version="wan",
    modelspec_architecture="wan/lora",
)
