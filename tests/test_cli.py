"""The command line: inspect/convert work on real files, errors are one line with exit code 2, no traceback."""

import json
import subprocess
import sys

import torch
from helpers import sample_lora

from lora_ops import lora as L
from lora_ops.cli import main
from lora_ops.files import load_lora, save_lora


def test_inspect_text_and_json(tmp_path, capsys):
    meta = {"modelspec.trigger_phrase": "sks style", "ss_tag_frequency": json.dumps({"5_sks": {"sks": 5, "dog": 2}})}
    path = save_lora(sample_lora("sdxl", metadata=meta, dtype=torch.float16), tmp_path / "x.safetensors", "kohya")
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "format: kohya" in text and "family: sdxl" in text and "sks style" in text
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "kohya" and report["family"] == "sdxl"
    assert set(report["parts"]) == {"unet", "te1", "te2"}
    assert report["dtypes"] == ["float16"] and report["ranks"] == {"4": report["layers"]}
    assert report["trigger_words"][:2] == ["sks style", "sks"]
    assert report["file_bytes"] == path.stat().st_size


def test_inspect_flags_nan(tmp_path, capsys):
    lora = sample_lora("sd1", attention_only=True)
    key = sorted(lora.layers)[0]
    layer = lora[key]
    up = layer.up.clone()
    up[0, 0] = float("nan")
    bad = lora.replace(layers={**lora.layers, key: L.LoRALayer(down=layer.down, up=up, alpha=layer.alpha)})
    path = save_lora(bad, tmp_path / "nan.safetensors", "kohya")
    assert main(["inspect", str(path)]) == 1
    assert "NaN/Inf in 1 layer" in capsys.readouterr().out


def test_convert_every_writable_format(tmp_path, capsys):
    src = save_lora(sample_lora("sd1"), tmp_path / "src.safetensors", "kohya")
    for fmt in ("comfyui", "diffusers", "kohya"):
        out = tmp_path / f"{fmt}.safetensors"
        assert main(["convert", str(src), "--to", fmt, "-o", str(out)]) == 0
        assert L.equal(load_lora(out), load_lora(src))
    out = tmp_path / "peft.safetensors"
    assert main(["convert", str(src), "--to", "peft", "--component", "unet", "-o", str(out)]) == 0
    assert set(load_lora(out).layers) == {k for k in load_lora(src).layers if k.startswith("unet.")}


def test_errors_are_one_line(tmp_path, capsys):
    src = save_lora(sample_lora("sd1"), tmp_path / "src.safetensors", "kohya")
    taken = save_lora(sample_lora("sd1", seed=1), tmp_path / "taken.safetensors", "kohya")
    assert main(["convert", str(src), "--to", "kohya", "-o", str(taken)]) == 2  # exists, no --overwrite
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert main(["convert", str(src), "--to", "kohya", "-o", str(src), "--overwrite"]) == 2  # never the input
    assert "-o is the input" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "Traceback" not in err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"<!DOCTYPE html><html>404</html>")
    assert main(["inspect", str(junk)]) == 2
    assert "re-download" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    src = save_lora(sample_lora("sd1", attention_only=True), tmp_path / "s.safetensors", "diffusers")
    proc = subprocess.run([sys.executable, "-m", "lora_ops.cli", "inspect", str(src), "--json"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "diffusers"


def test_threads_option_sets_torch_threads(tmp_path, capsys):
    path = save_lora(sample_lora("sd1", attention_only=True), tmp_path / "x.safetensors", "kohya")
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "3", "inspect", str(path)]) == 0
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert main(["--threads", "0", "inspect", str(path)]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
