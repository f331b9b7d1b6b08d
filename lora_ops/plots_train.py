"""The training loss plot: loss per step (raw and smoothed), the fixed-batch evaluation loss, the learning rate.

Headless: draws on matplotlib's Agg canvas directly (no pyplot, no GUI backend, no global figure state), and
returns a PIL image (ComfyUI turns it into an IMAGE; the CLI saves it as PNG).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image


def ema(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def _get(history: Any, name: str) -> list:
    if isinstance(history, Mapping):
        return list(history.get(name, []))
    return list(getattr(history, name, []))


def loss_plot(history: Any, path: str | Path | None = None, *, title: str | None = None) -> Image.Image:
    """A PNG-ready image of a `LossHistory` (or its dict / loss JSON). Saved to ``path`` when given."""
    steps, loss, lr = _get(history, "steps"), _get(history, "loss"), _get(history, "lr")
    eval_steps, eval_loss = _get(history, "eval_steps"), _get(history, "eval_loss")
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if steps:
        ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.35, label="training loss")
        ax.plot(steps, ema(loss, 0.9 if len(loss) > 20 else 0.5), color="tab:blue", lw=1.6, label="smoothed")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", color="tab:red", ms=4, lw=1.2, label="fixed-batch eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (MSE)")
    ax.grid(True, lw=0.3, alpha=0.5)
    if steps and lr and max(lr) > 0:
        ax2 = ax.twinx()
        ax2.plot(steps, lr, color="0.5", lw=1.0, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate", color="0.4")
        ax2.tick_params(axis="y", colors="0.4")
        ax2.set_ylim(0, max(lr) * 1.1)
        lines = ax.get_legend_handles_labels()
        more = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    elif steps or eval_steps:
        ax.legend(loc="upper right", fontsize=8)
    if not steps and not eval_steps:
        ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title or "LoRA training loss", fontsize=10)
    fig.canvas.draw()
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    if path is not None:
        image.save(path)
    return image
