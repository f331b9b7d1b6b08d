"""A tiny Z-Image-shaped transformer: random weights, no network, real module names in both naming schemes.

`tiny_zimage_transformer` builds a ``diffusers.ZImageTransformer2DModel`` (the official release's names: q, k, v
apart) with the released block layout (main layers, noise refiners with adaLN modulation, context refiners without,
SwiGLU feed-forward, RMS q/k norms, 2×2 patches) and the tiny widths of ``families.get("zimage").tiny_config``.
`diffusers_to_comfy` renames (and fuses) its weights into ComfyUI's internal names — ComfyUI runs Z-Image as a
Lumina-2 NextDiT: ``layers.N.attention.qkv`` = [q; k; v], ``attention.out``, ``attention.q_norm``,
``x_embedder``, ``final_layer`` — and `comfy_to_diffusers` goes back. `comfy_unet_config` is the ComfyUI model
config of the same model (ComfyUI's detector only knows dim 3840, so tests build the model from it).

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
    from diffusers import ZImageTransformer2DModel

TINY_ZIMAGE_CONFIG: dict[str, Any] = dict(families.get("zimage").tiny_config)
"""``ZImageTransformer2DModel`` config of the tiny model (dim 32, 2 layers, 1 refiner of each kind, 2 heads)."""


# The one patch size ComfyUI's NextDiT has (diffusers keeps one embedder/final layer per "patch-fpatch" size).
PATCH = "2-1"
_QKV = ("q", "k", "v")
# One-to-one renames inside a block (diffusers → ComfyUI), after "<block>.N.".
_BLOCK_RENAMES = {"attention.to_out.0.": "attention.out.", "attention.norm_q.": "attention.q_norm.",
                  "attention.norm_k.": "attention.k_norm."}
# Top-level prefixes (diffusers → ComfyUI).
_TOP_RENAMES = {f"all_x_embedder.{PATCH}.": "x_embedder.", f"all_final_layer.{PATCH}.": "final_layer."}
_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner|siglip_refiner)\.\d+)\.(.+)$")
_RMS_SCALE = re.compile(r"(^|\.)(attention\.norm_[qk]|attention_norm[12]|ffn_norm[12]|cap_embedder\.0)\.weight$")


def tiny_zimage_transformer(
    seed: int = 0, config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> ZImageTransformer2DModel:
    """A ``ZImageTransformer2DModel`` (eval mode) with random weights that depend only on ``seed``.

    ``config`` entries override `TINY_ZIMAGE_CONFIG`. Every parameter is drawn, in fp32, from N(0, 0.02²)
    (biases and the pad tokens too, so no tensor is identically zero, unlike a fresh model's zero pad tokens),
    except the RMS-norm scales (``norm_q``/``norm_k``, ``attention_norm1/2``, ``ffn_norm1/2``, ``cap_embedder.0``),
    which are 1 + the same noise; the model is then cast to ``dtype``. The caller's global RNG is left untouched.
    """
    from diffusers import ZImageTransformer2DModel

    cfg = {**TINY_ZIMAGE_CONFIG, **(config or {})}
    with seeded(seed):
        model = ZImageTransformer2DModel(**cfg)
    return randomize(model, seed, _RMS_SCALE, dtype)


def _fail(what: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"not a {what} Z-Image transformer state dict; " + "; ".join(problems))


def diffusers_to_comfy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``ZImageTransformer2DModel`` state dict under ComfyUI's internal (NextDiT) names.

    In every block (``layers.N``, ``noise_refiner.N``, ``context_refiner.N``) ``attention.to_q/to_k/to_v`` are
    fused into ``attention.qkv`` (rows stacked q, k, v; each part's rows are its own tensor's), ``attention.to_out.0``
    becomes ``attention.out`` and ``attention.norm_q/norm_k`` become ``attention.q_norm/k_norm``;
    ``all_x_embedder.2-1`` becomes ``x_embedder`` and ``all_final_layer.2-1`` ``final_layer``; every other name
    (feed-forward, norms, adaLN modulation, embedders, pad tokens) is the same in both. Every key is used; renamed
    tensors are the input's own (not copies). Raises ``ValueError`` naming keys that are missing (part of a q/k/v
    triple, or the image embedder) or cannot be converted (ComfyUI-named, prefixed, other patch sizes).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    bad, missing = [], []
    for key, t in state_dict.items():
        if m := _BLOCK.match(key):
            block, rest = m.groups()
            if pm := re.fullmatch(r"attention\.to_([qkv])\.(weight|bias)", rest):
                qkv.setdefault(f"{block}.attention.qkv.{pm[2]}", {})[pm[1]] = t
                continue
            if re.match(r"attention\.(qkv|out|[qk]_norm)\.", rest):
                bad.append(key)  # already ComfyUI's
                continue
            new = next((f"{block}.{c}{rest[len(d):]}" for d, c in _BLOCK_RENAMES.items() if rest.startswith(d)), key)
        elif key.startswith(("all_x_embedder.", "all_final_layer.")):
            new = next((c + key[len(d):] for d, c in _TOP_RENAMES.items() if key.startswith(d)), None)
            if new is None:
                bad.append(key)  # a patch size ComfyUI does not have
                continue
        elif key.startswith(("x_embedder.", "final_layer.", "model.", "diffusion_model.", "transformer.")):
            bad.append(key)
            continue
        else:
            new = key
        out[new] = t
    for fused_key, parts in qkv.items():
        if set(parts) != set(_QKV):
            missing += [fused_key.replace(".qkv.", f".to_{p}.") for p in _QKV if p not in parts]
            continue
        out[fused_key] = torch.cat([parts[p] for p in _QKV], dim=0)
    if not any(k.startswith("x_embedder.") for k in out):
        missing.append(f"all_x_embedder.{PATCH}.weight")
    _fail("diffusers", ([f"missing keys: {sorted(missing)}"] if missing else [])
          + ([f"keys not converted: {sorted(bad)}"] if bad else []))
    return out


def comfy_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_to_comfy`: ComfyUI-internal names (no ``diffusion_model.`` prefix) → diffusers.

    Each ``attention.qkv`` is split by sizes read from the tensors: q has as many rows as the block's
    ``attention.out`` weight has columns (heads × head width), k and v half the rest each (grouped-query attention
    would show as k, v narrower than q; Z-Image has as many KV heads as heads, so equal thirds). Raises
    ``ValueError`` naming missing or unconvertible keys.
    """
    out: dict[str, torch.Tensor] = {}
    bad, missing = [], []
    for key, t in state_dict.items():
        if m := _BLOCK.match(key):
            block, rest = m.groups()
            if pm := re.fullmatch(r"attention\.qkv\.(weight|bias)", rest):
                proj = state_dict.get(f"{block}.attention.out.weight")
                if proj is None:
                    missing.append(f"{block}.attention.out.weight")
                    continue
                q = int(proj.shape[1])
                kv, odd = divmod(int(t.shape[0]) - q, 2)
                if odd or kv <= 0:
                    bad.append(f"{key} ({t.shape[0]} rows, attention.out reads {q})")
                    continue
                for p, rows in zip(_QKV, t.split([q, kv, kv], dim=0)):
                    out[f"{block}.attention.to_{p}.{pm[1]}"] = rows.clone()
                continue
            if re.match(r"attention\.(to_[qkv]|to_out|norm_[qk])\.", rest):
                bad.append(key)  # already diffusers'
                continue
            inverse = {c: d for d, c in _BLOCK_RENAMES.items()}
            new = next((f"{block}.{d}{rest[len(c):]}" for c, d in inverse.items() if rest.startswith(c)), key)
        elif key.startswith(("x_embedder.", "final_layer.")):
            new = next(d + key[len(c):] for d, c in _TOP_RENAMES.items() if key.startswith(c))
        elif key.startswith(("all_x_embedder.", "all_final_layer.", "model.", "diffusion_model.", "transformer.")):
            bad.append(key)
            continue
        else:
            new = key
        out[new] = t
    if "x_embedder.weight" not in state_dict:
        missing.append("x_embedder.weight")
    _fail("ComfyUI", ([f"missing keys: {sorted(missing)}"] if missing else [])
          + ([f"keys not converted: {sorted(bad)}"] if bad else []))
    return out


def tiny_zimage_comfy_state_dict(
    seed: int = 0, config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The ComfyUI-named state dict of ``tiny_zimage_transformer(seed, config, dtype)`` (see `diffusers_to_comfy`)."""
    return diffusers_to_comfy(tiny_zimage_transformer(seed, config, dtype).state_dict())


def comfy_unet_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` (``comfy.supported_models.ZImage(...)``, NextDiT keyword arguments) for the
    diffusers config ``TINY_ZIMAGE_CONFIG`` updated by ``config``: what ComfyUI's detector sets for Z-Image
    (``z_image_modulation``, ``ffn_dim_multiplier`` 8/3, ``time_scale``, pad tokens) with the tiny widths it cannot
    read itself.

    ``multiple_of`` is 1 so that the SwiGLU width is diffusers' ``int(dim / 3 * 8)`` (ComfyUI's default rounds up to
    256, which the released width 10240 already is). One difference stays that no config key fixes: ComfyUI sizes
    the timestep MLP ``256 → min(dim, 1024) → 256``, diffusers ``256 → 1024 → min(dim, 256)``; the two agree only
    from dim 1024 up (the released 3840), so a tiny ComfyUI model needs its ``t_embedder`` rebuilt with diffusers'
    sizes (ComfyUI's own ``TimestepEmbedder(1024, output_size=min(dim, 256))``) before loading these weights.
    """
    cfg = {**TINY_ZIMAGE_CONFIG, **(config or {})}
    (patch,), (f_patch,) = cfg["all_patch_size"], cfg["all_f_patch_size"]
    if f"{patch}-{f_patch}" != PATCH:
        raise ValueError(f"ComfyUI's NextDiT has patch size {PATCH} only, not {patch}-{f_patch}")
    return dict(
        image_model="lumina2", patch_size=patch, in_channels=cfg["in_channels"], dim=cfg["dim"],
        cap_feat_dim=cfg["cap_feat_dim"], n_layers=cfg["n_layers"], n_refiner_layers=cfg["n_refiner_layers"],
        qk_norm=cfg.get("qk_norm", True), n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"],
        axes_dims=list(cfg["axes_dims"]), axes_lens=list(cfg["axes_lens"]), rope_theta=cfg.get("rope_theta", 256.0),
        ffn_dim_multiplier=8.0 / 3.0, multiple_of=1, norm_eps=cfg.get("norm_eps", 1e-5), z_image_modulation=True,
        time_scale=cfg.get("t_scale", 1000.0), pad_tokens_multiple=32,
    )  # fmt: skip


def tiny_zimage_forward(
    m: ZImageTransformer2DModel, seed: int = 0, h: int = 8, w: int = 8, txt: int = 8
) -> torch.Tensor:
    """One forward pass on seeded random inputs: one latent of ``in_channels`` × 1 frame × h × w (h, w multiples of
    the patch size) and ``txt`` caption tokens, at timestep 0.5. diffusers' Z-Image takes lists (one tensor per
    sample, ``x = [C, F, H, W]``, ``cap_feats = [L, cap_feat_dim]``) and returns a list; here stacked:
    [1, C, 1, h, w]."""
    gen = torch.Generator().manual_seed(seed)
    cfg = m.config
    x = torch.randn(cfg.in_channels, 1, h, w, generator=gen)
    cap = torch.randn(txt, cfg.cap_feat_dim, generator=gen)
    with torch.no_grad():
        out = m(x=[x], t=torch.tensor([0.5]), cap_feats=[cap], return_dict=False)[0]
    return torch.stack(out)
