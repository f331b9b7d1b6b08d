"""A tiny Qwen-Image-shaped transformer: random weights, no network, the released module names.

`tiny_qwen_image_transformer` builds a ``diffusers.QwenImageTransformer2DModel`` with the released block layout
(dual-stream blocks with img/txt modulation, GELU-tanh MLPs, RMS q/k norms, 2×2 patches) and the tiny widths of
``families.get("qwen_image").tiny_config``. ComfyUI's ``comfy/ldm/qwen_image/model.py`` has the same state-dict
names, so its weights load there unchanged; `comfy_unet_config` is ComfyUI's model config of the same model
(ComfyUI's detector reads only ``in_channels`` and the layer count, its width is fixed at 3072, so tests build the
model from it).

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
    from diffusers import QwenImageTransformer2DModel

TINY_QWEN_IMAGE_CONFIG: dict[str, Any] = dict(families.get("qwen_image").tiny_config)
"""``QwenImageTransformer2DModel`` config of the tiny model (hidden 32 = 2 heads × 16, 2 blocks, 2×2 patches)."""


_RMS_SCALE = re.compile(r"(^txt_norm|\.norm_(?:added_)?[qk])\.weight$")


def tiny_qwen_image_transformer(
    seed: int = 0, config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> QwenImageTransformer2DModel:
    """A ``QwenImageTransformer2DModel`` (eval mode) with random weights that depend only on ``seed``.

    ``config`` entries override `TINY_QWEN_IMAGE_CONFIG`. Every parameter is drawn, in fp32, from
    N(0, 0.02²) (biases too, so no tensor is identically zero), except the RMS-norm scales (``txt_norm``,
    ``attn.norm_q/norm_k/norm_added_q/norm_added_k``), which are 1 + the same noise; the model is then cast to
    ``dtype``. The caller's global RNG is left untouched.
    """
    from diffusers import QwenImageTransformer2DModel

    cfg = {**TINY_QWEN_IMAGE_CONFIG, **(config or {})}
    with seeded(seed):
        model = QwenImageTransformer2DModel(**cfg)
    return randomize(model, seed, _RMS_SCALE, dtype)


def tiny_qwen_image_state_dict(
    seed: int = 0, config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The state dict of ``tiny_qwen_image_transformer(seed, config, dtype)``: the original, diffusers and ComfyUI
    names alike (``transformer_blocks.0.attn.to_q.weight``, ``img_in.weight`` …), detached copies."""
    model = tiny_qwen_image_transformer(seed, config, dtype)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def comfy_unet_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` (``comfy.supported_models.QwenImage(...)``, keyword arguments of ComfyUI's
    ``QwenImageTransformer2DModel``) for the diffusers config `TINY_QWEN_IMAGE_CONFIG` updated by ``config``.

    The keywords are diffusers' own (ComfyUI's class mirrors it); ``in_channels`` is the packed patch width in both
    (latent channels × patch²), so ComfyUI's latents have ``in_channels // patch_size²`` channels.
    """
    cfg = {**TINY_QWEN_IMAGE_CONFIG, **(config or {})}
    for flag in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"):
        if cfg.get(flag):
            raise ValueError(f"the tiny ComfyUI Qwen-Image config does not cover {flag}=True")
    return dict(
        image_model="qwen_image", patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"], num_layers=cfg["num_layers"], attention_head_dim=cfg["attention_head_dim"],
        num_attention_heads=cfg["num_attention_heads"], joint_attention_dim=cfg["joint_attention_dim"],
        axes_dims_rope=tuple(cfg["axes_dims_rope"]),
    )  # fmt: skip


def tiny_qwen_image_inputs(
    m: QwenImageTransformer2DModel, seed: int = 0, h: int = 8, w: int = 8, txt: int = 8
) -> dict[str, Any]:
    """Seeded random inputs of one sample: a latent of ``in_channels // patch²`` channels × h × w (h, w multiples
    of the patch size; ``latent``, [1, C, h, w]), ``txt`` text tokens (``context``, [1, txt, joint_attention_dim])
    and timestep 0.5 (``t``, [1]); also ``packed``, the latent as diffusers takes it ([1, h·w / p², in_channels],
    patches in row-major order, each patch's values channel-major, as ComfyUI and diffusers' pipeline pack them)."""
    cfg = m.config
    p = cfg.patch_size
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, cfg.in_channels // (p * p), h, w, generator=gen)
    context = torch.randn(1, txt, cfg.joint_attention_dim, generator=gen)
    c = latent.shape[1]
    packed = latent.view(1, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(1, (h // p) * (w // p), c * p * p)
    return dict(latent=latent, context=context, t=torch.tensor([0.5]), packed=packed)


def unpack(out: torch.Tensor, channels: int, h: int, w: int, p: int = 2) -> torch.Tensor:
    """diffusers' packed output [1, h·w / p², channels · p²] back to a latent [1, channels, h, w]."""
    return out.view(1, h // p, w // p, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(1, channels, h, w)


def tiny_qwen_image_forward(
    m: QwenImageTransformer2DModel, seed: int = 0, h: int = 8, w: int = 8, txt: int = 8
) -> torch.Tensor:
    """One forward pass on `tiny_qwen_image_inputs` (timestep 0.5, no text mask), unpacked to a latent
    [1, out_channels, h, w]."""
    cfg = m.config
    x = tiny_qwen_image_inputs(m, seed, h, w, txt)
    p = cfg.patch_size
    with torch.no_grad():
        out = m(hidden_states=x["packed"], encoder_hidden_states=x["context"], timestep=x["t"],
                img_shapes=[[(1, h // p, w // p)]], return_dict=False)[0]
    return unpack(out, cfg.out_channels, h, w, p)
