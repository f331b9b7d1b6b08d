"""`lora-ops demo`: the whole LoRA life cycle on the embedded tiny SD1.5-shaped model, no network, no GPU.

Stages: build the model → train a LoRA on a synthetic captioned dataset (a red square; the loss must drop) → save
(kohya, diffusers) → inspect → rank-resize (fixed, sv_fro) → combine with a second LoRA (concat, svd) → apply with
strengths + coverage → merge & unload vs applied → unmerge restores the base bit-for-bit → bake into a checkpoint
folder → extract back and compare. Every stage works on the trained LoRA.

The tiny model has random weights, its VAE included, so VAE pictures would say nothing about what the LoRA learned.
The demo therefore works in latent space through a fixed linear map that depends on no weights
(`lora_ops.testing.preview`: ComfyUI's SD 1.5 Latent2RGB preview projection, and its least-squares inverse to
encode the training pictures): the LoRA trains on the encoded pictures, and the image grid shows the sampler's
latents through that preview — the training image, then base / LoRA ×0.5 / ×1.0 / resized / combined / merged for
one seed, each with its difference from the training image underneath. The report measures what the grid shows:
how much the LoRA changes the picture, and that it moves it toward the training image (half-way at 0.5). Each stage
prints one line with its key figure and records pass/fail checks; `report.html` (self-contained) and PNGs go to the
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

CAPTION = "a red square"
TRIGGER = "sks"
PROMPT = f"{TRIGGER}, {CAPTION}"  # what the LoRA was trained on (trigger prepended, as the trainer does)
SIZE = 64  # pixels; 8×8 latents
SAMPLING_STEPS = 10  # DDIM, no classifier-free guidance
TRAIN_STEPS = 100  # the default: enough for the trained LoRA to draw the square (see the report's checks)
RED, BACKGROUND = (220, 30, 30), (235, 225, 200)
# The visual checks, on the latent preview's pixels in [0, 1] (mean over pixels and channels).
MIN_CHANGE = 0.1  # the trained LoRA at 1.0 changes the picture at least this much
CLOSER = 0.5  # … and lands at most this fraction of base's distance from the training image


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
        image.save(path, optimize=True)
        self.pictures[title] = path


def training_image() -> Image.Image:
    """The synthetic training picture: a red square on a light background."""
    from PIL import ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    ImageDraw.Draw(image).rectangle((SIZE // 4, SIZE // 4, 3 * SIZE // 4 - 1, 3 * SIZE // 4 - 1), fill=RED)
    return image


def _pixels(image: Image.Image) -> torch.Tensor:
    """PIL → (1, 3, H, W) in [0, 1]."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(
        1, image.height, image.width, 3).permute(0, 3, 1, 2).float() / 255


def _generate(pipe) -> torch.Tensor:
    """Scaled latents (1, 4, 8, 8) of one fixed-seed sample of ``PROMPT``."""
    return pipe(PROMPT, num_inference_steps=SAMPLING_STEPS, height=SIZE, width=SIZE, guidance_scale=1.0,
                output_type="latent", generator=torch.Generator().manual_seed(0)).images


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two pictures in [0, 1]."""
    return float((a - b).abs().mean())


def _grid(images: list[tuple[str, torch.Tensor]]) -> Image.Image:
    """Labelled tiles of pictures (1, 3, h, w) in [0, 1], nearest-neighbour upscaled (one latent pixel is one
    block); the first is the training image, and under each of the others its difference from it, |Δ| (dark: close),
    labelled with the mean."""
    from PIL import ImageDraw

    tile, gap, label_h, head = 160, 8, 16, 20
    grid = Image.new("RGB", (len(images) * (tile + gap) - gap, head + 2 * (tile + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    # PIL's built-in font is ASCII only.
    draw.text((2, 4), f"same seed, {SAMPLING_STEPS} DDIM steps, latents shown through ComfyUI's SD1.5 Latent2RGB "
              "preview (the tiny model's VAE has random weights); bottom row: |picture - training image|",
              fill="black")
    target = images[0][1][0]
    for i, (title, t) in enumerate(images):
        x = i * (tile + gap)
        rows = [(title, t[0])]
        if i:
            rows.append((f"|{title} - training| {_distance(t[0], target):.2f}", (t[0] - target).abs()))
        for row, (text, picture) in enumerate(rows):
            array = (picture.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype("uint8")  # (h, w, 3)
            y = head + row * (tile + label_h)
            grid.paste(Image.fromarray(array).resize((tile, tile), Image.NEAREST), (x, y + label_h))
            draw.text((x + 2, y + 2), text.replace("×", "x"), fill="black")
    return grid


def _second_lora(pipe, like: L.LoRA) -> L.LoRA:
    """LoRA B: random, rank 4, on the trained LoRA's attention layers and the text encoder's (a different set)."""
    from .testing.fixtures import model_shapes, random_lora

    unet = {k: path for k, path in keymap.unet_canonical_keys(pipe.unet, "sd1").items() if k in like.layers}
    shapes = model_shapes(pipe.unet, unet) | model_shapes(pipe.text_encoder, keymap.te_canonical_keys(
        pipe.text_encoder, "te1"))
    shapes = {k: s for k, s in shapes.items() if any(t in k for t in ("attn", "self_attn", "mlp"))}
    return random_lora(shapes, rank=4, alpha=4.0, family="sd1", seed=2, std=0.1)


def run_demo(
    out_dir: str | Path = "lora-ops-demo",
    progress: bool = True,
    echo: Callable[[str], None] = lambda _s: None,
    train_steps: int = TRAIN_STEPS,
) -> int:
    """Run every stage into ``out_dir``; returns 0 when every check passed, 1 otherwise.

    ``train_steps``: the LoRA's training steps (the default makes the visual checks pass; few steps will not)."""
    from .testing import tiny
    from .testing.preview import latent_to_rgb

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
    n_params = sum(p.numel() for m in (pipe.unet, pipe.text_encoder, pipe.vae) for p in m.parameters())
    run.check("build", "tiny SD1.5-shaped pipeline (UNet, CLIP text encoder, VAE; random weights)", n_params > 0,
              f"{n_params:,} parameters, {time.perf_counter() - t0:.1f} s")
    stage_done()

    # 2. train
    trained, target = _train_stage(run, pipe, train_steps)
    stage_done()

    # 3. save
    for fmt in ("kohya", "diffusers"):
        path = save_lora(trained, out / f"trained_{fmt}.safetensors", fmt, overwrite=True)
        back = load_lora(path)
        run.check("save", f"{fmt} file reads back bit-for-bit", L.equal(back, trained),
                  f"{path.name}: {path.stat().st_size:,} bytes")
    run.check("save", "the training metadata reads back", back.metadata.get("ss_max_train_steps") == str(
        train_steps), f"ss_max_train_steps {back.metadata.get('ss_max_train_steps')}, "
              f"ss_network_dim {back.metadata.get('ss_network_dim')}")
    stage_done()

    # 4. inspect
    report = inspect_lora(load_lora(out / "trained_kohya.safetensors"), out / "trained_kohya.safetensors")
    (out / "inspect.json").write_text(json.dumps(report, indent=2))
    (out / "inspect.txt").write_text(format_report(report))
    run.check("inspect", "format, family and trigger word detected",
              report["format"] == "kohya" and report["family"] == "sd1" and TRIGGER in report["trigger_words"],
              f"format {report['format']}, family {report['family']}, trigger words {report['trigger_words']}")
    stage_done()

    # 5. resize
    small, rep_fixed = resize(trained, 4)
    dyn, rep_fro = resize(trained, "sv_fro:0.9")
    key = max(trained.layers, key=lambda k: L.delta(trained[k]).norm())  # the layer that learned the most
    sv = torch.linalg.svdvals(L.delta(trained[key], torch.float64).flatten(1))
    err = float((L.delta(small[key], torch.float64) - L.delta(trained[key], torch.float64)).norm())
    optimum = float(sv[4:].square().sum().sqrt())
    run.check("resize", "rank 8 → 4 error equals the Eckart–Young optimum", abs(err - optimum) <= 1e-4 * optimum,
              f"{key}: ‖ΔW−ΔW₄‖ {err:.4g} vs optimum {optimum:.4g}; "
              f"mean energy kept {rep_fixed.mean_fro_retained_pct:.1f}%")
    ranks = sorted(set(L.ranks(dyn).values()))
    run.check("resize", "sv_fro 0.9 keeps ≥ 90% of each layer's Frobenius norm (kohya's meaning)",
              all(r.fro_retained_pct >= 90 - 1e-6 for r in rep_fro.layers),
              f"ranks {ranks[0]}–{ranks[-1]}, {L.nbytes(dyn):,} of {L.nbytes(trained):,} bytes")
    run.picture("Singular values, resize to rank 4", spectrum_plot(rep_fixed), "spectrum_rank4.png")
    run.picture("Singular values, sv_fro 0.9", spectrum_plot(rep_fro), "spectrum_sv_fro.png")
    stage_done()

    # 6. combine
    lora_b = _second_lora(pipe, trained)
    pair = [(trained, 1.0, 1.0), (lora_b, 0.5, 0.5)]
    concat, _ = combine(pair, "concat")
    svd8, _ = combine(pair, "svd", 8)

    def expected(k: str) -> torch.Tensor:
        return sum(w * L.delta(lo[k]) for lo, w, _ in pair if k in lo.layers)

    worst = max(float((L.delta(concat[k]) - expected(k)).abs().max()) for k in set(trained.layers) | set(
        lora_b.layers))
    run.check("combine", "concat reproduces 1.0·trained + 0.5·B (B: random, rank 4, attention + text encoder)",
              set(concat.layers) == set(trained.layers) | set(lora_b.layers) and worst <= 1e-5,
              f"max abs diff {worst:.2e} over {len(concat.layers)} layers; concat rank "
              f"{max(L.ranks(concat).values())}, svd rank 8")
    stage_done()

    # 7. apply with strengths
    t0 = time.perf_counter()
    host = DiffusersHost(pipe)
    latents = {"base": _generate(pipe)}
    for strength in (0.5, 1.0):
        coverage = host.apply([(trained, strength, strength)])
        latents[f"LoRA ×{strength}"] = _generate(pipe)
        host.remove()
    run.check("apply", "every LoRA layer matched a model weight", coverage.fraction == 1.0, coverage.summary())
    for title, value in (("resized (rank 4)", small), ("combined (svd 8)", svd8)):
        host.apply([(value, 1.0, 1.0)])
        latents[title] = _generate(pipe)
        host.remove()
    seen = {title: latent_to_rgb(lat) for title, lat in latents.items()}
    change = _distance(seen["LoRA ×1.0"], seen["base"])
    run.check("apply", "the trained LoRA visibly changes the picture",
              change > MIN_CHANGE, f"mean |Δpixel| of the latent preview {change:.3f} > {MIN_CHANGE} at strength 1.0 "
              f"({_distance(seen['LoRA ×0.5'], seen['base']):.3f} at 0.5)")
    far = {title: _distance(seen[title], target) for title in ("base", "LoRA ×0.5", "LoRA ×1.0")}
    run.check("apply", "the LoRA moves the picture toward the training image, half-way at 0.5",
              far["LoRA ×1.0"] < far["LoRA ×0.5"] < far["base"] and far["LoRA ×1.0"] <= CLOSER * far["base"],
              f"mean |preview − training image|: base {far['base']:.3f} → ×0.5 {far['LoRA ×0.5']:.3f} → ×1.0 "
              f"{far['LoRA ×1.0']:.3f} (≤ {CLOSER:g}× base); {time.perf_counter() - t0:.1f} s")
    stage_done()

    # 8. merge & unmerge
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    host.apply([(trained, 1.0, 1.0)])
    applied = _generate(pipe)
    host.merge()
    merged = _generate(pipe)
    seen["merged"] = latent_to_rgb(merged)
    gap = float((merged - applied).abs().max())
    run.check("merge", "merged output equals applied output", gap <= 1e-4,
              f"max abs diff of the latents {gap:.2e} (latent scale {float(applied.abs().max()):.2f})")
    host.unmerge()
    host.remove()
    restored = all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    run.check("merge", "unmerge restores the base bit-for-bit", restored, f"{len(before)} tensors torch.equal")
    tiles = [("training image", target)] + list(seen.items())
    run.picture("Same seed, latents shown through ComfyUI's SD 1.5 Latent2RGB preview: " + " / ".join(
        t for t, _ in tiles), _grid(tiles), "grid.png")
    stage_done()

    # 9. bake
    base_dir, baked_dir = out / "base_model", out / "baked_model"
    pipe.save_pretrained(base_dir, safe_serialization=True)
    baked = bake(base_dir, [(trained, 1.0, 1.0)], baked_dir, overwrite=True)
    run.check("bake", "every LoRA layer baked into the checkpoint", not baked.unmatched and baked.layers == len(
        trained.layers), baked.summary())
    stage_done()

    # 10. extract
    extracted, _ = extract(base_dir, baked_dir, 8, parts=("unet",))
    modules = dict(pipe.unet.named_modules())
    weights = {k: modules[path].weight.detach() for k, path in keymap.unet_canonical_keys(pipe.unet, "sd1").items()
               if k in trained.layers}
    deltas = {k: L.delta(layer) for k, layer in trained.layers.items()}
    # A ΔW far below fp32's resolution of its weight (the middle block's self-attention q/k see one token, so they
    # get no gradient) survives W + ΔW − W only to rounding: those are held to that, the others to 1e-3 relative.
    faint = {k for k, delta in deltas.items() if float(delta.abs().max()) < 1e-4 * float(weights[k].abs().max())}
    rel, rounding_ok = 0.0, True
    for k, delta in deltas.items():
        if k not in extracted.layers:
            continue
        err = L.delta(extracted[k]) - delta
        if k in faint:
            rounding_ok &= float(err.abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(weights[k].abs().max())
        else:
            rel = max(rel, float(err.norm() / delta.norm()))
    run.check("extract", "extracting base vs baked at rank 8 recovers the trained LoRA", set(extracted.layers) == set(
        trained.layers) and rel < 1e-3 and rounding_ok,
        f"max relative error {rel:.2e} over {len(extracted.layers) - len(faint)} layers; {len(faint)} layers whose "
        f"ΔW is below fp32 resolution of their weight recovered to rounding: {rounding_ok}")
    stage_done()
    bar.close()

    seconds = time.perf_counter() - t_start
    (out / "checks.json").write_text(json.dumps([asdict(c) for c in run.checks], indent=2))
    (out / "report.html").write_text(_html(run, seconds))
    failed = [c for c in run.checks if not c.passed]
    echo(f"{len(run.checks) - len(failed)} passed, {len(failed)} failed in {seconds:.1f} s — {out / 'report.html'}")
    return 1 if failed else 0


def _train_stage(run: _Run, pipe, steps: int) -> tuple[L.LoRA, torch.Tensor]:
    """Train a LoRA (every UNet Linear and Conv layer, rank 8) on four copies of `training_image` captioned
    "a red square", trigger "sks"; the loss must drop. Returns the LoRA and the training picture as the latent
    preview shows it (what a perfect LoRA would draw)."""
    from .testing.preview import latent_to_rgb, rgb_to_latent
    from .train import Dataset, TrainConfig, train
    from .train.diffusers_backend import DiffusersBackend

    t0 = time.perf_counter()
    latents = rgb_to_latent(_pixels(training_image()))
    data = Dataset.from_latents(latents.repeat(4, 1, 1, 1), CAPTION, name="red_square")
    # min-SNR weighting puts the effort on the noisy steps that decide the picture.
    config = TrainConfig(rank=8, targets="custom", target_pattern=r"^unet\.", learning_rate=1e-2, max_steps=steps,
                         batch_size=4, min_snr_gamma=5.0, resolution=SIZE, trigger_word=TRIGGER,
                         eval_every_steps=max(1, steps // 5), seed=1, title="demo red square",
                         hash_base_model=False)
    result = train(config, DiffusersBackend(pipe), data)
    evals = result.history.eval_loss
    drop = 1 - evals[-1] / evals[0]
    run.picture("Training loss", result.plot(), "loss.png")
    run.check("train", "denoising loss on a fixed evaluation batch drops ≥ 25%", drop >= 0.25,
              f"{evals[0]:.3f} → {evals[-1]:.3f} ({drop:.0%}) in {steps} steps, {len(result.lora.layers)} layers "
              f"(every UNet Linear/Conv), {time.perf_counter() - t0:.1f} s")
    return result.lora, latent_to_rgb(latents)


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
