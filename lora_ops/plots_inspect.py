"""A picture of what a LoRA holds: the strength (‖ΔW‖_F) and rank of every layer, coloured by model part.

‖ΔW‖_F comes from the factors (‖B·A‖²_F = Σ (BᵀB) ∘ (A·Aᵀ), an r×r product), so a large LoRA is drawn in about
the time it takes to read it; LoHa/LoKr layers go through their dense ΔW, as everywhere else. Headless (Agg canvas).
"""

from __future__ import annotations

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .linalg import flat_factors
from .lora import LoRA, part_of
from .plots import FLOOR, PART_COLORS


def delta_norm(layer) -> float:
    """‖ΔW‖_F of one layer (alpha/r included) without forming ΔW for plain LoRA layers."""
    b, a, _ = flat_factors(layer, torch.float64)
    if not (torch.isfinite(b).all() and torch.isfinite(a).all()):
        return float("nan")
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())


def layers_plot(lora: LoRA, *, title: str | None = None) -> Image.Image:
    """Per layer (in key order): ‖ΔW‖_F on a log axis, and the rank. NaN/Inf layers are marked with a red ×."""
    keys = sorted(lora.layers)
    norms = [delta_norm(lora.layers[k]) for k in keys]
    ranks = [lora.layers[k].rank for k in keys]
    fig = Figure(figsize=(11, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    parts = sorted({part_of(k) for k in keys})
    for part in parts:
        idx = [i for i, k in enumerate(keys) if part_of(k) == part]
        color = PART_COLORS.get(part, "tab:purple")
        top.bar(idx, [max(norms[i], FLOOR) if norms[i] == norms[i] else FLOOR for i in idx], width=1.0,
                color=color, label=f"{part} ({len(idx)})")
        bottom.bar(idx, [ranks[i] for i in idx], width=1.0, color=color)
    bad = [i for i, n in enumerate(norms) if n != n]
    if bad:
        top.plot(bad, [FLOOR] * len(bad), "x", color="red", ms=6, label=f"NaN/Inf ({len(bad)})")
    top.set_yscale("log")
    top.set_ylabel("‖ΔW‖_F")
    top.grid(True, which="both", lw=0.3, alpha=0.5)
    if keys:
        top.legend(loc="upper right", fontsize=8)
    bottom.set_ylabel("rank")
    bottom.set_xlabel("layer (sorted by key)")
    finite = [n for n in norms if n == n]
    summary = f"{len(keys)} layers, family {lora.family or '?'}"
    if finite:
        summary += f"; ‖ΔW‖_F from {min(finite):.3g} to {max(finite):.3g}"
    fig.suptitle(title or summary, fontsize=9)
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    return image.convert("RGB")
