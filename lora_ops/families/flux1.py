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

import re

from ..errors import LoraFormatError
from .base import Family, FusedWeight, Part, TextEncoder

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
DIFFUSERS_ROOTS = frozenset(p.split(".", 1)[0] for p in DIFFUSERS)
COMPOUND_TOKENS = (
    "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
    "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer", "final_layer",
    "adaLN_modulation", "query_norm", "key_norm",
    "transformer_blocks", "single_transformer_blocks", "to_q", "to_k", "to_v", "to_out", "add_q_proj",
    "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "proj_mlp", "proj_out", "norm1_context", "norm_out",
    "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder",
    "guidance_embedder", "linear_1", "linear_2",
    "wi_0", "wi_1", "layer_norm", "final_layer_norm",  # T5
)  # fmt: skip

_INDEX = r"(0|[1-9]\d*)"


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), _INDEX))


_ORIGINAL = [_compile(t) for t in ORIGINAL]
_FROM_DIFFUSERS = [(_compile(d), o, part) for d, (o, part) in DIFFUSERS.items()]
_TO_DIFFUSERS = {(o, part): d for d, (o, part) in DIFFUSERS.items()}
_BLOCK = re.compile(rf"((?:double|single)_blocks\.{_INDEX})\.")


def _unknown(path: str, spelling: str) -> LoraFormatError:
    return LoraFormatError(f"not a module of the FLUX.1 transformer in {spelling} naming", key=path,
                           hint="check the model family, or that the key names a layer with weights")


def original_path(path: str) -> str:
    if any(p.fullmatch(path) for p in _ORIGINAL):
        return path
    raise _unknown(path, "BFL")


def from_diffusers(path: str) -> tuple[str, str | None]:
    for pattern, original, part in _FROM_DIFFUSERS:
        m = pattern.fullmatch(path)
        if m:
            return original.replace("{i}", m.group(1)) if m.groups() else original, part
    raise _unknown(path, "diffusers")


def to_diffusers(path: str, part: str | None) -> str:
    m = _BLOCK.match(path)
    template = path.replace(m.group(1), m.group(1).split(".")[0] + ".{i}", 1) if m else path
    target = _TO_DIFFUSERS.get((template, part))
    if target is None:
        raise LoraFormatError(f"FLUX.1 module has no diffusers name{f' for part {part!r}' if part else ''}",
                              key=path if part is None else f"{path}[{part}]")
    return target.replace("{i}", m.group(2)) if m else target


def is_diffusers_path(path: str) -> bool:
    return path.split(".", 1)[0] in DIFFUSERS_ROOTS


def knows(path: str) -> bool:
    try:
        from_diffusers(path) if is_diffusers_path(path) else original_path(path)
    except LoraFormatError:
        return False
    return True


def block_of(path: str) -> str | None:
    m = _BLOCK.match(path)
    return m.group(1) if m else None


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

FAMILY = Family(
    id="flux1",
    label="FLUX.1",
    diffusers_component="transformer",
    text_encoders=(
        TextEncoder("te1", "clip", ("lora_te1_", "lora_te_"), "text_encoders.clip_l.transformer.", "text_encoder"),
        # kohya writes T5 as lora_te3_, OneTrainer as lora_te2_
        TextEncoder("te3", "t5", ("lora_te3_", "lora_te2_"), "text_encoders.t5xxl.transformer.", "text_encoder_2"),
    ),
    original_path=original_path,
    from_diffusers=from_diffusers,
    to_diffusers=to_diffusers,
    is_diffusers_path=is_diffusers_path,
    knows=knows,
    block_of=block_of,
    fused=FUSED,
    swap_halves=frozenset({"final_layer.adaLN_modulation.1"}),
    kohya_style="original",
    compound_tokens=COMPOUND_TOKENS,
    tiny_config=TINY_CONFIG,
)
