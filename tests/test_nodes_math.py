"""Resize / Combine / Extract nodes (no ComfyUI needed): thin wrappers that keep the library's promises."""

import importlib

import pytest
import torch
from helpers import canonical_shapes, import_pack

pack = import_pack()
nodes = pack.nodes
L = pack.lora_ops.lora
fixtures = importlib.import_module(pack.__name__ + ".lora_ops.testing.fixtures")
tiny = importlib.import_module(pack.__name__ + ".lora_ops.testing.tiny")
StackEntry = nodes.types.StackEntry


def pack_lora(seed=0, rank=8):
    return fixtures.random_lora(canonical_shapes("sd1", attention_only=True), rank=rank, family="sd1", seed=seed)


def test_resize_node_returns_lora_report_and_image():
    lora, text, image = nodes.LoraOpsResize().resize(pack_lora(), "rank", 4.0, 0)
    assert set(L.ranks(lora).values()) == {4}
    assert "rank 8 → 4" in text
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3 and 0 <= float(image.min())
    with pytest.raises(pack.lora_ops.errors.LoraValueError):
        nodes.LoraOpsResize().resize(pack_lora(), "sv_fro", 1.5, 0)


@pytest.mark.parametrize("method", ["concat", "svd", "linear", "ties", "dare_linear"])
def test_combine_node_every_method(method):
    a, b = pack_lora(1, rank=4), pack_lora(2, rank=4)
    stack = (StackEntry(a, "a", 0.7, 0.7), StackEntry(b, "b", 0.5, 0.5))
    lora, text = nodes.LoraOpsCombine().combine(stack, method, "rank", 8.0, 0, 0.5, 0)
    assert set(lora.layers) == set(a.layers) and text
    if method in ("concat", "svd", "linear"):  # exact at rank 8 = 4 + 4
        key = sorted(a.layers)[0]
        torch.testing.assert_close(L.delta(lora[key]), 0.7 * L.delta(a[key]) + 0.5 * L.delta(b[key]),
                                   rtol=0, atol=1e-5)
    with pytest.raises(pack.lora_ops.errors.LoraValueError, match="empty"):
        nodes.LoraOpsCombine().combine((), method, "rank", 8.0)


def test_extract_node_recovers_an_applied_lora():
    lora = fixtures.random_lora({k: s for k, s in canonical_shapes("sd1", attention_only=True).items()
                                 if k.startswith("unet.")}, rank=4, family="sd1", seed=3)
    base = nodes.diffusers_model.DiffusersModel(tiny.tiny_sd1_pipeline())
    tuned, _, _ = nodes.LoraOpsApply().apply(base, lora, 1.0, 1.0)
    out, text = nodes.LoraOpsExtract().extract(base, tuned, "rank", 4.0, 0)
    assert set(out.layers) == set(lora.layers)
    worst = max(float((L.delta(out[k]) - L.delta(v)).norm() / L.delta(v).norm()) for k, v in lora.layers.items())
    assert worst < 1e-3, worst  # fp32 weights: W + ΔW − W loses ~7 digits relative to W
