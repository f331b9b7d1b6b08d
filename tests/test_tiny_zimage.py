"""Tiny Z-Image transformer: builds and runs, deterministic weights, ComfyUI names checked against diffusers' converter.

(tests/conftest.py already sets one torch thread.) The ComfyUI side (its own model, its ``z_image_to_diffusers``
key map) is checked in tests/comfyui/test_zimage_comfy.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("diffusers")

from lora_ops import families  # noqa: E402
from lora_ops.families import zimage  # noqa: E402
from lora_ops.testing.tiny_zimage import (  # noqa: E402
    TINY_ZIMAGE_CONFIG,
    comfy_to_diffusers,
    comfy_unet_config,
    diffusers_to_comfy,
    tiny_zimage_comfy_state_dict,
    tiny_zimage_forward,
    tiny_zimage_transformer,
)

ZI = families.get("zimage")
BLOCKS = ("layers", "noise_refiner", "context_refiner")


@functools.cache
def model(seed: int = 0):
    return tiny_zimage_transformer(seed)


def diffusers_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    return model(seed).state_dict()


def diffusers_convert(comfy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own single-file converter (``ZImageTransformer2DModel.from_single_file``) on a copy (it pops).

    It reads nothing from a config: it renames and splits ``attention.qkv`` with ``torch.chunk(qkv, 3)``, so it works
    at any width as long as q, k and v are equally wide (Z-Image has as many KV heads as heads).
    """
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers as convert

    return convert(dict(comfy))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:5]
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]


def declared_modules(cfg=TINY_ZIMAGE_CONFIG) -> set[str]:
    """zimage.py's original (ComfyUI-internal) module templates, expanded for a config's block counts."""
    counts = {"layers": cfg["n_layers"], "noise_refiner": cfg["n_refiner_layers"],
              "context_refiner": cfg["n_refiner_layers"]}
    out = set()
    for template in zimage.ORIGINAL:
        block = template.split(".", 1)[0]
        out |= {template.format(i=i) for i in range(counts[block])} if "{i}" in template else {template}
    return out


# (a) the model


def test_config_is_the_familys_and_consistent():
    cfg = TINY_ZIMAGE_CONFIG
    assert cfg == dict(ZI.tiny_config)
    assert sum(cfg["axes_dims"]) == cfg["dim"] // cfg["n_heads"]  # RoPE axes fill one head
    assert cfg["all_patch_size"] == (2,) and cfg["all_f_patch_size"] == (1,)  # the one size ComfyUI has


def test_builds_and_runs():
    m = model()
    assert not m.training
    assert sum(p.numel() for p in m.parameters()) < 400_000  # the t_embedder's fixed 1024-wide MLP is most of it
    out = tiny_zimage_forward(m)
    assert out.shape == (1, m.config.in_channels, 1, 8, 8)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert torch.equal(out, tiny_zimage_forward(m))
    assert not torch.equal(out, tiny_zimage_forward(m, seed=1))


def test_weights_deterministic_nonzero_and_seeded():
    a, again, b = diffusers_sd(0), tiny_zimage_transformer(0).state_dict(), tiny_zimage_transformer(1).state_dict()
    assert_same(a, again)
    assert sorted(a) == sorted(b)
    assert all(not torch.equal(a[k], b[k]) for k in a)  # every tensor depends on the seed
    assert all(t.count_nonzero() == t.numel() for t in a.values())  # biases and pad tokens too: nothing zero
    scales = [k for k in a if a[k].ndim == 1 and ("norm" in k or k == "cap_embedder.0.weight") and "bias" not in k]
    assert len(scales) > 20 and all(a[k].sub(1).abs().max() < 0.2 for k in scales)  # RMS-norm scales near 1
    assert not torch.equal(tiny_zimage_forward(model(0)), tiny_zimage_forward(tiny_zimage_transformer(1)))


def test_global_rng_untouched_and_dtype():
    state = torch.random.get_rng_state()
    half = tiny_zimage_transformer(0, dtype=torch.bfloat16).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    full = diffusers_sd(0)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, full[k].to(torch.bfloat16)) for k, t in half.items())


# (b) ComfyUI names: diffusers' converter inverts diffusers_to_comfy exactly


def test_round_trip_through_diffusers_converter_is_exact():
    sd = diffusers_sd(0)
    comfy = diffusers_to_comfy(sd)
    assert_same(diffusers_convert(comfy), sd)
    assert_same(diffusers_convert({"model.diffusion_model." + k: v for k, v in comfy.items()}), sd)  # it strips it


def test_comfy_to_diffusers_inverts_exactly():
    sd = diffusers_sd(0)
    assert_same(comfy_to_diffusers(diffusers_to_comfy(sd)), sd)
    other = tiny_zimage_transformer(2, {"n_layers": 1, "n_refiner_layers": 2})  # block counts from the keys
    osd = other.state_dict()
    comfy = diffusers_to_comfy(osd)
    assert {k.split(".")[1] for k in comfy if k.startswith("noise_refiner.")} == {"0", "1"}
    assert_same(comfy_to_diffusers(comfy), osd)
    assert_same(diffusers_convert(comfy), osd)


def test_comfy_names_fused_shapes_and_contents():
    sd = diffusers_sd(0)
    comfy = diffusers_to_comfy(sd)
    d = TINY_ZIMAGE_CONFIG["dim"]
    for block, n in (("layers", 2), ("noise_refiner", 1), ("context_refiner", 1)):
        for i in range(n):
            b = f"{block}.{i}."
            qkv = comfy[b + "attention.qkv.weight"]
            assert qkv.shape == (3 * d, d)
            for rows, p in zip(qkv.split(d), "qkv"):
                assert torch.equal(rows, sd[f"{b}attention.to_{p}.weight"])
            assert comfy[b + "attention.out.weight"] is sd[b + "attention.to_out.0.weight"]  # renamed, not copied
            assert comfy[b + "attention.q_norm.weight"] is sd[b + "attention.norm_q.weight"]
            assert comfy[b + "attention.k_norm.weight"] is sd[b + "attention.norm_k.weight"]
            assert (b + "adaLN_modulation.0.weight" in comfy) == (block != "context_refiner")
    assert comfy["x_embedder.weight"] is sd["all_x_embedder.2-1.weight"]
    assert comfy["final_layer.adaLN_modulation.1.bias"] is sd["all_final_layer.2-1.adaLN_modulation.1.bias"]
    for same in ("x_pad_token", "cap_pad_token", "cap_embedder.0.weight", "t_embedder.mlp.2.weight",
                 "layers.1.feed_forward.w2.weight", "noise_refiner.0.ffn_norm2.weight"):
        assert comfy[same] is sd[same]
    assert not [k for k in comfy if ".to_" in k or "norm_q" in k or k.startswith("all_")]
    assert sum(t.numel() for t in comfy.values()) == sum(t.numel() for t in sd.values())
    assert len(comfy) == len(sd) - 2 * (2 + 1 + 1)  # 3 projections → 1 per block (no biases on q, k, v)


# (c) the family's names are the real models'


def test_every_diffusers_linear_is_a_canonical_module_or_part_and_back():
    linears = {n for n, mod in model().named_modules() if isinstance(mod, torch.nn.Linear)}
    seen = set()
    for name in linears:
        path, part = ZI.denoiser_path(name)
        assert ZI.to_diffusers(path, part) == name
        seen.add(path)
    assert seen == declared_modules()  # the tiny model has every declared module, and nothing else


def test_comfy_named_2d_weights_are_exactly_the_declared_modules():
    comfy = tiny_zimage_comfy_state_dict(0)
    weights = {k.removesuffix(".weight") for k, t in comfy.items() if k.endswith(".weight") and t.ndim == 2}
    assert weights == declared_modules()
    assert all(ZI.knows(w) for w in weights)
    assert {w for w in weights if ZI.fused_weight(w)} == {w for w in weights if w.endswith('.attention.qkv')}
    assert families.detect(weights) == "zimage"


def test_comfy_unet_config_matches_the_diffusers_config():
    uc = comfy_unet_config()
    cfg = TINY_ZIMAGE_CONFIG
    assert uc["image_model"] == "lumina2" and uc["z_image_modulation"] is True
    assert (uc["dim"], uc["n_layers"], uc["n_refiner_layers"], uc["n_heads"]) == (
        cfg["dim"], cfg["n_layers"], cfg["n_refiner_layers"], cfg["n_heads"])
    ffn = int(uc["ffn_dim_multiplier"] * uc["dim"])  # ComfyUI's SwiGLU width (multiple_of 1)
    assert ffn == model().layers[0].feed_forward.w1.out_features
    with pytest.raises(ValueError, match="patch size 2-1"):
        comfy_unet_config({"all_patch_size": (1,)})


# (d) keys that do not convert


def test_split_sizes_come_from_the_tensors():
    comfy = dict(tiny_zimage_comfy_state_dict(0))
    d = TINY_ZIMAGE_CONFIG["dim"]
    comfy["layers.0.attention.qkv.weight"] = torch.randn(d + 2 * 8, d)  # grouped-query: k and v narrower than q
    out = comfy_to_diffusers(comfy)
    assert [out[f"layers.0.attention.to_{p}.weight"].shape[0] for p in "qkv"] == [d, 8, 8]
    comfy["layers.0.attention.qkv.weight"] = torch.randn(d + 3, d)
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.qkv\.weight \(35 rows"):
        comfy_to_diffusers(comfy)


def test_missing_and_foreign_diffusers_keys_raise():
    sd = dict(diffusers_sd(0))
    del sd["noise_refiner.0.attention.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['noise_refiner\.0\.attention\.to_k\.weight'\]"):
        diffusers_to_comfy(sd)
    sd = dict(diffusers_sd(0))
    sd["all_x_embedder.1-1.weight"] = torch.zeros(1)  # a patch size ComfyUI's NextDiT does not have
    sd["layers.0.attention.qkv.weight"] = torch.zeros(1)  # ComfyUI's name in a diffusers dict
    with pytest.raises(ValueError, match=r"not converted: \['all_x_embedder\.1-1\.weight', 'layers\.0\.attention"):
        diffusers_to_comfy(sd)
    with pytest.raises(ValueError, match="missing keys"):  # ComfyUI names are not diffusers names
        diffusers_to_comfy(tiny_zimage_comfy_state_dict(0))


def test_missing_and_foreign_comfy_keys_raise():
    comfy = {"diffusion_model." + k: t for k, t in tiny_zimage_comfy_state_dict(0).items()}
    with pytest.raises(ValueError, match="missing keys"):  # the prefix is the caller's to strip
        comfy_to_diffusers(comfy)
    comfy = dict(tiny_zimage_comfy_state_dict(0))
    del comfy["layers.1.attention.out.weight"]
    with pytest.raises(ValueError, match=r"missing keys: \['layers\.1\.attention\.out\.weight'\]"):
        comfy_to_diffusers(comfy)
    with pytest.raises(ValueError, match="not converted"):
        comfy_to_diffusers({**tiny_zimage_comfy_state_dict(0), **{"layers.0.attention.to_q.weight": torch.zeros(1)}})
