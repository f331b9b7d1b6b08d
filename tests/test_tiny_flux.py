"""Tiny FLUX.1 transformer: builds and runs, deterministic weights, and BFL names checked against diffusers' converter.

(tests/conftest.py already sets one torch thread.)
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("diffusers")

from lora_ops.testing.tiny_flux import (  # noqa: E402
    TINY_FLUX_CONFIG,
    bfl_to_diffusers,
    diffusers_to_bfl,
    save_bfl_checkpoint,
    tiny_flux_bfl_state_dict,
    tiny_flux_forward,
    tiny_flux_transformer,
)

# diffusers' own BFL → diffusers converter, as used by FluxTransformer2DModel.from_single_file
REAL_INNER_DIM = 3072  # FLUX.1's width, which that converter assumes when it splits single_blocks.N.linear1


@functools.cache
def model(seed: int = 0):
    return tiny_flux_transformer(seed)


def diffusers_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    return model(seed).state_dict()


def hidden_of(m) -> int:
    return m.config.num_attention_heads * m.config.attention_head_dim




def diffusers_convert(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``convert_flux_transformer_checkpoint_to_diffusers`` on a BFL dict (it pops from its argument: a copy goes in).

    That converter (diffusers 0.42.1) hard-codes ``inner_dim = 3072`` and ``mlp_ratio = 4`` to split each
    ``single_blocks.N.linear1`` into q, k, v and proj_mlp; everything else it reads from the keys or splits in
    equal thirds. On a narrower model that split fails, so linear1 goes in padded: each part placed at the row
    offset the converter expects (0, 3072, 6144, 9216; zeros elsewhere), and the 4 parts it returns are cut back
    to their true rows. Everything else passes through the converter untouched.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    try:
        return convert(dict(bfl))
    except RuntimeError as e:
        if "split" not in str(e):
            raise
    hidden = next(t for k, t in bfl.items() if k.endswith("img_in.weight")).shape[0]  # keys may be prefixed
    padded, true_rows = dict(bfl), {}
    for key, t in bfl.items():
        if ".linear1." not in key:
            continue
        block = key.split(".")[-3]
        mlp = t.shape[0] - 3 * hidden
        big = torch.zeros((3 * REAL_INNER_DIM + 4 * REAL_INNER_DIM, *t.shape[1:]), dtype=t.dtype)
        for j, (start, rows) in enumerate([(0, hidden), (hidden, hidden), (2 * hidden, hidden), (3 * hidden, mlp)]):
            big[j * REAL_INNER_DIM : j * REAL_INNER_DIM + rows] = t[start : start + rows]
        padded[key] = big
        param = key.rsplit(".", 1)[1]
        for part, rows in [("attn.to_q", hidden), ("attn.to_k", hidden), ("attn.to_v", hidden), ("proj_mlp", mlp)]:
            true_rows[f"single_transformer_blocks.{block}.{part}.{param}"] = rows
    out = convert(padded)
    for key, rows in true_rows.items():
        assert not out[key][rows:].any(), f"{key}: rows beyond {rows} should be the zero padding"
        out[key] = out[key][:rows]
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal


# (a) the model


def test_config_is_detectable_as_flux():
    cfg = TINY_FLUX_CONFIG
    assert sum(cfg["axes_dims_rope"]) == cfg["attention_head_dim"]
    assert hidden_of(model()) % 128 == 0  # ComfyUI: num_heads = hidden // sum(axes_dim) = hidden // 128
    assert cfg["in_channels"] == 16 * 2 * 2  # FLUX.1 latents: 16 channels, packed 2×2 into each token


def test_builds_and_runs():
    m = model()
    assert not m.training
    assert sum(p.numel() for p in m.parameters()) < 3_000_000
    out = tiny_flux_forward(m)
    assert out.shape == (1, 16, m.config.in_channels)
    assert torch.isfinite(out).all()
    assert torch.equal(out, tiny_flux_forward(m))


def test_weights_deterministic_nonzero_and_seeded():
    a, again, b = diffusers_sd(0), tiny_flux_transformer(0).state_dict(), tiny_flux_transformer(1).state_dict()
    assert_same(a, again)
    assert sorted(a) == sorted(b)
    assert all(not torch.equal(a[k], b[k]) for k in a)  # every tensor depends on the seed
    assert all(t.count_nonzero() == t.numel() for t in a.values())  # biases and norms too: nothing zero
    norm_scales = [k for k in a if ".norm_" in k and k.endswith(".weight") and a[k].ndim == 1]
    assert norm_scales and all(a[k].sub(1).abs().max() < 0.2 for k in norm_scales)  # RMS-norm scales near 1
    assert not torch.equal(tiny_flux_forward(model(0)), tiny_flux_forward(tiny_flux_transformer(1)))


def test_global_rng_untouched_and_dtype():
    state = torch.random.get_rng_state()
    half = tiny_flux_transformer(0, dtype=torch.bfloat16).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    full = diffusers_sd(0)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, full[k].to(torch.bfloat16)) for k, t in half.items())


# (b) diffusers' converter inverts diffusers_to_bfl exactly


def test_round_trip_through_diffusers_converter_is_exact():
    sd = diffusers_sd(0)
    bfl = diffusers_to_bfl(sd)
    assert_same(diffusers_convert(bfl), sd)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_saved_checkpoint_round_trips_through_diffusers_converter(tmp_path, prefix):
    from safetensors.torch import load_file

    sd = diffusers_sd(0)
    path = tmp_path / "flux1-tiny.safetensors"
    save_bfl_checkpoint(path, tiny_flux_bfl_state_dict(0), prefix=prefix)
    loaded = load_file(path)
    assert all(k.startswith(prefix) for k in loaded)
    assert sorted(loaded) == sorted(prefix + k for k in diffusers_to_bfl(sd))
    assert_same(diffusers_convert(loaded), sd)  # the converter strips "model.diffusion_model." itself
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp left behind


def test_schnell_like_model_without_guidance():
    m = tiny_flux_transformer(0, {"guidance_embeds": False, "num_layers": 1, "num_single_layers": 3})
    sd = m.state_dict()
    bfl = diffusers_to_bfl(sd)
    assert not any(k.startswith("guidance_in.") for k in bfl)
    assert {k.split(".")[1] for k in bfl if k.startswith("double_blocks.")} == {"0"}
    assert {k.split(".")[1] for k in bfl if k.startswith("single_blocks.")} == {"0", "1", "2"}
    assert_same(diffusers_convert(bfl), sd)
    assert_same(bfl_to_diffusers(bfl), sd)
    assert torch.isfinite(tiny_flux_forward(m)).all()


def test_bfl_to_diffusers_inverts_exactly():
    sd = diffusers_sd(0)
    assert_same(bfl_to_diffusers(diffusers_to_bfl(sd)), sd)


# (c) fused shapes and the final-layer swap


def test_bfl_fused_shapes_and_contents():
    m = model()
    sd, bfl = diffusers_sd(0), tiny_flux_bfl_state_dict(0)
    hidden = hidden_of(m)
    mlp_hidden = m.single_transformer_blocks[0].proj_mlp.out_features
    assert mlp_hidden == m.transformer_blocks[0].ff.net[0].proj.out_features == 4 * hidden
    n_double, n_single = m.config.num_layers, m.config.num_single_layers
    for i in range(n_double):
        for stream, parts in [("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))]:
            w, b = bfl[f"double_blocks.{i}.{stream}_attn.qkv.weight"], bfl[f"double_blocks.{i}.{stream}_attn.qkv.bias"]
            assert w.shape == (3 * hidden, hidden) and b.shape == (3 * hidden,)
            for rows, part in zip(w.split(hidden), parts):
                assert torch.equal(rows, sd[f"transformer_blocks.{i}.attn.{part}.weight"])
    for i in range(n_single):
        w, b = bfl[f"single_blocks.{i}.linear1.weight"], bfl[f"single_blocks.{i}.linear1.bias"]
        assert w.shape == (3 * hidden + mlp_hidden, hidden) and b.shape == (3 * hidden + mlp_hidden,)
        parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        for rows, part in zip(b.split([hidden, hidden, hidden, mlp_hidden]), parts):
            assert torch.equal(rows, sd[f"single_transformer_blocks.{i}.{part}.bias"])
        assert bfl[f"single_blocks.{i}.linear2.weight"].shape == (hidden, hidden + mlp_hidden)
    # every diffusers tensor is in exactly one BFL tensor: same number of values, fewer keys (fusing)
    assert sum(t.numel() for t in bfl.values()) == sum(t.numel() for t in sd.values())
    # keys: 20 global, 24 per double block (8 renamed modules, 4 norm scales, 2 fused qkv; weight + bias each),
    # 8 per single block (linear1, linear2, modulation.lin, 2 norm scales); FLUX.1-dev: 20 + 19·24 + 38·8 = 780
    per_double, per_single = 8 * 2 + 4 + 2 * 2, 3 * 2 + 2
    assert len(bfl) == 20 + n_double * per_double + n_single * per_single
    assert len([k for k in bfl if k.startswith("double_blocks.0.")]) == per_double


def test_final_layer_modulation_halves_are_swapped():
    sd, bfl = diffusers_sd(0), tiny_flux_bfl_state_dict(0)
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)  # diffusers: (scale, shift)
        bfl_shift, bfl_scale = bfl[f"final_layer.adaLN_modulation.1.{p}"].chunk(2)  # BFL: (shift, scale)
        assert torch.equal(bfl_shift, shift) and torch.equal(bfl_scale, scale)
        assert not torch.equal(bfl_shift, scale)
    assert torch.equal(bfl["final_layer.linear.weight"], sd["proj_out.weight"])


# (d) keys that do not convert


def test_leftover_diffusers_keys_raise():
    sd = dict(diffusers_sd(0))
    sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(1)
    sd["pos_embed.foo"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"pos_embed\.foo.*transformer_blocks\.0\.attn\.extra\.weight"):
        diffusers_to_bfl(sd)


def test_missing_and_prefixed_keys_raise():
    sd = dict(diffusers_sd(0))
    del sd["single_transformer_blocks.1.proj_mlp.bias"]
    with pytest.raises(ValueError, match=r"missing keys: \['single_transformer_blocks\.1\.proj_mlp\.bias'\]"):
        diffusers_to_bfl(sd)
    with pytest.raises(ValueError, match="missing key"):  # BFL names are not diffusers names
        diffusers_to_bfl(tiny_flux_bfl_state_dict(0))
    bfl = {"model.diffusion_model." + k: t for k, t in tiny_flux_bfl_state_dict(0).items()}
    with pytest.raises(ValueError, match="missing key"):
        bfl_to_diffusers(bfl)


def test_leftover_bfl_keys_raise():
    bfl = tiny_flux_bfl_state_dict(0)
    bfl["double_blocks.0.img_attn.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"not converted.*double_blocks\.0\.img_attn\.lora_up\.weight"):
        bfl_to_diffusers(bfl)
