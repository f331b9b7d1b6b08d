"""combine: concat/svd/linear reproduce Σ wᵢ·ΔWᵢ, svd truncation is Eckart–Young, ties/dare are seeded, metadata
is merged, and nothing is mutated."""

import json

import pytest
import torch
from test_linalg import _loha, make_layer

from lora_ops import lora as L
from lora_ops import rank_rules as R
from lora_ops.combine import block_id, combine, layer_generator
from lora_ops.errors import LoraValueError
from lora_ops.lora import LoRA, LoRALayer
from lora_ops.plots import spectrum_plot

Q = "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
C = "unet.output_blocks.2.0.conv"  # a 3×3 conv (LoCon)
T = "unet.middle_block.0.in_layers.2"  # Tucker
TE = "te1.text_model.encoder.layers.0.self_attn.q_proj"


def stack():
    """Three LoRAs: mixed ranks, alphas and dtypes, conv + Tucker, partly disjoint keys, different metadata."""
    a = LoRA({Q: make_layer("linear", 24, 16, 4, seed=1), C: make_layer("conv3x3", 12, 6, 3, seed=2),
              TE: make_layer("linear", 16, 16, 4, seed=3)},
             {"modelspec.trigger_phrase": "sks dog", "ss_tag_frequency": json.dumps({"1_a": {"dog": 3, "red": 1}}),
              "sshs_model_hash": "aaa", "modelspec.title": "A", "ss_network_dim": "4"}, family="sdxl")
    b = LoRA({Q: make_layer("linear", 24, 16, 8, seed=4, alpha=None), T: make_layer("tucker", 10, 8, 4, seed=5),
              C: make_layer("conv3x3", 12, 6, 5, seed=6, alpha=1.0)},
             {"modelspec.trigger_phrase": "ohwx cat, sks dog", "ss_tag_frequency": json.dumps({"1_a": {"dog": 2}}),
              "modelspec.title": "B"}, family="sdxl")
    c = L.cast(LoRA({Q: make_layer("linear", 24, 16, 2, seed=7, ill=True), TE: make_layer("linear", 16, 16, 6, seed=8),
                     "unet.other": _loha(8, 8, 2, 9)}, {}), torch.float16)
    return [(a, 0.8, 0.5), (b, -1.2, None), (c, 1.5, 2.0)]


def reference(items, key) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ for one key, dense in fp64 (text layers by their text weight)."""
    total = None
    for lora, w, wt in items:
        if key in lora.layers:
            weight = wt if (key.startswith("te") and wt is not None) else w
            d = weight * lora[key].delta(torch.float64)
            total = d if total is None else total + d.reshape(total.shape)
    return total


def rel_err(lora, items, key) -> float:
    ref = reference(items, key)
    return float((lora[key].delta(torch.float64).reshape(ref.shape) - ref).norm() / ref.norm())


def snapshot(items):
    return [{k: {n: t.clone() for n, t in ly.tensors().items()} for k, ly in lo.layers.items()} for lo, *_ in items]


def unchanged(items, snap) -> bool:
    return all(torch.equal(t, s[k][n]) for (lo, *_), s in zip(items, snap) for k, ly in lo.layers.items()
               for n, t in ly.tensors().items())


ALL_KEYS = {Q, C, T, TE, "unet.other"}


def test_concat_is_exact():
    items = stack()
    snap = snapshot(items)
    out, report = combine(items, "concat")
    assert unchanged(items, snap)
    assert set(out.layers) == ALL_KEYS  # the union
    for key in ALL_KEYS:
        assert rel_err(out, items, key) <= 1e-6, key
        assert out[key].alpha == out[key].rank  # scale 1
    assert out[Q].rank == 4 + 8 + 2 and out[C].rank == 3 + 5 and out[C].up.shape == (12, 8, 1, 1)
    assert out[T].mid is None and out[T].down.shape == (4, 8, 3, 3)
    assert L.dtypes(out) == {torch.float32}  # mixed inputs → fp32
    assert [r.sources for r in report.layers if r.key == Q] == [(0, 1, 2)]


def test_svd_full_rank_is_exact_and_truncation_is_eckart_young():
    items = stack()
    snap = snapshot(items)
    out, report = combine(items, "svd", compute_dtype=torch.float64, dtype=torch.float64)
    for key in ALL_KEYS:
        assert rel_err(out, items, key) <= 1e-6, key
    out32, _ = combine(items, "svd")  # the fp32 default: to fp32 rounding
    for key in ALL_KEYS:
        assert rel_err(out32, items, key) <= 2e-6, key
    assert out[Q].rank == 14 and out32[Q].alpha == 14
    for k in (1, 3, 7):
        out, report = combine(items, "svd", R.Fixed(k), conv_rule=R.Fixed(2))
        for key in ALL_KEYS:
            ref = reference(items, key).flatten(1)
            sv = torch.linalg.svdvals(ref)
            kk = out[key].rank
            rec = next(r for r in report.layers if r.key == key)
            assert kk == min(2 if key in (C, T) else k, len(rec.singular_values))  # LoHa: its numerical rank
            optimum = float(sv[kk:].norm())
            err = float((out[key].delta(torch.float64).flatten(1) - ref).norm())
            assert abs(err - optimum) <= 1e-5 * optimum + 1e-6 * float(sv.norm()), key  # + fp32 rounding floor
            assert rec.error_fro == pytest.approx(optimum, rel=1e-4, abs=1e-6 * float(sv.norm()))
    assert unchanged(items, snap)


def test_linear_is_the_dense_weighted_sum():
    items = stack()
    snap = snapshot(items)
    out, report = combine(items, "linear")
    assert unchanged(items, snap)
    for key in ALL_KEYS:
        assert rel_err(out, items, key) <= 2e-6, key
    assert out[Q].rank == 14  # Σ ranks: the sum's rank
    # not Σ Aᵢ and Σ Bᵢ (cross terms): a case where that would be far off
    a = LoRA({Q: make_layer("linear", 24, 16, 4, seed=1)})
    b = LoRA({Q: make_layer("linear", 24, 16, 4, seed=2)})
    out, _ = combine([(a, 1.0), (b, 1.0)], "linear")
    ref = a[Q].delta() + b[Q].delta()
    naive = (a[Q].up + b[Q].up) @ (a[Q].down + b[Q].down) * a[Q].scale
    assert (out[Q].delta() - ref).norm() < 1e-5 * ref.norm() < (naive - ref).norm()


def test_ties_and_dare_small_example():
    key = "unet.x"
    d1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    d2 = torch.tensor([[1.0, 2.0], [-4.0, 0.0]])
    lo1 = LoRA({key: LoRALayer(down=torch.eye(2), up=d1, alpha=2.0)})  # ΔW = d1
    lo2 = LoRA({key: LoRALayer(down=torch.eye(2), up=d2, alpha=2.0)})
    out, _ = combine([(lo1, 1.0), (lo2, 1.0)], "ties", density=1.0)
    # signs: sum = [[4, 1], [-3.5, 2]] → agree: [[3,1 → 2], [2 → 2]], [[-4 → -4], [2 → 2]]
    expected = torch.tensor([[2.0, 2.0], [-4.0, 2.0]])
    assert torch.allclose(out[key].delta(), expected, atol=1e-5)
    out, _ = combine([(lo1, 1.0), (lo2, 1.0)], "ties", density=0.5)  # keep 2 of 4 entries per task vector
    expected = torch.tensor([[3.0, 2.0], [-4.0, 2.0]])  # τ₁ → [[3,0],[0,2]], τ₂ → [[0,2],[-4,0]]
    assert torch.allclose(out[key].delta(), expected, atol=1e-5)
    lin, _ = combine([(lo1, 1.0), (lo2, 1.0)], "dare_linear", density=1.0)
    assert torch.allclose(lin[key].delta(), d1 + d2, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_dare_are_deterministic_per_seed(method):
    items = stack()
    snap = snapshot(items)
    one, report = combine(items, method, seed=7, density=0.4)
    again, _ = combine(items, method, seed=7, density=0.4)
    other, _ = combine(items, method, seed=8, density=0.4)
    assert unchanged(items, snap)
    assert L.equal(one, again)
    assert set(one.layers) == ALL_KEYS
    if method == "ties":
        assert L.equal(one, other)  # no randomness in TIES
        assert report.seed is None
    else:
        assert not L.equal(one, other, metadata=False)
        assert report.seed == 7
    assert report.density == 0.4


def test_layer_generator_is_stable():
    a = torch.rand(4, generator=layer_generator(3, "unet.a"))
    assert torch.equal(a, torch.rand(4, generator=layer_generator(3, "unet.a")))
    assert not torch.equal(a, torch.rand(4, generator=layer_generator(3, "unet.b")))


def test_metadata_merged():
    out, _ = combine(stack(), "concat")
    m = out.metadata
    assert m["modelspec.trigger_phrase"] == "sks dog, ohwx cat"
    assert json.loads(m["ss_tag_frequency"]) == {"1_a": {"dog": 5, "red": 1}}
    assert m["modelspec.title"] == "A + B"
    assert "sshs_model_hash" not in m
    assert m["ss_network_dim"] == "Dynamic" and m["ss_training_comment"].startswith("combined by lora-ops (concat")
    assert out.family == "sdxl"


def test_block_and_text_weights():
    assert block_id(Q) == "in4" and block_id(C) == "out2" and block_id(T) == "mid" and block_id(TE) == "te1"
    assert block_id("unet.double_blocks.3.img_attn.qkv") == "double3" and block_id("unet.time_embed.0") == "unet"
    items = stack()
    out, _ = combine(items, "concat", block_weights={"in4": 0.0, "mid": 2.0, "te": 0.5})
    assert Q not in out.layers  # weight 0 everywhere: dropped
    b = items[1][0]
    assert torch.allclose(out[T].delta(), -1.2 * 2.0 * b[T].delta(), atol=1e-6)
    ref = 0.5 * (0.5 * items[0][0][TE].delta() + 2.0 * items[2][0][TE].delta().float())
    assert torch.allclose(out[TE].delta(), ref, atol=1e-3)
    out, _ = combine(items, "concat", block_weights=[None, lambda k: 0.0, {"unet": 3.0}])
    assert T not in out.layers  # only b had it
    assert torch.allclose(out[C].delta(), 0.8 * items[0][0][C].delta(), atol=1e-6)
    with pytest.raises(LoraValueError, match="block-weight sets"):
        combine(items, "concat", block_weights=[None])


def test_target_size_and_report():
    out, report = combine(stack(), "svd", R.TargetSize(0.02))
    assert L.nbytes(out) < 20_000
    json.dumps(report.to_dict(), allow_nan=False)
    assert report.method == "svd" and "combine 3 (svd)" in report.summary()
    assert spectrum_plot(report).size[1] > 200


def test_refusals():
    items = stack()
    with pytest.raises(LoraValueError, match="unknown combine method"):
        combine(items, "average")
    with pytest.raises(LoraValueError, match="concat is exact"):
        combine(items, "concat", R.Fixed(4))
    with pytest.raises(LoraValueError, match="rank rule"):
        combine(items, "svd", 2.5)
    with pytest.raises(LoraValueError, match="density"):
        combine(items, "dare_ties", density=0)
    with pytest.raises(LoraValueError, match="nothing to combine"):
        combine([], "svd")
    assert L.ranks(combine(items, "svd", "sv_fro:1.0", conv_rule=2)[0])[C] == 2
    with pytest.raises(LoraValueError, match="finite"):
        combine([(items[0][0], float("nan"))], "svd")
    wrong = LoRA({Q: make_layer("linear", 24, 20, 4)})
    with pytest.raises(LoraValueError, match="cannot be summed"):
        combine([items[0][:2], (wrong, 1.0)], "svd")
    with pytest.raises(LoraValueError, match="different models"):
        combine([items[0][:2], (items[1][0].replace(family="sd1"), 1.0)], "concat")
    base = make_layer("linear", 24, 16, 4)
    dora = LoRA({Q: LoRALayer(down=base.down, up=base.up, alpha=4.0, dora_scale=torch.ones(24, 1))})
    with pytest.raises(LoraValueError, match="DoRA"):
        combine([(dora, 1.0), items[0][:2]], "svd")
