"""`lora-ops demo` runs every stage, every check passes, and the report and pictures are real files."""

import json

from PIL import Image

from lora_ops.cli import main

STAGES = {"build", "train", "save", "inspect", "resize", "combine", "apply", "merge", "bake", "extract"}


def test_demo_runs_every_stage_and_every_check_passes(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and " 0 failed" in out
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert {c["stage"] for c in checks} == STAGES
    assert all(c["passed"] for c in checks)
    for name in ("grid.png", "loss.png", "spectrum_rank4.png", "spectrum_sv_fro.png"):
        with Image.open(tmp_path / name) as image:
            image.verify()
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "http" not in page  # self-contained
    assert json.loads((tmp_path / "inspect.json").read_text())["family"] == "sd1"


def test_readme_images_exist_and_are_valid():
    """Every image the README shows is in the repo and decodes (the README's grid comes from `lora-ops demo`)."""
    import re
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parent.parent
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (root / "README.md").read_text(encoding="utf-8"))
    assert "docs/grid.png" in images
    for rel in images:
        with Image.open(root / rel) as image:
            image.verify()
