"""DiffusersHost on the tiny FLUX.1 transformer (diffusers' FluxTransformer2DModel, split q/k/v and proj_mlp).

A LoRA keyed by the fused BFL weights (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``) is brought
into the model's layout before it is applied, so each diffusers module (``to_q`` … ``proj_mlp``) gets exactly its
rows of ΔW; the reference here is independent of that math: the full ΔW of every BFL weight, renamed and split
into diffusers modules by `lora_ops.testing.tiny_flux.bfl_to_diffusers` (the state-dict converter that is checked
against diffusers' own single-file converter in test_tiny_flux.py), swapped final-modulation halves included.
"""

import functools
import logging
from types import SimpleNamespace

import pytest
import torch

from lora_ops import fused
from lora_ops import lora as L
from lora_ops.errors import LoraFormatError, LoraValueError
from lora_ops.files import load_lora, save_lora
from lora_ops.hosts import DiffusersHost, LoraHost
from lora_ops.keymap.model_keys import denoiser_canonical_keys, te_canonical_keys
from lora_ops.testing import tiny
from lora_ops.testing.tiny_flux import (
    bfl_to_diffusers,
    tiny_flux_bfl_state_dict,
    tiny_flux_forward,
    tiny_flux_transformer,
)

TOL = 1e-5  # forward outputs (fp32)
REL = 1e-6  # ΔW against the full-matrix reference, relative to its largest entry


@functools.cache
def bfl_weights() -> dict[str, torch.Tensor]:
    return tiny_flux_bfl_state_dict()


def bfl_shapes() -> dict[str, tuple[int, int]]:
    """BFL module path → (out, in) of every 2-D weight of the tiny transformer."""
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in bfl_weights().items()
            if k.endswith(".weight") and v.ndim == 2}


def flux_lora(seed: int = 0, modules=None) -> L.LoRA:
    """A random LoRA on every (or the given) BFL weight, with ranks 2–4 and alphas that differ per layer."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (path, (out, inp)) in enumerate(sorted(bfl_shapes().items())):
        if modules is not None and path not in modules:
            continue
        rank = 2 + i % 3
        layers[f"unet.{path}"] = L.LoRALayer(torch.randn(rank, inp, generator=g) * 0.2,
                                             torch.randn(out, rank, generator=g) * 0.2, alpha=1.0 + i % 4)
    return L.LoRA(layers, family="flux1")


def reference_deltas(lora: L.LoRA) -> dict[str, torch.Tensor]:
    """diffusers module path → ΔW (float64): full BFL ΔWs (zero where the LoRA has none) through bfl_to_diffusers."""
    sd = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in bfl_weights().items()}
    for key, layer in lora.layers.items():
        assert "[" not in key  # whole BFL weights only: the reference does its own splitting
        sd[key.removeprefix("unet.") + ".weight"] = layer.delta(torch.float64)
    return {k.removesuffix(".weight"): v for k, v in bfl_to_diffusers(sd).items()
            if k.endswith(".weight") and v.ndim == 2}




def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in model.modules())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() / max(want.abs().max().item(), 1e-30)


def moved(model, before, strength):
    """diffusers module path → (W_merged − W) / strength for every 2-D weight."""
    return {k.removesuffix(".weight"): (v.double() - before[k].double()) / strength
            for k, v in model.state_dict().items() if k.endswith(".weight") and v.ndim == 2}


def assert_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = REL) -> float:
    assert set(got) == set(want)
    worst = 0.0
    for k in want:
        if want[k].abs().max() == 0:
            assert got[k].abs().max() == 0, k
            continue
        err = rel_err(got[k], want[k])
        assert err <= tol, (k, err)
        worst = max(worst, err)
    return worst


# ------------------------------------------------------------------ keys and targets


def test_canonical_keys_of_the_live_transformer():
    model = tiny_flux_transformer()
    keys = denoiser_canonical_keys(model)
    assert keys == denoiser_canonical_keys(model, "flux1")  # detected from the module names
    assert keys["unet.double_blocks.0.img_attn.qkv[q]"] == "transformer_blocks.0.attn.to_q"
    assert keys["unet.double_blocks.1.txt_attn.qkv[v]"] == "transformer_blocks.1.attn.add_v_proj"
    assert keys["unet.single_blocks.0.linear1[mlp]"] == "single_transformer_blocks.0.proj_mlp"
    assert keys["unet.single_blocks.1.linear1[k]"] == "single_transformer_blocks.1.attn.to_k"
    assert keys["unet.img_in"] == "x_embedder"
    assert keys["unet.final_layer.adaLN_modulation.1"] == "norm_out.linear"
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(keys.values()) == sorted(linears)

    host = DiffusersHost(model)
    assert isinstance(host, LoraHost) and host.family == "flux1"
    assert {k.removeprefix("unet."): v for k, v in host.targets().items()} == bfl_shapes()  # whole fused weights
    assert host.module("unet.single_blocks.0.linear1[mlp]") is model.single_transformer_blocks[0].proj_mlp


def test_unknown_modules_and_families_are_refused():
    model = tiny_flux_transformer()
    with pytest.raises(LoraValueError, match=r"layout is 'flux1' \(FLUX\.1\)"):
        DiffusersHost(model, family="sdxl")
    with pytest.raises(LoraValueError, match="unknown model family 'flux9'"):
        DiffusersHost(model, family="flux9")
    model.transformer_blocks[0].attn.to_qkv = torch.nn.Linear(128, 384)  # as fuse_qkv_projections() adds
    with pytest.raises(LoraFormatError, match="not a module of the FLUX.1 model"):
        DiffusersHost(model)
    with pytest.raises(LoraValueError, match="cannot tell the model family"):
        denoiser_canonical_keys(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ------------------------------------------------------------------ apply / merge / unmerge


def test_apply_merge_unmerge_on_split_modules():
    lora = flux_lora()
    model = tiny_flux_transformer()
    host = DiffusersHost(model)
    base_state, base = state(model), tiny_flux_forward(model)

    report = host.apply([(lora, 0.7, 1.0)])
    # every fused layer became its parts (q, k, v / q, k, v, mlp), each on one module
    assert report.fraction == 1.0 and len(report.matched) == len(lora) + 2 * 2 * 2 + 2 * 3
    assert "unet.single_blocks.0.linear1[mlp]" in report.matched
    assert same_state(state(model), base_state)  # applying touches no weight
    applied = tiny_flux_forward(model)
    assert (applied - base).abs().max().item() > 1e-2  # the LoRA does something

    host.merge()
    assert (tiny_flux_forward(model) - applied).abs().max().item() <= TOL  # merged = applied
    worst = assert_deltas(moved(model, base_state, 0.7), reference_deltas(lora))
    assert worst <= REL, worst
    host.unmerge()
    assert same_state(state(model), base_state)  # bit for bit
    assert torch.equal(tiny_flux_forward(model), applied)  # hooks active again
    host.remove()
    assert no_hooks(model) and torch.equal(tiny_flux_forward(model), base)


def test_kohya_and_diffusers_spellings_give_the_same_merged_weights(tmp_path):
    """The same ΔW spelled fused (kohya/ComfyUI files: ``…qkv``, ``…linear1``) and split (diffusers names:
    part layers ``…qkv[q]``, ``…linear1[mlp]``) merges to the same weights. (Our diffusers-format files, read back,
    are checked in test_interop_flux1.py, next to diffusers loading them.)"""
    lora = flux_lora(seed=1)
    split = fused.split(lora)
    assert "unet.single_blocks.0.linear1[mlp]" in split.layers and "unet.single_blocks.0.linear1" not in split.layers
    spelled = {fmt: load_lora(save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)) for fmt in ("kohya", "comfyui")}
    spelled["split"] = split
    # a split LoRA written fused (block-diagonal up, ranks added) and read back whole: the same ΔW once more
    spelled["split-then-kohya"] = load_lora(save_lora(split, tmp_path / "sk.safetensors", "kohya"))
    merged = {}
    for name, read in spelled.items():
        assert read.family == "flux1"
        assert any(k.endswith("]") for k in read.layers) == (name == "split"), name
        model = tiny_flux_transformer()
        before = state(model)
        host = DiffusersHost(model)
        assert host.apply([(read, 1.0, 1.0)]).fraction == 1.0
        host.merge()
        merged[name] = moved(model, before, 1.0)
        host.remove()
    want = reference_deltas(lora)
    for deltas in merged.values():
        assert_deltas(deltas, want)
        assert_deltas(deltas, merged["kohya"])


def test_lycoris_layers_on_fused_and_swapped_weights_patch_their_rows():
    """LoHa/LoKr cannot be split into part layers; the host places the rows of their ΔW on each part module."""
    g = torch.Generator().manual_seed(2)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    lora = flux_lora(seed=3, modules={"double_blocks.0.img_mlp.0", "single_blocks.1.linear2"})
    layers = dict(lora.layers)
    layers["unet.double_blocks.0.img_attn.qkv"] = L.LycorisLayer(  # ΔW (384, 128)
        "loha", {"hada_w1_a": rnd(384, 2), "hada_w1_b": rnd(2, 128), "hada_w2_a": rnd(384, 2),
                 "hada_w2_b": rnd(2, 128)}, alpha=1.0)
    layers["unet.single_blocks.0.linear1"] = L.LycorisLayer(  # ΔW (896, 128) = (7·128, 128)
        "lokr", {"lokr_w1": rnd(7, 4), "lokr_w2_a": rnd(128, 2), "lokr_w2_b": rnd(2, 32)}, alpha=2.0)
    layers["unet.final_layer.adaLN_modulation.1"] = L.LycorisLayer(  # ΔW (256, 128): LoKr has no halves of its own
        "lokr", {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(64, 2), "lokr_w2_b": rnd(2, 32)}, alpha=2.0)
    lora = lora.replace(layers=layers)

    model = tiny_flux_transformer()
    host = DiffusersHost(model)
    base_state, base = state(model), tiny_flux_forward(model)
    report = host.apply([(lora, 0.8, 1.0)])
    assert "unet.double_blocks.0.img_attn.qkv" in report.matched  # kept whole, placed by rows
    applied = tiny_flux_forward(model)
    assert (applied - base).abs().max().item() > 1e-2
    host.merge()
    assert (tiny_flux_forward(model) - applied).abs().max().item() <= TOL
    assert_deltas(moved(model, base_state, 0.8), reference_deltas(lora))
    host.unmerge()
    assert same_state(state(model), base_state)
    host.remove()
    assert no_hooks(model)


def test_bf16_merge_and_exact_unmerge():
    lora = flux_lora(seed=4)
    model = tiny_flux_transformer(dtype=torch.bfloat16)
    host = DiffusersHost(model)
    base_state = state(model)
    host.apply([(lora, 0.9, 1.0)])
    host.merge()
    want = reference_deltas(lora)
    for name, weight in model.state_dict().items():
        path = name.removesuffix(".weight")
        if path in want:
            expected = (base_state[name].double() + 0.9 * want[path]).to(torch.bfloat16).float()
            # fp32 add, cast back: equal but where fp32 and fp64 ΔW round to neighbouring bf16 values (1 ulp), or
            # where W + ΔW cancels to about the fp32 error of ΔW
            err = (weight.float() - expected).abs()
            slack = REL * want[path].abs().max().item()
            assert bool((err <= expected.abs() * 2**-7 + slack).all()), name
            assert (err == 0).float().mean().item() > 0.99, name
    host.unmerge()
    assert same_state(state(model), base_state)
    host.remove()


def test_flux_pipeline_text_encoders_are_te1_clip_and_te3_t5():
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    clip = tiny.tiny_text_encoder("clip-l")
    pipe = SimpleNamespace(transformer=tiny_flux_transformer(), text_encoder=clip, text_encoder_2=t5)
    host = DiffusersHost(pipe)
    assert host.family == "flux1"
    assert "te3.encoder.block.0.layer.0.SelfAttention.q" in host.targets()
    assert "te1.text_model.encoder.layers.0.self_attn.q_proj" in host.targets()
    assert set(te_canonical_keys(t5, "te3", "t5").values()) == {
        n for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(5)
    key = "te3.encoder.block.0.layer.0.SelfAttention.q"
    q = host.module(key)
    layers = dict(flux_lora(seed=5).layers)
    layers[key] = L.LoRALayer(torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), alpha=2.0)
    before = q.weight.detach().clone()
    host.apply([(L.LoRA(layers, family="flux1"), 1.0, 0.5)])
    host.merge()
    assert rel_err(q.weight - before, 0.5 * layers[key].delta()) <= REL
    host.remove()
    assert torch.equal(q.weight, before)


# ------------------------------------------------------------------ refusals


def test_wrong_family_is_one_error_naming_both():
    flux = flux_lora()
    pipe = tiny.tiny_sd1_pipeline()
    sd_host = DiffusersHost(pipe)
    with pytest.raises(LoraValueError, match=r"looks like a FLUX\.1 LoRA, the model is SD1\.x"):
        sd_host.apply([(flux, 1.0, 1.0)])
    with pytest.raises(LoraValueError, match=r"looks like a FLUX\.1 LoRA, the model is SD1\.x"):
        sd_host.apply([(flux.replace(family=None), 1.0, 1.0)])  # detected from its keys
    assert all(not m._forward_hooks_with_kwargs for m in pipe.unet.modules())

    from helpers import sample_lora

    model = tiny_flux_transformer()
    host = DiffusersHost(model)
    with pytest.raises(LoraValueError, match=r"looks like an SD1\.x LoRA, the model is FLUX\.1"):
        host.apply([(flux, 1.0, 1.0), (sample_lora("sd1", attention_only=True), 1.0, 1.0)])
    with pytest.raises(LoraValueError, match=r"looks like an SDXL LoRA, the model is FLUX\.1"):
        host.apply([(sample_lora("sdxl", attention_only=True).replace(family=None), 1.0, 1.0)])
    assert no_hooks(model)  # nothing was applied, not even the good first item


def test_partial_flux_lora_is_reported(caplog):
    lora = flux_lora(modules={"double_blocks.0.img_attn.qkv", "img_in", "single_blocks.0.linear1"})
    g = torch.Generator().manual_seed(6)
    extra = {"unet.double_blocks.5.img_attn.proj": L.LoRALayer(torch.randn(2, 128, generator=g),
                                                               torch.randn(128, 2, generator=g))}
    model = tiny_flux_transformer()
    host = DiffusersHost(model)
    with caplog.at_level(logging.WARNING, logger="lora_ops"):
        report = host.apply([(lora.replace(layers={**lora.layers, **extra}), 1.0, 1.0)])
    assert report.unmatched_keys == ("unet.double_blocks.5.img_attn.proj",)
    assert any("partial LoRA match" in r.getMessage() for r in caplog.records)
    host.remove()
