"""`lora-ops demo`: the whole LoRA life cycle on the embedded tiny SD1.5-shaped model, no network, no GPU.

Stages: build the model → train a LoRA on a synthetic captioned dataset (loss must drop) → save (kohya,
diffusers) → inspect → rank-resize (fixed, sv_fro) → combine with a second LoRA (concat, svd) → apply with
strengths + coverage → merge & unload vs applied → unmerge restores the base bit-for-bit → bake into a checkpoint
folder → extract back and compare. The trained LoRA learns a red square on a random-weight model whose VAE decodes
most of what it learns to faint changes, so the later stages use random LoRAs with a larger effect; the image grid
shows base, the trained LoRA and those, each with its difference from base magnified underneath. Each stage prints
one line with its key figure and records pass/fail checks; `report.html` (self-contained) and PNGs go to the
output folder. The exit code is non-zero if any check fails.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from . import keymap
from . import lora as L
from .bake import bake
from .combine import combine
from .extract import extract
from .files import load_lora, save_lora
from .hosts import DiffusersHost
from .inspect import format_report, inspect_lora
from .plots import spectrum_plot
from .resize import resize

PROMPT = "a photo of sks style"
SIZE = 64
STEPS = 4


@dataclass
class Check:
    stage: str
    name: str
    passed: bool
    figure: str


class _Run:
    """Collects checks, figures and pictures while the stages run."""

    def __init__(self, out: Path, echo: Callable[[str], None]) -> None:
        self.out, self.echo = out, echo
        self.checks: list[Check] = []
        self.pictures: dict[str, Path] = {}

    def check(self, stage: str, name: str, passed: bool, figure: str) -> None:
        self.checks.append(Check(stage, name, bool(passed), figure))
        self.echo(f"[{'ok' if passed else 'FAIL'}] {stage}: {name} — {figure}")

    def picture(self, title: str, image: Image.Image, name: str) -> None:
        path = self.out / name
        image.save(path)
        self.pictures[title] = path


def _generate(pipe) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1], fixed seed."""
    return pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def _grid(images: list[tuple[str, torch.Tensor]], *, gain: float = 4.0) -> Image.Image:
    """Labelled tiles, scaled 3× (nearest) so 64-pixel images are visible; under each one its difference from the
    first (the base), |Δ| × ``gain``, so small changes are seen, not guessed."""
    from PIL import ImageDraw

    tile, gap, label_h = SIZE * 3, 8, 16
    base = images[0][1][0]
    grid = Image.new("RGB", (len(images) * (tile + gap), 2 * (tile + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (title, t) in enumerate(images):
        x = i * (tile + gap)
        for row, picture in enumerate((t[0], ((t[0] - base).abs() * gain))):
            array = (picture.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")  # (H, W, 3)
            y = row * (tile + label_h)
            grid.paste(Image.fromarray(array).resize((tile, tile), Image.NEAREST), (x, y + label_h))
            text = title if row == 0 else (f"|{title} - base| x{gain:g}" if i else "difference from base:")
            draw.text((x + 2, y + 2), text.replace("×", "x"), fill="black")  # PIL's built-in font is ASCII
    return grid


def _lora_for(pipe, *, rank: int, seed: int, std: float) -> L.LoRA:
    from .testing.fixtures import model_shapes, random_lora

    names = keymap.unet_canonical_keys(pipe.unet, "sd1")
    shapes = model_shapes(pipe.unet, names) | model_shapes(pipe.text_encoder, keymap.te_canonical_keys(
        pipe.text_encoder, "te1"))
    shapes = {k: s for k, s in shapes.items() if any(t in k for t in ("attn", "self_attn", "mlp"))}
    return random_lora(shapes, rank=rank, alpha=float(rank), family="sd1", seed=seed, std=std,
                       metadata={"modelspec.trigger_phrase": "sks style", "ss_network_dim": str(rank)})


def run_demo(
    out_dir: str | Path = "lora-ops-demo",
    progress: bool = True,
    echo: Callable[[str], None] = lambda _s: None,
) -> int:
    """Run every stage into ``out_dir``; returns 0 when every check passed, 1 otherwise."""
    from .testing import tiny

    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(out, echo)
    t_start = time.perf_counter()
    bar = tqdm(total=10, desc="demo", unit="stage", disable=not progress)

    def stage_done() -> None:
        bar.update(1)

    # 1. build
    t0 = time.perf_counter()
    pipe = tiny.tiny_sd1_pipeline(seed=0)
    lora_a = _lora_for(pipe, rank=8, seed=1, std=0.25)
    lora_b = _lora_for(pipe, rank=4, seed=2, std=0.25)
    run.check("build", "tiny SD1.5-shaped pipeline + LoRA A (rank 8) and B (rank 4)", len(lora_a.layers) > 0,
              f"{len(lora_a.layers)} layers, {L.num_params(lora_a):,} parameters, {time.perf_counter() - t0:.1f} s")
    stage_done()

    trained = _train_stage(run, pipe, out)
    stage_done()

    # 2. save
    for fmt in ("kohya", "diffusers"):
        path = save_lora(lora_a, out / f"lora_a_{fmt}.safetensors", fmt, overwrite=True)
        run.check("save", f"{fmt} file reads back bit-for-bit", L.equal(load_lora(path), lora_a),
                  f"{path.name}: {path.stat().st_size:,} bytes")
    stage_done()

    # 3. inspect
    report = inspect_lora(load_lora(out / "lora_a_kohya.safetensors"), out / "lora_a_kohya.safetensors")
    (out / "inspect.json").write_text(json.dumps(report, indent=2))
    (out / "inspect.txt").write_text(format_report(report))
    run.check("inspect", "format, family and trigger words detected",
              report["format"] == "kohya" and report["family"] == "sd1" and "sks style" in report["trigger_words"],
              f"format {report['format']}, family {report['family']}, trigger words {report['trigger_words']}")
    stage_done()

    # 4. resize
    small, rep_fixed = resize(lora_a, 4)
    dyn, rep_fro = resize(lora_a, "sv_fro:0.9")
    key = sorted(lora_a.layers)[0]
    sv = torch.linalg.svdvals(L.delta(lora_a[key], torch.float64).flatten(1))
    err = float((L.delta(small[key], torch.float64) - L.delta(lora_a[key], torch.float64)).norm())
    optimum = float(sv[4:].square().sum().sqrt())
    run.check("resize", "rank 8 → 4 error equals the Eckart–Young optimum", abs(err - optimum) <= 1e-4 * optimum,
              f"‖ΔW−ΔW₄‖ {err:.4g} vs optimum {optimum:.4g}; mean energy kept {rep_fixed.mean_fro_retained_pct:.1f}%")
    ranks = sorted(set(L.ranks(dyn).values()))
    run.check("resize", "sv_fro 0.9 keeps ≥ 90% of each layer's Frobenius norm (kohya's meaning)",
              all(r.fro_retained_pct >= 90 - 1e-6 for r in rep_fro.layers),
              f"ranks {ranks}, {L.nbytes(dyn):,} of {L.nbytes(lora_a):,} bytes")
    run.picture("Singular values, resize to rank 4", spectrum_plot(rep_fixed), "spectrum_rank4.png")
    run.picture("Singular values, sv_fro 0.9", spectrum_plot(rep_fro), "spectrum_sv_fro.png")
    stage_done()

    # 5. combine
    concat, _ = combine([(lora_a, 0.7, 0.7), (lora_b, 0.5, 0.5)], "concat")
    svd8, _ = combine([(lora_a, 0.7, 0.7), (lora_b, 0.5, 0.5)], "svd", 8)
    worst = max(float((L.delta(concat[k]) - 0.7 * L.delta(lora_a[k]) - 0.5 * L.delta(lora_b[k])).abs().max())
                for k in lora_a.layers)
    run.check("combine", "concat reproduces 0.7·A + 0.5·B", worst <= 1e-5,
              f"max abs diff {worst:.2e}; concat rank {max(L.ranks(concat).values())}, svd rank 8")
    stage_done()

    # 6. apply with strengths
    host = DiffusersHost(pipe)
    base_img = _generate(pipe)
    images = [("base", base_img)]
    host.apply([(trained, 1.0, 1.0)])
    images.append(("trained (sks)", _generate(pipe)))
    host.remove()
    trained_diff = float((images[1][1] - base_img).abs().mean())
    run.check("apply", "the trained LoRA changes the image", trained_diff > 1e-3,
              f"mean |Δpixel| {trained_diff:.4f} (the random VAE damps it; see the difference row of the grid)")
    for strength in (0.5, 1.0):
        coverage = host.apply([(lora_a, strength, strength)])
        images.append((f"LoRA A ×{strength}", _generate(pipe)))
        host.remove()
    run.check("apply", "every LoRA layer matched a model weight", coverage.fraction == 1.0, coverage.summary())
    diff = float((images[3][1] - base_img).abs().mean())
    run.check("apply", "the LoRA visibly changes the image", diff > 0.01, f"mean |Δpixel| {diff:.3f} at strength 1")
    for title, value in (("resized (rank 4)", small), ("combined (svd 8)", svd8)):
        host.apply([(value, 1.0, 1.0)])
        images.append((title, _generate(pipe)))
        host.remove()
    stage_done()

    # 7. merge & unmerge
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    host.apply([(lora_a, 1.0, 1.0)])
    applied = _generate(pipe)
    host.merge()
    merged = _generate(pipe)
    images.append(("merged", merged))
    gap = float((merged - applied).abs().max())
    run.check("merge", "merged output equals applied output", gap <= 1e-5, f"max abs diff {gap:.2e}")
    host.unmerge()
    host.remove()
    restored = all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    run.check("merge", "unmerge restores the base bit-for-bit", restored, f"{len(before)} tensors torch.equal")
    run.picture("Same seed: " + " / ".join(t for t, _ in images), _grid(images), "grid.png")
    stage_done()

    # 8. bake
    base_dir, baked_dir = out / "base_model", out / "baked_model"
    pipe.save_pretrained(base_dir, safe_serialization=True)
    baked = bake(base_dir, [(lora_a, 1.0, 1.0)], baked_dir, overwrite=True)
    run.check("bake", "every LoRA layer baked into the checkpoint", not baked.unmatched and baked.layers == len(
        lora_a.layers), baked.summary())
    stage_done()

    # 9. extract
    extracted, _ = extract(base_dir, baked_dir, 8, parts=("unet", "te1"))
    rel = max(float((L.delta(extracted[k]) - L.delta(layer)).norm() / L.delta(layer).norm())
              for k, layer in lora_a.layers.items())
    run.check("extract", "extracting base vs baked at rank 8 recovers LoRA A", set(extracted.layers) == set(
        lora_a.layers) and rel < 1e-3, f"max relative error {rel:.2e} over {len(extracted.layers)} layers")
    stage_done()
    bar.close()

    seconds = time.perf_counter() - t_start
    (out / "checks.json").write_text(json.dumps([asdict(c) for c in run.checks], indent=2))
    (out / "report.html").write_text(_html(run, seconds))
    failed = [c for c in run.checks if not c.passed]
    echo(f"{len(run.checks) - len(failed)} passed, {len(failed)} failed in {seconds:.1f} s — {out / 'report.html'}")
    return 1 if failed else 0


def _train_stage(run: _Run, pipe, out: Path) -> L.LoRA:
    """Train a LoRA on four solid-red images captioned "a red square" (trigger "sks"); the loss must drop."""
    from .train import Dataset, TrainConfig, train
    from .train.diffusers_backend import DiffusersBackend

    t0 = time.perf_counter()
    data = Dataset.from_images([Image.new("RGB", (SIZE, SIZE), (220, 30, 30)) for _ in range(4)], "a red square")
    config = TrainConfig(rank=8, targets="attention+ff", learning_rate=1e-2, max_steps=40, batch_size=2,
                         resolution=SIZE, trigger_word="sks", eval_every_steps=20, seed=1, title="demo red")
    result = train(config, DiffusersBackend(pipe), data)
    evals = result.history.eval_loss
    drop = 1 - evals[-1] / evals[0]
    path = save_lora(result.lora, out / "trained_kohya.safetensors", "kohya", overwrite=True)
    run.picture("Training loss", result.plot(), "loss.png")
    run.check("train", "denoising loss on a fixed evaluation batch drops ≥ 25%", drop >= 0.25,
              f"{evals[0]:.3f} → {evals[-1]:.3f} ({drop:.0%}) in {config.max_steps} steps, "
              f"{time.perf_counter() - t0:.1f} s; {path.name} {path.stat().st_size:,} bytes")
    run.check("train", "the trained LoRA reads back with its metadata",
              load_lora(path).metadata.get("ss_max_train_steps") == str(config.max_steps),
              f"{len(result.lora.layers)} layers, ss_network_dim {result.lora.metadata.get('ss_network_dim')}")
    return result.lora


def _html(run: _Run, seconds: float) -> str:
    """A self-contained page (images inlined) that opens offline."""
    rows = "".join(
        f"<tr class={'ok' if c.passed else 'fail'}><td>{'✔' if c.passed else '✘'}</td><td>{html.escape(c.stage)}</td>"
        f"<td>{html.escape(c.name)}</td><td>{html.escape(c.figure)}</td></tr>"
        for c in run.checks
    )
    figures = "".join(
        f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}'>"
        for title, path in run.pictures.items()
    )
    return (
        "<!doctype html><meta charset=utf-8><title>LoRA Ops demo</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{padding:2px 8px}.fail{color:#b00}.ok td:first-child"
        "{color:#080}img{max-width:100%;image-rendering:pixelated}</style>"
        f"<h1>LoRA Ops demo</h1><p>{sum(c.passed for c in run.checks)} of {len(run.checks)} checks passed in "
        f"{seconds:.1f} s on the tiny SD1.5-shaped model.</p><table>{rows}</table>{figures}"
    )
