"""`lora-ops demo` runs every stage and every check passes."""

import json

from lora_ops.cli import main


def test_demo_runs_and_every_check_passes(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert checks and all(c["passed"] for c in checks)
    assert {c["stage"] for c in checks} >= {"build", "save", "inspect"}
    assert (tmp_path / "sample_kohya.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "inspect.json").read_text())["family"] == "sd1"
