"""`lora-ops demo` runs every stage, every check passes, and the report and pictures are real files."""

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_ops.cli import main
from lora_ops.testing.preview import SD15_LATENT_RGB_FACTORS, latent_to_rgb, rgb_to_latent

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"build", "train", "save", "inspect", "resize", "combine", "apply", "merge", "bake", "extract"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One run of the demo as a user runs it (the CLI, default training steps), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    import lora_ops.cli as cli

    original, cli._out = cli._out, lines.append
    try:
        code = main(["demo", "--out", str(out), "--quiet"])
    finally:
        cli._out = original
    return code, "\n".join(lines), out


def test_demo_runs_every_stage_and_every_check_passes(demo):
    code, out_text, out = demo
    assert code == 0
    assert "FAIL" not in out_text and " 0 failed" in out_text
    checks = json.loads((out / "checks.json").read_text())
    assert {c["stage"] for c in checks} == STAGES
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    for name in ("grid.png", "loss.png", "spectrum_rank4.png", "spectrum_sv_fro.png"):
        with Image.open(out / name) as image:
            image.verify()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "http" not in page  # self-contained
    assert json.loads((out / "inspect.json").read_text())["family"] == "sd1"


def test_demo_grid_shows_the_trained_lora(demo):
    """The report measures what the grid shows: the trained LoRA changes the picture visibly and moves it toward
    the training image, half-way at 0.5 (the figures are parsed back from the check lines)."""
    _, _, out = demo
    apply = {c["name"]: c for c in json.loads((out / "checks.json").read_text()) if c["stage"] == "apply"}
    change = apply["the trained LoRA visibly changes the picture"]
    assert change["passed"] and float(re.search(r"preview ([\d.]+) >", change["figure"]).group(1)) > 0.1
    toward = apply["the LoRA moves the picture toward the training image, half-way at 0.5"]
    base, half, full = map(float, re.search(r"base ([\d.]+) → ×0.5 ([\d.]+) → ×1.0 ([\d.]+)",
                                            toward["figure"]).groups())
    assert toward["passed"] and full < half < base and full <= 0.5 * base


def test_readme_images_exist_and_are_valid(demo):
    """Every image the README shows is in the repo, decodes and is small; the README's grid is laid out as
    `lora-ops demo` draws it today (regenerate docs/grid.png from the demo when the layout changes)."""
    _, _, out = demo
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert "docs/grid.png" in images
    for rel in images:
        assert (ROOT / rel).stat().st_size < 200_000, rel
        with Image.open(ROOT / rel) as image:
            image.verify()
    with Image.open(ROOT / "docs" / "grid.png") as shipped, Image.open(out / "grid.png") as fresh:
        assert shipped.size == fresh.size


def test_latent_preview_is_comfyuis_latent2rgb_and_inverts():
    """latent_to_rgb is ComfyUI's SD 1.5 Latent2RGB formula; rgb_to_latent inverts it on 8×8 block means."""
    latents = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor(SD15_LATENT_RGB_FACTORS)
    comfy = ((torch.nn.functional.linear(latents.movedim(1, -1), factors.t()) + 1) / 2).clamp(0, 1).movedim(-1, 1)
    assert torch.allclose(latent_to_rgb(latents), comfy, atol=1e-6)
    blocks = torch.rand(2, 3, 3, 5, generator=torch.Generator().manual_seed(1))
    pixels = blocks.repeat_interleave(8, 2).repeat_interleave(8, 3)  # (2, 3, 24, 40)
    assert rgb_to_latent(pixels).shape == (2, 4, 3, 5)
    assert torch.allclose(latent_to_rgb(rgb_to_latent(pixels)), blocks, atol=1e-5)
    with pytest.raises(ValueError):
        rgb_to_latent(torch.rand(1, 3, 12, 16))
