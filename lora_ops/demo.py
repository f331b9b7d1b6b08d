"""`lora-ops demo`: the LoRA life cycle on the embedded tiny SD1.5-shaped model, no network, no GPU.

Each stage prints one line with its key figure and records a pass/fail check; the exit code is non-zero if any
check fails. Stages grow as the library does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import keymap
from . import lora as L
from .files import load_lora, save_lora
from .inspect import format_report, inspect_lora


@dataclass
class Check:
    stage: str
    name: str
    passed: bool
    figure: str


def run_demo(
    out_dir: str | Path = "lora-ops-demo",
    steps: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = lambda _s: None,
) -> int:
    """Run every stage into ``out_dir``; returns 0 when every check passed, 1 otherwise."""
    from .testing import tiny
    from .testing.fixtures import model_shapes, random_lora

    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checks: list[Check] = []

    def check(stage: str, name: str, passed: bool, figure: str) -> None:
        checks.append(Check(stage, name, bool(passed), figure))
        echo(f"[{'ok' if passed else 'FAIL'}] {stage}: {name} — {figure}")

    t0 = time.perf_counter()
    pipe = tiny.tiny_sd1_pipeline(seed=0)
    unet_names = keymap.unet_canonical_keys(pipe.unet, "sd1")
    te_names = keymap.te_canonical_keys(pipe.text_encoder, "te1")
    shapes = model_shapes(pipe.unet, unet_names) | model_shapes(pipe.text_encoder, te_names)
    shapes = {k: s for k, s in shapes.items() if any(t in k for t in ("attn", "self_attn"))}
    lora = random_lora(shapes, rank=4, alpha=4.0, family="sd1", seed=1,
                       metadata={"modelspec.trigger_phrase": "sks style", "ss_network_dim": "4"})
    check("build", "tiny SD1.5-shaped pipeline + sample LoRA", len(lora.layers) > 0,
          f"{len(lora.layers)} layers, {L.num_params(lora):,} parameters, {time.perf_counter() - t0:.1f} s")

    sizes = {}
    for fmt in ("kohya", "diffusers"):
        path = save_lora(lora, out / f"sample_{fmt}.safetensors", fmt, overwrite=True)
        sizes[fmt] = path.stat().st_size
        back = load_lora(path)
        check("save", f"{fmt} file reads back bit-for-bit", L.equal(back, lora), f"{path.name}: {sizes[fmt]:,} bytes")

    report = inspect_lora(load_lora(out / "sample_kohya.safetensors"), out / "sample_kohya.safetensors")
    (out / "inspect.json").write_text(json.dumps(report, indent=2))
    echo(format_report(report))
    check("inspect", "format and family detected", report["format"] == "kohya" and report["family"] == "sd1",
          f"format {report['format']}, family {report['family']}, trigger words {report['trigger_words']}")

    (out / "checks.json").write_text(json.dumps([asdict(c) for c in checks], indent=2))
    failed = [c for c in checks if not c.passed]
    echo(f"{len(checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
