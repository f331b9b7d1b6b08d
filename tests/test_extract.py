"""Extract: base + tuned checkpoints → LoRA; a baked LoRA comes back; truncation is the Eckart–Young optimum."""

import pytest
import torch
from helpers import sample_lora
from test_bake import write_checkpoint

from lora_ops import LoraValueError
from lora_ops import lora as L
from lora_ops.bake import bake
from lora_ops.cli import main
from lora_ops.extract import extract
from lora_ops.files import load_lora


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extract")
    base = write_checkpoint(tmp / "base.safetensors", "sd1", dtype=torch.float64)
    lora = sample_lora("sd1", rank=4, alpha=4.0, attention_only=True)
    tuned = tmp / "tuned.safetensors"
    bake(base, [(lora, 1.0, 1.0)], tuned)
    return base, tuned, lora


def test_extract_at_the_same_rank_recovers_the_lora(pair):
    base, tuned, lora = pair
    out, report = extract(base, tuned, 4, compute_dtype=torch.float64)
    assert set(out.layers) == set(lora.layers)  # untouched weights are skipped
    assert out.family == "sd1"
    worst = max(float((L.delta(out[k], torch.float64) - L.delta(layer, torch.float64)).norm()
                      / L.delta(layer, torch.float64).norm()) for k, layer in lora.layers.items())
    assert worst < 1e-6, worst  # fp32 factors; ComfyUI's quantile-clamped extractor: ~11% median
    assert all(r.new_rank == 4 for r in report.layers)


def test_lower_rank_is_the_eckart_young_optimum(pair):
    base, tuned, lora = pair
    out, report = extract(base, tuned, 2, compute_dtype=torch.float64)
    for r in report.layers:
        exact = L.delta(lora[r.key], torch.float64)
        err = float((L.delta(out[r.key], torch.float64) - exact).norm())
        sv = torch.linalg.svdvals(exact.flatten(1))
        assert err == pytest.approx(float(sv[2:].square().sum().sqrt()), rel=1e-6)


def test_cli_extract_and_refusals(pair, tmp_path, capsys):
    base, tuned, lora = pair
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(base), str(tuned), "-o", str(out), "--sv-fro", "0.999", "-q"]) == 0
    got = load_lora(out)
    assert set(got.layers) == set(lora.layers) and max(L.ranks(got).values()) <= 4
    with pytest.raises(LoraValueError, match="do not differ"):
        extract(base, base, 4)
    assert main(["extract", str(base), str(tuned), "-o", str(tmp_path / "y.safetensors"), "--size-mb", "1"]) == 2
    assert "per-layer" in capsys.readouterr().err
