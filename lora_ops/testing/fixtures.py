"""Random LoRA values for tests, benchmarks and the demo, built from a model's weight shapes (no files needed)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..lora import LoRA, LoRALayer


def random_lora(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    rank: int = 4,
    alpha: float | None = 2.0,
    family: str | None = "sd1",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.1,
    metadata: Mapping[str, str] | None = None,
) -> LoRA:
    """A LoRA with one layer per canonical key; shapes are the target weights' (out, in[, kh, kw]).

    Both factors are random (unlike a freshly initialised trainer LoRA, whose up is zero), so ΔW ≠ 0.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for key, shape in shapes.items():
        out_dim, in_dim = shape[0], shape[1]
        r = min(rank, out_dim, in_dim)
        if len(shape) == 4:
            down = torch.randn(r, in_dim, *shape[2:], generator=gen) * std  # (r, in, kh, kw)
            up = torch.randn(out_dim, r, 1, 1, generator=gen) * std  # (out, r, 1, 1)
        else:
            down = torch.randn(r, in_dim, generator=gen) * std  # (r, in)
            up = torch.randn(out_dim, r, generator=gen) * std  # (out, r)
        layers[key] = LoRALayer(down=down.to(dtype), up=up.to(dtype), alpha=alpha)
    return LoRA(layers, dict(metadata or {}), family=family)


def model_shapes(model: torch.nn.Module, names: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """Weight shapes by canonical key, given canonical key → module path inside ``model``."""
    modules = dict(model.named_modules())
    return {key: tuple(modules[path].weight.shape) for key, path in names.items()}
