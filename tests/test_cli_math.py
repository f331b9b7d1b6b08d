"""`lora-ops resize` and `lora-ops combine` (alias `merge`) end to end: outputs load back and keep their promises."""

import json

import torch
from helpers import sample_lora
from PIL import Image

from lora_ops import lora as L
from lora_ops.cli import main
from lora_ops.files import load_lora, save_lora


def test_resize_fixed_and_dynamic_with_report_and_plot(tmp_path, capsys):
    src = save_lora(sample_lora("sd1", rank=8, attention_only=True), tmp_path / "in.safetensors", "kohya")
    out = tmp_path / "r4.safetensors"
    assert main(["resize", str(src), "-o", str(out), "--rank", "4", "--report", str(tmp_path / "r.json"),
                 "--plot", str(tmp_path / "s.png"), "-q"]) == 0
    resized = load_lora(out)
    assert set(L.ranks(resized).values()) == {4} and resized.source_format == "kohya"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report and "layers" in report
    assert Image.open(tmp_path / "s.png").size[0] > 100
    assert main(["resize", str(src), "-o", str(tmp_path / "fro.safetensors"), "--sv-fro", "0.9", "-q"]) == 0
    assert max(L.ranks(load_lora(tmp_path / "fro.safetensors")).values()) <= 8
    assert main(["resize", str(src), "-o", str(tmp_path / "bad.safetensors"), "--rank", "0", "-q"]) == 2
    assert "rank" in capsys.readouterr().err


def test_merge_concat_is_exact_sum(tmp_path):
    a, b = sample_lora("sd1", seed=1, attention_only=True), sample_lora("sd1", seed=2, attention_only=True)
    pa = save_lora(a, tmp_path / "a.safetensors", "kohya")
    pb = save_lora(b, tmp_path / "b.safetensors", "diffusers")
    out = tmp_path / "m.safetensors"
    assert main(["merge", f"{pa}:0.7", f"{pb}:0.5:0.25", "-o", str(out), "--method", "concat", "-q"]) == 0
    merged = load_lora(out)
    for key, layer in merged.layers.items():
        wt = 0.25 if L.is_text_encoder_key(key) else 0.5
        expected = 0.7 * L.delta(a[key]) + wt * L.delta(b[key])
        torch.testing.assert_close(L.delta(layer), expected, rtol=0, atol=1e-6)
    assert main(["merge", str(pa), str(pb), "-o", str(tmp_path / "s.safetensors"), "--method", "svd",
                 "--rank", "4", "-q"]) == 0
    assert set(L.ranks(load_lora(tmp_path / "s.safetensors")).values()) == {4}
