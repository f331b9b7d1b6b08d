"""What a host must supply to be trained on: encoders, the noise schedule, the denoiser. No diffusers types here.

The training loop (`lora_ops.train.loop`) is host-agnostic: it never calls a diffusers or ComfyUI API, only this
protocol. A backend supplies

- the modules to inject LoRA into (the denoiser, and the text encoders for text-encoder LoRA), with the canonical
  key of each targetable layer (``unet.<LDM path>``, ``te1.text_model…``) so the result is a `LoRA` value;
- ``encode_images``: pixels (B, 3, H, W) in [-1, 1] → latents already multiplied by the VAE scaling factor;
  ``process_latents``: the same scaling for latents that arrive encoded (ComfyUI's LATENT);
- ``encode_prompts``: captions → a dict of tensors batched on dim 0 (whatever its ``predict`` needs); called
  without autograd when the text encoders are frozen (the loop caches the result), with autograd otherwise;
- ``noise_schedule``: a `NoiseSchedule` (ᾱ table + ε / v prediction, or flow matching);
- ``predict``: the denoiser's output for noisy latents, timesteps, a conditioning batch and the per-image
  micro-conditioning numbers (original size, crop top-left, target size; SDXL uses them, SD 1.x ignores them).

`lora_ops.train.diffusers_backend.DiffusersBackend` implements it for diffusers SD 1.x / SDXL pipelines;
``nodes.comfy_train.ComfyBackend`` implements the same methods over ComfyUI's MODEL, CLIP and VAE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .schedule import NoiseSchedule

Tensor = torch.Tensor
Conditioning = dict[str, Tensor]


@runtime_checkable
class TrainingBackend(Protocol):
    family: str  # "sd1", "sdxl", … (the LoRA value's family)

    def denoiser(self) -> nn.Module:
        """The module LoRA is injected into (UNet / DiT); the loop calls it only through `predict`."""
        ...

    def text_encoders(self) -> Mapping[str, nn.Module]:
        """Canonical part prefix ("te1", "te2") → text encoder module, for text-encoder LoRA."""
        ...

    def layer_keys(self, part: str) -> Mapping[str, str]:
        """Module path inside the part's module → canonical key, for every layer LoRA may target.

        ``part`` is "unet" (the denoiser) or a text-encoder prefix from `text_encoders`.
        """
        ...

    def noise_schedule(self) -> NoiseSchedule: ...

    def encode_images(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] on the training device → scaled latents (B, C, H/f, W/f)."""
        ...

    def process_latents(self, samples: Tensor) -> Tensor:
        """Raw VAE latents (what a VAE encoder outputs, e.g. ComfyUI's LATENT) → scaled latents, like
        `encode_images`' output, for data that arrives already encoded (`Dataset.from_latents`)."""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Captions → conditioning tensors batched on dim 0, on the training device."""
        ...

    def predict(
        self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning, micro: Tensor
    ) -> Tensor:
        """The denoiser's prediction (B, C, h, w). ``micro`` is (B, 6): original h, w, crop top, left, target h, w."""
        ...

    def set_gradient_checkpointing(self, enabled: bool, *, text_encoders: bool = False) -> None: ...

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device) -> None:
        """Move every module the loop uses to ``device``."""
        ...

    def describe(self) -> Mapping[str, str]:
        """kohya/modelspec metadata about the base model: e.g. ``ss_sd_model_name``, ``ss_base_model_version``,
        ``ss_v2``, ``modelspec.architecture``, ``ss_new_sd_model_hash`` (when the model file's hash is known)."""
        ...
