"""Pictures of reports: the singular-value spectrum of every layer, with the kept ranks marked.

Headless: draws on matplotlib's Agg canvas directly (no pyplot, no GUI backend, no global figure state).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .lora import part_of

FLOOR = 1e-8  # zeros on a log axis
PART_COLORS = {"unet": "tab:blue", "te1": "tab:orange", "te2": "tab:green"}


def spectrum_plot(report: object, path: str | Path | None = None, *, title: str | None = None) -> Image.Image:
    """A PNG-ready image of a `ResizeReport` / `CombineReport`: σᵢ/σ₀ per layer (kept part coloured by model
    part, discarded part grey, a dot at the last kept σ) and a histogram of the new ranks. Saved to ``path``."""
    layers = [r for r in report.layers if r.singular_values and r.singular_values[0] > 0]
    fig = Figure(figsize=(11, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(1, 2, width_ratios=(2.2, 1))
    alpha = max(0.08, min(0.8, 30 / max(1, len(layers))))
    seen = set()
    for r in layers:
        s0 = r.singular_values[0]
        ys = [max(v / s0, FLOOR) for v in r.singular_values]
        k = r.new_rank
        part = part_of(r.key)
        color = PART_COLORS.get(part, "tab:purple")
        label = part if part not in seen else None
        seen.add(part)
        if k < len(ys):
            ax.plot(range(k - 1 if k else 0, len(ys)), ys[k - 1 if k else 0 :], color="0.6", lw=0.6, alpha=alpha)
        if k:
            ax.plot(range(k), ys[:k], color=color, lw=0.9, alpha=alpha, label=label)
            ax.plot([k - 1], [ys[k - 1]], "o", color=color, ms=2.5, alpha=min(1.0, 2 * alpha))
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σᵢ / σ₀")
    ax.set_title("spectra (coloured: kept, grey: discarded)")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    if seen:
        legend = ax.legend(loc="lower left", fontsize=8)
        for line in legend.get_lines():
            line.set_alpha(1.0)
    ranks = [r.new_rank for r in report.layers]
    if ranks:
        lo, hi = min(ranks), max(ranks)
        bins = [b - 0.5 for b in range(lo, hi + 2)] if hi - lo <= 64 else 40  # one bar per rank when few
        hist.hist(ranks, bins=bins, color="tab:blue", alpha=0.8)
    hist.set_xlabel("new rank")
    hist.set_ylabel("layers")
    hist.set_title("kept ranks")
    summary = report.summary() if hasattr(report, "summary") else ""
    fig.suptitle(title or summary, fontsize=9)
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    image = image.convert("RGB")
    if path is not None:
        image.save(path, format="PNG")
    return image
