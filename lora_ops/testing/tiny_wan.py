"""A tiny Wan-shaped video transformer: random weights, no network, diffusers and original (Wan-Video) names.

`tiny_wan_transformer` builds a ``diffusers.WanTransformer3DModel`` with the released block layout (self-attention
with RMS q/k norms, cross-attention on umT5 features with an affine pre-norm, GELU-tanh FFN, adaLN ``modulation``
tables, a Conv3d 1×2×2 patch embedding) and the tiny widths of ``families.get("wan").tiny_config`` (dim 128 = one
head of 128, text_dim 4096, freq_dim 256: the widths ComfyUI's detector fixes, so ComfyUI detects the original-named
state dict as Wan). `wan_to_diffusers` / `diffusers_to_wan` rename every tensor between the two schemes, exactly
(the inverse of diffusers' ``single_file_utils.convert_wan_transformer_to_diffusers`` on the T2V and I2V names).

Requires diffusers (the ``hf`` extra); imported lazily so ``lora_ops`` itself does not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import families
from .random_weights import randomize, seeded

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

TINY_WAN_CONFIG: dict[str, Any] = dict(families.get("wan").tiny_config)
"""``WanTransformer3DModel`` config of the tiny model (dim 128 = 1 head × 128, ffn 64, 2 blocks, 16 → 16 channels)."""


_NORM_SCALE = re.compile(r"(\.norm_(?:q|k|added_k)|\.norm2|image_embedder\.norm[12])\.weight$")

# Original module → diffusers module. Parameters keep their leaf name (weight / bias).
_BLOCK_MODULES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",  # the affine cross-attention pre-norm: original norm3 is diffusers' norm2
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}  # fmt: skip
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
# Whole tensors (no leaf): the adaLN tables.
_BLOCK_TENSORS = {"modulation": "scale_shift_table"}
_TOP_TENSORS = {"head.modulation": "scale_shift_table"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def tiny_wan_transformer(
    seed: int = 0, config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> WanTransformer3DModel:
    """A ``WanTransformer3DModel`` (eval mode) with random weights that depend only on ``seed``.

    ``config`` entries override `TINY_WAN_CONFIG` (e.g. ``image_dim`` for an I2V-shaped model). Every parameter is
    drawn, in fp32, from N(0, 0.02²) (biases and adaLN tables too, so no tensor is identically zero), except
    the norm scales (RMS q/k norms, the cross-attention pre-norm, the image embedder's layer norms), which are 1 +
    the same noise; the model is then cast to ``dtype``. The caller's global RNG is left untouched.
    """
    from diffusers import WanTransformer3DModel

    cfg = {**TINY_WAN_CONFIG, **(config or {})}
    with seeded(seed):
        model = WanTransformer3DModel(**cfg)
    return randomize(model, seed, _NORM_SCALE, dtype)


def _tables(to_diffusers: bool) -> tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, str]]:
    tables = (_BLOCK_MODULES, _TOP_MODULES, _BLOCK_TENSORS, _TOP_TENSORS)
    return tables if to_diffusers else tuple({v: k for k, v in t.items()} for t in tables)  # type: ignore[return-value]


def _rename(key: str, to_diffusers: bool) -> str | None:
    block_modules, top_modules, block_tensors, top_tensors = _tables(to_diffusers)
    if key in top_tensors:
        return top_tensors[key]
    m = _BLOCK.fullmatch(key)
    if m:
        index, rest = m.groups()
        if rest in block_tensors:
            return f"blocks.{index}.{block_tensors[rest]}"
        module, _, leaf = rest.rpartition(".")
        return f"blocks.{index}.{block_modules[module]}.{leaf}" if module in block_modules else None
    module, _, leaf = key.rpartition(".")
    return f"{top_modules[module]}.{leaf}" if module in top_modules else None


def _convert(state_dict: Mapping[str, torch.Tensor], to_diffusers: bool) -> dict[str, torch.Tensor]:
    what = "original (Wan-Video)" if to_diffusers else "diffusers"
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        new = _rename(key, to_diffusers)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"two {what} Wan tensors map to '{new}'")
        out[new] = tensor
    if unknown:
        raise ValueError(f"not {what} Wan transformer tensors (or not covered): {sorted(unknown)[:5]}")
    return out


def wan_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-named (Wan-Video / ComfyUI) Wan transformer state dict renamed to ``WanTransformer3DModel``'s
    names. Every tensor is used, unchanged (nothing is fused, split or reordered); an unknown key raises ValueError.
    Agrees with diffusers' ``convert_wan_transformer_to_diffusers`` on the T2V and I2V tensors."""
    return _convert(state_dict, to_diffusers=True)


def diffusers_to_wan(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `wan_to_diffusers`: a ``WanTransformer3DModel`` state dict under the original names
    (``blocks.N.self_attn.q``, ``blocks.N.modulation``, ``norm3``, ``head.head``, ``head.modulation`` …)."""
    return _convert(state_dict, to_diffusers=False)


def tiny_wan_state_dict(
    seed: int = 0, config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """``tiny_wan_transformer(seed, config, dtype)``'s weights under the original (ComfyUI) names, detached copies."""
    model = tiny_wan_transformer(seed, config, dtype)
    return diffusers_to_wan({k: v.detach().clone() for k, v in model.state_dict().items()})


def tiny_wan_inputs(
    m: WanTransformer3DModel, seed: int = 0, frames: int = 2, h: int = 4, w: int = 4, txt: int = 8
) -> dict[str, torch.Tensor]:
    """Seeded random inputs of one sample: a video latent [1, in_channels, frames, h, w] (``latent``; h, w multiples
    of the 2×2 patch), ``txt`` umT5 tokens (``context``, [1, txt, text_dim]) and timestep 500 (``t``, [1]; Wan's
    models take timesteps on the 0–1000 scale, diffusers and ComfyUI alike)."""
    cfg = m.config
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, cfg.in_channels, frames, h, w, generator=gen)
    context = torch.randn(1, txt, cfg.text_dim, generator=gen)
    return dict(latent=latent, context=context, t=torch.tensor([500.0]))


def tiny_wan_forward(
    m: WanTransformer3DModel, seed: int = 0, frames: int = 2, h: int = 4, w: int = 4, txt: int = 8
) -> torch.Tensor:
    """One forward pass of the diffusers model on `tiny_wan_inputs`: [1, out_channels, frames, h, w]."""
    x = tiny_wan_inputs(m, seed, frames, h, w, txt)
    with torch.no_grad():
        return m(hidden_states=x["latent"], timestep=x["t"], encoder_hidden_states=x["context"], return_dict=False)[0]
