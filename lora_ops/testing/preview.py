"""A fixed, linear latent ↔ RGB map for SD 1.x latents: ComfyUI's "Latent2RGB" live-preview projection.

The tiny test models have random weights, so their VAE turns latents into pictures that say nothing about what a
LoRA learned. This map does not depend on any weights: ``latent_to_rgb`` is exactly ComfyUI's Latent2RGB previewer
for SD 1.5 (``comfy/latent_formats.py`` ``SD15.latent_rgb_factors``, applied to the scaled latents the denoiser
works in, then ``(x + 1) / 2`` clamped to [0, 1]); ``rgb_to_latent`` is its least-squares inverse on 8×8-pixel
averages, so that pictures → latents → pictures round-trips (up to the 8× downsampling and the colour gamut).
The demo uses the pair to train on pictures and to show what the sampler produced, one latent pixel per 8×8 block.
"""

from __future__ import annotations

import torch

# Rows: the 4 latent channels; columns: R, G, B (ComfyUI's SD15 latent format; no bias for SD 1.5).
SD15_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
DOWNSAMPLE = 8  # SD VAEs: one latent pixel per 8×8 image pixels


def _factors(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(SD15_LATENT_RGB_FACTORS, dtype=dtype)  # (4, 3)


def latent_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) → RGB (B, 3, h, w) in [0, 1], as ComfyUI's Latent2RGB preview draws them."""
    rgb = torch.einsum("bchw,cr->brhw", latents.detach().float(), _factors())
    return ((rgb + 1) / 2).clamp(0, 1)


def rgb_to_latent(images: torch.Tensor) -> torch.Tensor:
    """RGB (B, 3, H, W) in [0, 1], H and W multiples of 8 → scaled latents (B, 4, H/8, W/8): the minimum-norm
    least-squares inverse of `latent_to_rgb` applied to each 8×8 block's mean colour."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % DOWNSAMPLE or images.shape[3] % DOWNSAMPLE:
        raise ValueError(f"expected (B, 3, H, W) with H and W multiples of {DOWNSAMPLE}, got {tuple(images.shape)}")
    means = torch.nn.functional.avg_pool2d(images.float(), DOWNSAMPLE) * 2 - 1  # (B, 3, h, w) in [-1, 1]
    inverse = torch.linalg.pinv(_factors(torch.float64)).float()  # (3, 4)
    return torch.einsum("brhw,rc->bchw", means, inverse)
