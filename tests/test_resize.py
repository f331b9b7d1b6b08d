"""Rank rules (exact boundaries, refusals) and resize (Eckart–Young optimum, strength, metadata, report, plot)."""

import json
import math

import pytest
import safetensors.torch
import torch
from test_linalg import _loha, make_layer

from lora_ops import lora as L
from lora_ops import rank_rules as R
from lora_ops.errors import LoraValueError
from lora_ops.lora import LoRA, LoRALayer
from lora_ops.plots import spectrum_plot
from lora_ops.resize import resize

S = torch.tensor


# --- rank rules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "sv", "expected"),
    [
        (R.Fixed(2), [8, 4, 2, 1], 2),
        (R.Fixed(100), [8, 4, 2, 1], 4),  # clamped, never an error
        (R.SvRatio(4), [8, 4, 2, 1], 2),  # σ > 8/4 = 2: strict, σ=2 itself is out
        (R.SvRatio(4.0001), [8, 4, 2, 1], 3),
        (R.SvRatio(1), [8, 8, 2, 1], 1),  # 1 keeps σ₀ alone, even against a tie
        (R.SvRatio(1e12), [8, 4, 0, 0], 2),  # zeros never pass
        (R.SvRatio(1e12, max_rank=1), [8, 4, 2, 1], 1),
        (R.SvFro(0.8), [4, 3], 1),  # ‖(4)‖/‖(4,3)‖ = 0.8 exactly: reached
        (R.SvFro(0.800001), [4, 3], 2),
        (R.SvFro(1.0), [4, 3, 0], 2),
        (R.SvFro(1e-9), [4, 3, 1], 1),
        (R.SvFro(0.99, max_rank=1), [4, 3, 1], 1),
        (R.SvCumulative(0.5), [5, 3, 2], 1),
        (R.SvCumulative(0.8), [5, 3, 2], 2),
        (R.SvCumulative(0.80001), [5, 3, 2], 3),
        (R.SvCumulative(1.0), [5, 3, 2], 3),
        (R.SvCumulative(1e-9), [5, 3, 2], 1),
        (R.BaseRelative(0.1, {"k": 30.0}), [8, 4, 3, 1], 2),  # σ > 3
        (R.BaseRelative(1.0, {"k": 100.0}), [8, 4], 1),  # nothing passes: at least rank 1
    ],
)
def test_rules_keep_exactly_what_they_say(rule, sv, expected):
    assert R.choose_rank(rule, S(sv, dtype=torch.float32), "k") == expected


def test_zero_layer_keeps_rank_one_or_is_dropped():
    zero = torch.zeros(4)
    for rule in (R.Fixed(3), R.SvRatio(10), R.SvFro(0.9), R.SvCumulative(0.5)):
        assert R.choose_rank(rule, zero) == 1
        assert R.choose_rank(rule, zero, drop_zero=True) == 0


def test_sv_fro_means_what_kohya_means():
    """kohya: rank = searchsorted(cumsum(σ²)/Σσ², x²) + 1 — the retained Frobenius *norm* fraction is x."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sv = torch.rand(32, generator=gen).sort(descending=True).values.double()
        for x in (0.3, 0.5, 0.9, 0.99):
            cum = sv.square().cumsum(0) / sv.square().sum()
            kohya = min(int(torch.searchsorted(cum, x**2)), len(sv) - 1) + 1
            ours = R.choose_rank(R.SvFro(x), sv)
            assert ours == kohya
            assert math.sqrt(float(cum[ours - 1])) >= x - 1e-9  # reports ≥ x·100 % retained
            assert ours == 1 or math.sqrt(float(cum[ours - 2])) < x  # and no fewer would do


def test_sv_ratio_and_sv_cumulative_match_current_kohya():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        sv = torch.rand(32, generator=gen).sort(descending=True).values.double()
        for x in (1.5, 3.0, 10.0):  # kohya (current): index = #(σ > σ₀/x) − 1, clamped, rank = index + 1
            kohya = max(0, min(int((sv > sv[0] / x).sum()) - 1, len(sv) - 1)) + 1
            assert R.choose_rank(R.SvRatio(x), sv) == kohya
        for x in (0.2, 0.5, 0.9):  # kohya: searchsorted(cumsum(σ)/Σσ, x) + 1
            kohya = min(int(torch.searchsorted(sv.cumsum(0) / sv.sum(), x)), len(sv) - 1) + 1
            assert R.choose_rank(R.SvCumulative(x), sv) == kohya


@pytest.mark.parametrize(
    "make",
    [
        lambda: R.Fixed(0),
        lambda: R.Fixed(-3),
        lambda: R.Fixed(2.5),
        lambda: R.Fixed(True),
        lambda: R.SvRatio(0),
        lambda: R.SvRatio(-1),
        lambda: R.SvRatio(0.5),
        lambda: R.SvRatio(float("nan")),
        lambda: R.SvFro(0),
        lambda: R.SvFro(1.01),
        lambda: R.SvFro(float("inf")),
        lambda: R.SvCumulative(-0.1),
        lambda: R.SvCumulative(2),
        lambda: R.SvFro(0.9, max_rank=0),
        lambda: R.TargetSize(0),
        lambda: R.BaseRelative(0, {}),
        lambda: R.make_rule("nope", 1),
        lambda: R.parse_rule("sv_fro:abc"),
    ],
)
def test_bad_parameters_are_refused_clearly(make):
    with pytest.raises(LoraValueError) as info:
        make()
    assert len(str(info.value)) > 15


def test_parse_rule():
    assert R.parse_rule("32") == R.Fixed(32)
    assert R.parse_rule("rank:8") == R.Fixed(8)
    assert R.parse_rule("sv_fro:0.9") == R.SvFro(0.9)
    assert R.parse_rule("sv_ratio=4", max_rank=64) == R.SvRatio(4, 64)
    assert R.parse_rule("sv_cumulative:0.5") == R.SvCumulative(0.5)
    assert R.parse_rule("size_mb:12.5") == R.TargetSize(12.5)
    assert R.SvFro(0.9, 16).describe() == "sv_fro 0.9 (max rank 16)"


def test_base_relative_needs_the_base_and_takes_tensors():
    w = torch.diag(torch.tensor([10.0, 1.0, 0.5]))
    rule = R.BaseRelative(0.25, {"a": w})
    assert rule.base["a"] == pytest.approx(10.0)
    assert R.choose_rank(rule, S([5.0, 3.0, 2.0]), "a") == 2  # σ > 2.5
    with pytest.raises(LoraValueError, match="no base weight"):
        R.choose_rank(rule, S([5.0, 3.0]), "missing")


def test_target_size_is_one_global_threshold_that_fits():
    gen = torch.Generator().manual_seed(1)
    spectra = {f"l{i}": (torch.rand(12, generator=gen) * (i + 1)).sort(descending=True).values for i in range(6)}
    cost = {k: 100 * (i + 1) for i, k in enumerate(spectra)}
    rules = dict.fromkeys(spectra, R.TargetSize(0.02))  # 20 000 bytes
    ranks = R.choose_ranks(spectra, rules, bytes_per_rank=cost, fixed_bytes=1000)
    used = 1000 + sum(ranks[k] * cost[k] for k in spectra)
    assert used <= 20_000
    kept = [float(s[i]) for k, s in spectra.items() for i in range(ranks[k])]
    firsts = {float(s[0]) for s in spectra.values()}
    dropped = [float(s[i]) for k, s in spectra.items() for i in range(ranks[k], len(s))]
    assert min(v for v in kept if v not in firsts) > max(dropped)  # one threshold for all layers
    # maximal: the next singular value in line would not fit
    nxt = max((float(s[ranks[k]]), k) for k, s in spectra.items() if ranks[k] < len(s))
    assert used + cost[nxt[1]] > 20_000
    with pytest.raises(LoraValueError, match="below the smallest possible"):
        R.choose_ranks(spectra, dict.fromkeys(spectra, R.TargetSize(0.001)), bytes_per_rank=cost)


# --- resize ---------------------------------------------------------------------------------------------------


def _lora(**layers) -> LoRA:
    return LoRA({k.replace("__", "."): v for k, v in layers.items()}, {"ss_network_dim": "12", "x": "y"})


def _snapshot(lora: LoRA) -> dict:
    return {k: {n: t.clone() for n, t in ly.tensors().items()} for k, ly in lora.layers.items()}


def _unchanged(lora: LoRA, snap: dict) -> bool:
    return all(torch.equal(t, snap[k][n]) for k, ly in lora.layers.items() for n, t in ly.tensors().items())


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3", "tucker", "loha"])
@pytest.mark.parametrize("rule", [R.Fixed(3), R.SvFro(0.7), R.SvRatio(3), R.SvCumulative(0.6)], ids=str)
def test_resized_error_is_the_eckart_young_optimum(kind, rule):
    layer = _loha(30, 20, 4, 3) if kind == "loha" else make_layer(kind, 30, 20, 12, seed=5)
    lora = _lora(unet__a=layer)
    snap = _snapshot(lora)
    out, report = resize(lora, rule)
    assert _unchanged(lora, snap)
    new = out["unet.a"]
    ref = layer.delta(torch.float64).flatten(1)
    sv = torch.linalg.svdvals(ref)
    k = new.rank
    assert k == R.choose_rank(rule, sv)
    optimum = float(sv[k:].norm())
    err = float((new.delta(torch.float64).flatten(1) - ref).norm())
    assert abs(err - optimum) <= 1e-5 * optimum
    rec = report.layers[0]
    assert rec.new_rank == k and rec.old_rank == layer.rank
    assert rec.error_fro == pytest.approx(optimum, rel=1e-5)
    assert rec.fro_retained_pct == pytest.approx(100 * float(sv[:k].norm() / sv.norm()), rel=1e-5)
    assert rec.max_ratio == pytest.approx(float(sv[0] / sv[k - 1]), rel=1e-4)
    assert new.delta().shape == layer.delta().shape or kind == "loha"


def test_strength_and_alpha_ratio_kept_full_rank_is_exact():
    lora = _lora(unet__a=make_layer("linear", 24, 16, 8, alpha=2.0), te1__b=make_layer("linear", 16, 16, 8, alpha=None))
    out, _ = resize(lora, R.Fixed(64))  # clamped to 8: the same ΔW
    for key in lora:
        assert out[key].rank == 8
        assert torch.allclose(out[key].delta(), lora[key].delta(), atol=1e-5 * lora[key].delta().abs().max())
    assert out["unet.a"].alpha == pytest.approx(2.0) and out["unet.a"].scale == pytest.approx(0.25)
    assert out["te1.b"].alpha is None
    out, _ = resize(lora, R.Fixed(3))
    assert out["unet.a"].alpha == pytest.approx(0.75)  # ρ = 2/8 kept: 0.25·3
    up, down = out["unet.a"].up, out["unet.a"].down
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-4)  # σ split evenly between the factors


def test_conv_rule_only_for_kernels_larger_than_1x1_and_dtypes():
    lora = _lora(
        unet__lin=make_layer("linear", 20, 20, 8),
        unet__c1=make_layer("conv1x1", 20, 20, 8, seed=1),
        unet__c3=make_layer("conv3x3", 20, 20, 8, seed=2),
        unet__tk=make_layer("tucker", 20, 20, 8, seed=3),
    )
    lora = L.cast(lora, torch.float16)
    out, _ = resize(lora, R.Fixed(4), conv_rule=R.Fixed(2))
    assert L.ranks(out) == {"unet.lin": 4, "unet.c1": 4, "unet.c3": 2, "unet.tk": 2}
    assert L.dtypes(out) == {torch.float16}
    assert out["unet.tk"].mid is None and out["unet.tk"].down.shape == (2, 20, 3, 3)
    assert out["unet.c1"].up.shape == (20, 4, 1, 1)
    out, _ = resize(lora, R.Fixed(4), dtype=torch.bfloat16)
    assert L.dtypes(out) == {torch.bfloat16}


def test_zero_layers_and_dora():
    base = make_layer("linear", 12, 10, 4)
    zero = LoRALayer(down=base.down, up=torch.zeros_like(base.up), alpha=4.0)
    dora = LoRALayer(down=base.down, up=base.up, alpha=4.0, dora_scale=torch.ones(12, 1))
    lora = _lora(unet__z=zero, unet__d=dora)
    out, report = resize(lora, R.SvFro(0.9))
    assert out["unet.z"].rank == 1 and out["unet.z"].delta().abs().max() == 0
    assert out["unet.d"].dora_scale is dora.dora_scale
    out, report = resize(lora, R.SvFro(0.9), drop_zero=True)
    assert "unet.z" not in out and report.dropped == ["unet.z"]


def test_metadata_updated_and_report_serialisable(tmp_path):
    meta = {"ss_network_dim": "8", "ss_network_alpha": "4", "sshs_model_hash": "abc", "ss_training_comment": "hi",
            "modelspec.trigger_phrase": "sks", "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"})}
    lora = LoRA({"unet.a": make_layer("linear", 24, 16, 8, alpha=4.0), "unet.c": make_layer("conv3x3", 12, 6, 8)},
                meta, family="sdxl")
    out, report = resize(lora, R.Fixed(4), conv_rule=R.Fixed(2))
    m = out.metadata
    assert m["ss_network_dim"] == "4" and m["ss_network_alpha"] == "2"  # alpha/rank ratio ½ kept
    assert json.loads(m["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "0.75"}
    assert "sshs_model_hash" not in m and m["modelspec.trigger_phrase"] == "sks"
    assert m["ss_training_comment"].startswith("resized by lora-ops from rank 8 to rank 4") and "hi" in m[
        "ss_training_comment"]
    assert out.family == "sdxl"
    out, report = resize(lora, R.SvFro(0.6))
    assert out.metadata["ss_network_dim"] in {"Dynamic", *(str(r) for r in range(1, 9))}
    text = json.dumps(report.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert back["layers"][0]["singular_values"][0] > 0 and back["rule"] == "sv_fro 0.6"
    assert "mean Frobenius" in report.summary()
    image = spectrum_plot(report, tmp_path / "spectrum.png")
    assert image.size[0] > 400 and (tmp_path / "spectrum.png").read_bytes()[:4] == b"\x89PNG"


def test_target_size_resize_fits():
    lora = LoRA({f"unet.l{i}": make_layer("linear", 64, 48, 16, seed=i) for i in range(4)})
    out, report = resize(lora, R.TargetSize(0.015))
    tensors = {}
    for key, ly in out.layers.items():
        name = "lora_unet_" + key.removeprefix("unet.").replace(".", "_")
        tensors |= {f"{name}.lora_down.weight": ly.down, f"{name}.lora_up.weight": ly.up,
                    f"{name}.alpha": torch.tensor(ly.alpha)}
    assert len(safetensors.torch.save(tensors, dict(out.metadata))) <= 15_000  # the file itself fits
    assert L.nbytes(out) < L.nbytes(lora)
    with_conv = lora.replace(layers={**lora.layers, "unet.c": make_layer("conv3x3", 8, 4, 4)})
    with pytest.raises(LoraValueError, match="only one target-size"):
        resize(with_conv, R.TargetSize(15), conv_rule=R.TargetSize(1))
    assert L.ranks(resize(lora, 4)[0]) == L.ranks(resize(lora, "rank:4")[0]) == dict.fromkeys(lora.layers, 4)
    with pytest.raises(LoraValueError, match="rank rule"):
        resize(lora, [4])
