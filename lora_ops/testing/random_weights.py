"""Seeded random weights for the tiny test models: one recipe, so every family's tiny model is drawn alike.

Every parameter is N(0, `WEIGHT_STD`²) in fp32 — biases too, so that no tensor is identically zero (a fresh model's
zero biases would let a wrong mapping pass unnoticed) — except RMS-norm scales, which are 1 + that noise so that
activations keep their usual size. The caller's global RNG is left untouched.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

WEIGHT_STD = 0.02


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize(model: torch.nn.Module, seed: int, norm_scale: re.Pattern[str], dtype: torch.dtype) -> torch.nn.Module:
    """``model`` with every parameter redrawn from ``seed`` (names matching ``norm_scale`` as 1 + noise), cast to
    ``dtype``, in eval mode. Draws follow registration order, which the model's config fixes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * WEIGHT_STD
            param.copy_(noise + 1.0 if norm_scale.search(name) else noise)
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-kept modules on every cast (there are none here)
    return torch.nn.Module.to(model, dtype=dtype).eval()
