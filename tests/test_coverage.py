"""check_coverage: matched / unmatched (grouped) / wrong-shape layers, the refusal threshold and its hints."""

import logging

import pytest
import torch
from helpers import canonical_shapes, sample_lora

from lora_ops import lora as L
from lora_ops.coverage import (
    CoverageReport,
    check_coverage,
    combine_reports,
    group_of,
    shapes_fit,
)
from lora_ops.errors import LoraValueError
from lora_ops.hosts import check_items


def fake_layers(n, prefix="unet.fake_blocks", width=8):
    return {f"{prefix}.{i}.to_q": L.LoRALayer(down=torch.ones(2, width), up=torch.ones(width, 2)) for i in range(n)}


def test_full_match_logs_nothing(caplog):
    lora = sample_lora("sd1", attention_only=True)
    with caplog.at_level(logging.WARNING, logger="lora_ops"):
        report = check_coverage(lora, canonical_shapes("sd1"), model_family="sd1")
    assert report.fraction == 1.0 and set(report.matched) == set(lora.layers)
    assert not report.unmatched and not report.mismatched and not caplog.records
    assert report.summary().startswith(f"{len(lora)} of {len(lora)} LoRA layers matched (100%); SD1.x LoRA on an SD1.x")


def test_unmatched_keys_are_grouped_by_part_and_block(caplog):
    lora = sample_lora("sd1", attention_only=True)
    extra = {**fake_layers(12, "unet.output_blocks_v2"), **fake_layers(3, "te2.text_model.encoder.layers")}
    noisy = lora.replace(layers={**lora.layers, **extra})
    with caplog.at_level(logging.WARNING, logger="lora_ops"):
        report = check_coverage(noisy, canonical_shapes("sd1"), model_family="sd1")
    assert {g: len(k) for g, k in report.unmatched.items()} == {
        "unet.output_blocks_v2.*": 12,
        "te2.text_model.encoder.layers.*": 3,
    }
    assert report.unmatched_count == 15 and report.total == len(noisy)
    summary = report.summary()
    assert "unet.output_blocks_v2.*: 12 layers" in summary and "te2.text_model.encoder.layers.*: 3 layers" in summary
    assert "unet.output_blocks_v2.0.to_q" not in summary  # groups, not a wall of keys
    assert any(summary in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("key", "group"),
    [
        ("unet.output_blocks.3.1.transformer_blocks.0.attn1.to_q", "unet.output_blocks.*"),
        ("te1.text_model.encoder.layers.0.mlp.fc1", "te1.text_model.encoder.layers.*"),
        ("te2.text_projection", "te2.text_projection"),
        ("unet.middle_block.1.proj_in", "unet.middle_block.*"),
        ("unet.a.b.c.d.e", "unet.a.b.c.*"),
    ],
)
def test_group_of(key, group):
    assert group_of(key) == group


def test_under_half_matched_is_refused():
    shapes = canonical_shapes("sd1")
    lora = sample_lora("sd1", attention_only=True)
    noisy = lora.replace(layers={**lora.layers, **fake_layers(len(lora) + 1)})
    with pytest.raises(
        LoraValueError,
        match=rf"only {len(lora)} of {len(noisy)} LoRA layers match the model \(49\.8%, at least 50% needed\)",
    ) as err:
        check_coverage(noisy, shapes, model_family="sd1")
    assert "different model" in err.value.hint
    assert check_coverage(noisy, shapes, model_family="sd1", min_fraction=0.4).fraction < 0.5


def test_wrong_family_hint_uses_the_lora_family_or_its_keys():
    sdxl = sample_lora("sdxl", attention_only=True)
    for lora in (sdxl, sdxl.replace(family=None)):
        with pytest.raises(LoraValueError, match=r"looks like an SDXL LoRA, the model is SD1\.x"):
            check_coverage(lora, canonical_shapes("sd1"), model_family="sd1")
    with pytest.raises(LoraValueError, match=r"looks like an SD1\.x LoRA, the model is SDXL"):
        check_coverage(sample_lora("sd1"), canonical_shapes("sdxl"), model_family="sdxl")


def test_any_shape_mismatch_is_refused_even_when_most_match():
    shapes = dict(canonical_shapes("sd1"))
    lora = sample_lora("sd1", attention_only=True)
    key = "te1.text_model.encoder.layers.0.self_attn.k_proj"
    shapes[key] = (48, 48)  # the same layout, another width (SD2 vs SD1-style)
    with pytest.raises(LoraValueError, match="1 LoRA layers have the wrong shape") as err:
        check_coverage(lora, shapes, model_family="sd1")
    assert "widths do not" in err.value.hint


def test_parts_and_non_canonical_keys_hints():
    te2_only = L.LoRA(fake_layers(4, "te2.text_model.encoder.layers"), family=None)
    with pytest.raises(LoraValueError, match="patches te2, the model has te1, unet"):
        check_coverage(te2_only, canonical_shapes("sd1"), model_family="sd1")
    raw = L.LoRA(fake_layers(4, "lora_unet_down_blocks"), family=None)
    with pytest.raises(LoraValueError, match="not canonical"):
        check_coverage(raw, canonical_shapes("sd1"), model_family="sd1")
    with pytest.raises(LoraValueError, match="no layers"):
        check_coverage(L.LoRA({}), canonical_shapes("sd1"), model_family="sd1")


def test_delta_shape_without_forming_delta():
    g = torch.Generator().manual_seed(0)
    layers = [
        L.LoRALayer(down=torch.randn(4, 16, generator=g), up=torch.randn(8, 4, generator=g)),
        L.LoRALayer(down=torch.randn(4, 16, 3, 3, generator=g), up=torch.randn(8, 4, 1, 1, generator=g)),
        L.LoRALayer(
            down=torch.randn(4, 16, 1, 1, generator=g),
            up=torch.randn(8, 4, 1, 1, generator=g),
            mid=torch.randn(4, 4, 3, 3, generator=g),
        ),
        L.LycorisLayer(
            "loha",
            {
                n: torch.randn(*s, generator=g)
                for n, s in [
                    ("hada_w1_a", (8, 2)),
                    ("hada_w1_b", (2, 144)),
                    ("hada_w2_a", (8, 2)),
                    ("hada_w2_b", (2, 144)),
                ]
            },
        ),
        L.LycorisLayer(
            "lokr", {"lokr_w1": torch.randn(2, 4, generator=g), "lokr_w2": torch.randn(4, 4, 3, 3, generator=g)}
        ),
        L.LycorisLayer("lokr", {"lokr_w1": torch.randn(2, 4, generator=g), "lokr_t2": torch.randn(2, 2, 3, 3),
                                "lokr_w2_a": torch.randn(2, 4), "lokr_w2_b": torch.randn(2, 4)}),
        L.LycorisLayer("loha", {"hada_t1": torch.randn(2, 2, 3, 3), "hada_w1_a": torch.randn(2, 8),
                                "hada_w1_b": torch.randn(2, 16), "hada_t2": torch.randn(2, 2, 3, 3),
                                "hada_w2_a": torch.randn(2, 8), "hada_w2_b": torch.randn(2, 16)}),
    ]
    for layer in layers:
        assert layer.delta_shape == tuple(layer.delta().shape)


def test_flat_delta_on_a_conv_counts_as_matching():
    assert shapes_fit((8, 144), (8, 16, 3, 3))  # LoHa/LoKr with flat factors on a 3×3 conv
    assert shapes_fit((8, 16), (8, 16, 1, 1))  # linear LoRA on a 1×1 conv
    assert not shapes_fit((8, 143), (8, 16, 3, 3))
    assert not shapes_fit((16, 72), (8, 16, 3, 3))  # same numel, other outputs
    assert not shapes_fit((8, 16, 1, 1), (8, 4, 2, 2))  # two 4-D shapes must be equal
    g = torch.Generator().manual_seed(0)
    loha = L.LycorisLayer(
        "loha",
        {
            "hada_w1_a": torch.randn(8, 2, generator=g),
            "hada_w1_b": torch.randn(2, 144, generator=g),
            "hada_w2_a": torch.randn(8, 2, generator=g),
            "hada_w2_b": torch.randn(2, 144, generator=g),
        },
    )
    report = check_coverage(L.LoRA({"unet.conv": loha}), {"unet.conv": (8, 16, 3, 3)}, model_family=None)
    assert report.matched == ("unet.conv",)


def test_combined_report_keeps_each_lora():
    shapes = canonical_shapes("sd1")
    a = sample_lora("sd1", attention_only=True)
    b = a.replace(layers={**a.layers, **fake_layers(5)})
    reports = [check_coverage(x, shapes, model_family="sd1") for x in (a, b)]
    both = combine_reports(reports)
    assert isinstance(both, CoverageReport) and both.items == tuple(reports)
    assert both.total == len(a) + len(b) and both.unmatched_count == 5
    assert both.fraction == pytest.approx(2 * len(a) / (2 * len(a) + 5))
    assert both.summary().startswith("LoRA 1: ") and " LoRA 2: " in both.summary()


def test_check_items_validates_everything_first():
    shapes = canonical_shapes("sd1")
    lora = sample_lora("sd1", attention_only=True)
    with pytest.raises(LoraValueError, match="no LoRA"):
        check_items([], shapes, family="sd1")
    with pytest.raises(LoraValueError, match="finite"):
        check_items([(lora, float("nan"), 1.0)], shapes, family="sd1")
    with pytest.raises(LoraValueError, match="not \\(LoRA"):
        check_items([(lora, 1.0)], shapes, family="sd1")
    assert len(check_items([(lora, 1.0, 0.0), (lora, 0.5, 0.5)], shapes, family="sd1")) == 2


def test_family_mismatch_that_still_fits_is_logged(caplog):
    te_only = L.filter_layers(sample_lora("sd1", attention_only=True), "te1.").replace(family="sdxl")
    with caplog.at_level(logging.WARNING, logger="lora_ops"):
        report = check_coverage(te_only, canonical_shapes("sd1"), model_family="sd1")
    assert report.fraction == 1.0
    assert any("looks like an SDXL LoRA, the model is SD1.x" in r.getMessage() for r in caplog.records)
    assert "SDXL LoRA on an SD1.x model" in report.summary()
    unknown = CoverageReport(matched=("a",), unmatched={}, mismatched={}, fraction=1.0)
    assert "unknown-family LoRA on an unknown-family model" in unknown.summary()
