"""Learning-rate schedules and the noise-schedule math of the loss (host-agnostic).

The learning-rate shapes are those of ``diffusers.optimization.get_scheduler`` (linear warm-up from 0, then
constant / half-cosine / linear decay to 0), as multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

The host describes its diffusion process with a `NoiseSchedule`: a DDPM-style ᾱ table with an ε or v prediction
target, or rectified flow ("flow"; x_t = (1-σ)·x₀ + σ·ε, target ε - x₀). Flow matching is an extension point: the math
comes from the host: ComfyUI's discrete-flow model sampling (SD3-style models, or any model patched by its
``ModelSamplingSD3`` node) is read into this schedule, with its time shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import LoraValueError

Tensor = torch.Tensor
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at optimizer step ``s`` (0-based)."""

    def warm(step: int) -> float | None:
        return step / max(1, warmup_steps) if step < warmup_steps else None

    def constant(step: int) -> float:
        w = warm(step)
        return 1.0 if w is None else w

    def cosine(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def linear(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    table = {"constant": constant, "cosine": cosine, "linear": linear}
    if kind not in table:
        raise LoraValueError(f"unknown learning-rate schedule '{kind}'", hint=f"use one of {', '.join(table)}")
    return table[kind]


@dataclass(frozen=True)
class NoiseSchedule:
    """How the host's model was trained to denoise.

    ``alphas_cumprod``: ᾱ_t for t = 0 … T-1 (DDPM family); None for "flow". ``prediction_type``: "epsilon",
    "v_prediction" or "flow". Model timesteps are integers 0 … T-1 (DDPM) or σ·T (flow). ``flow_shift``: the
    time shift s of SD3-style flow models, σ = s·u / (1 + (s-1)·u) for u uniform in (0, 1) (1 = no shift), so
    training sees the noise levels the model samples at.
    """

    prediction_type: str
    num_train_timesteps: int
    alphas_cumprod: Tensor | None = None
    flow_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise LoraValueError(
                f"prediction type '{self.prediction_type}' is not supported",
                hint=f"supported: {', '.join(PREDICTION_TYPES)}",
            )
        if not self.flow_shift > 0:
            raise LoraValueError(f"flow_shift must be positive, got {self.flow_shift}")
        if self.prediction_type != "flow":
            ac = self.alphas_cumprod
            if ac is None or ac.ndim != 1 or len(ac) != self.num_train_timesteps:
                raise LoraValueError("a DDPM noise schedule needs alphas_cumprod of length num_train_timesteps")

    def _shifted(self, u: Tensor) -> Tensor:
        s = self.flow_shift
        return u if s == 1.0 else s * u / (1 + (s - 1) * u)

    def _alpha_bar(self, timesteps: Tensor, like: Tensor) -> Tensor:
        ac = self.alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps.long()]
        return ac.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)

    def sample_timesteps(self, batch: int, generator: torch.Generator) -> Tensor:
        """Uniform training timesteps (B,), drawn on the CPU from ``generator``."""
        if self.prediction_type == "flow":
            return self._shifted(torch.rand(batch, generator=generator)) * self.num_train_timesteps
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)

    def noisy_and_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, regression target) for clean ``latents`` (B, C, h, w), ``noise`` like them, ``timesteps`` (B,)."""
        x0, eps = latents.float(), noise.float()
        if self.prediction_type == "flow":
            sigma = (timesteps.to(x0.device, torch.float32) / self.num_train_timesteps).reshape(-1, 1, 1, 1)
            return (1 - sigma) * x0 + sigma * eps, eps - x0
        ac = self._alpha_bar(timesteps, x0)
        a, s = ac.sqrt(), (1 - ac).sqrt()
        noisy = a * x0 + s * eps
        target = eps if self.prediction_type == "epsilon" else a * eps - s * x0
        return noisy, target

    def min_snr_weights(self, timesteps: Tensor, gamma: float, device: torch.device) -> Tensor:
        """min-SNR-γ loss weights (B,) (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v."""
        if self.prediction_type == "flow":
            raise LoraValueError("min-SNR-γ weighting is defined for ε / v prediction, not flow matching")
        ac = self.alphas_cumprod.to(device=device, dtype=torch.float32)[timesteps.to(device).long()]
        snr = ac / (1 - ac)
        clipped = torch.clamp(snr, max=gamma)
        return clipped / snr if self.prediction_type == "epsilon" else clipped / (snr + 1)

    def eval_timesteps(self, count: int) -> Tensor:
        """``count`` timesteps spread evenly over the schedule (centres of equal bins), for a fixed evaluation."""
        centres = (torch.arange(count, dtype=torch.float64) + 0.5) * self.num_train_timesteps / count
        if self.prediction_type == "flow":
            return (self._shifted(centres / self.num_train_timesteps) * self.num_train_timesteps).float()
        return centres.floor().long().clamp(0, self.num_train_timesteps - 1)
