"""Z-Image (Turbo, Base): a single-stream DiT (Lumina-2 NextDiT lineage) with Qwen3-4B as its text encoder.

Two spellings of one model. The official release and diffusers (`ZImageTransformer2DModel`) keep q, k, v apart
(``layers.N.attention.to_q``); ComfyUI implements Z-Image as a NextDiT and fuses them
(``layers.N.attention.qkv`` = [q; k; v], ``attention.out``, ``x_embedder``, ``final_layer``). Canonical names are
ComfyUI's, as for every family (what its patches target); the diffusers names map onto them with parts, the
feed-forward, modulation and embedder names are the same in both (ComfyUI ``comfy/utils.py:z_image_to_diffusers``,
diffusers ``convert_z_image_transformer_checkpoint_to_diffusers``). ``noise_refiner`` blocks have adaLN
modulation, ``context_refiner`` blocks do not. Text-encoder LoRAs for Qwen3 are not seen in the wild.
"""

from __future__ import annotations

from .base import FusedWeight, Part
from .tables import from_tables

QKV = (Part("q"), Part("k"), Part("v"))
FUSED = (FusedWeight(r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.qkv", QKV),)

_BLOCK = ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
ORIGINAL = (
    *(f"{b}.{{i}}.{m}" for b in ("layers", "noise_refiner", "context_refiner") for m in _BLOCK),
    "layers.{i}.adaLN_modulation.0", "noise_refiner.{i}.adaLN_modulation.0",
    "x_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1", "cap_embedder.1",
    "t_embedder.mlp.0", "t_embedder.mlp.2",
)  # fmt: skip


def _diffusers() -> dict[str, tuple[str, str | None]]:
    out: dict[str, tuple[str, str | None]] = {}
    for b in ("layers", "noise_refiner", "context_refiner"):
        for p in ("q", "k", "v"):
            out[f"{b}.{{i}}.attention.to_{p}"] = (f"{b}.{{i}}.attention.qkv", p)
        out[f"{b}.{{i}}.attention.to_out.0"] = (f"{b}.{{i}}.attention.out", None)
        for w in ("w1", "w2", "w3"):
            out[f"{b}.{{i}}.feed_forward.{w}"] = (f"{b}.{{i}}.feed_forward.{w}", None)
    for b in ("layers", "noise_refiner"):
        out[f"{b}.{{i}}.adaLN_modulation.0"] = (f"{b}.{{i}}.adaLN_modulation.0", None)
    out.update({
        "all_x_embedder.2-1": ("x_embedder", None),
        "all_final_layer.2-1.linear": ("final_layer.linear", None),
        "all_final_layer.2-1.adaLN_modulation.1": ("final_layer.adaLN_modulation.1", None),
        "cap_embedder.1": ("cap_embedder.1", None),
        "t_embedder.mlp.0": ("t_embedder.mlp.0", None),
        "t_embedder.mlp.2": ("t_embedder.mlp.2", None),
    })
    return out


DIFFUSERS = _diffusers()

# A diffusers ZImageTransformer2DModel config: the released layout (refiners, SwiGLU, 2×2 patches) with tiny
# widths (dim 32: ComfyUI's detector knows only dim 3840, so ComfyUI tests build the model from its config).
TINY_CONFIG: dict[str, object] = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
    n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
)  # fmt: skip

FAMILY = from_tables(
    family_id="zimage",
    label="Z-Image",
    original=ORIGINAL,
    diffusers=DIFFUSERS,
    text_encoders=(),
    fused=FUSED,
    blocks=("layers.{i}", "noise_refiner.{i}", "context_refiner.{i}"),
    tiny_config=TINY_CONFIG,
    ss_base_model_version="zimage",
    modelspec_architecture="z-image/lora",
)
