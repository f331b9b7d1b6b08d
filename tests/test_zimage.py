"""Z-Image LoRAs in every spelling of the wild: family detection, fused qkv parts, exact conversions."""

import pytest
import torch

from lora_ops import families, fused
from lora_ops import lora as L
from lora_ops.errors import LoraFormatError
from lora_ops.files import load_lora, save_lora
from lora_ops.formats import read_lora, write_lora
from lora_ops.formats.diffusers import diffusers_layers
from lora_ops.inspect import inspect_lora
from lora_ops.keymap import dotted_to_kohya

D = 16  # width of the synthetic LoRAs (Z-Image Turbo: 3840)
ZI = families.get("zimage")


def comfy_shapes(d: int = D, layers: int = 2) -> dict[str, tuple[int, int]]:
    """ComfyUI-internal Z-Image module → (out, in) at width ``d`` (SwiGLU hidden 8/3·d, rounded as the model)."""
    ffn = 8 * d // 3
    shapes = {}
    for block, n in (("layers", layers), ("noise_refiner", 1), ("context_refiner", 1)):
        for i in range(n):
            b = f"{block}.{i}."
            shapes.update({b + "attention.qkv": (3 * d, d), b + "attention.out": (d, d),
                           b + "feed_forward.w1": (ffn, d), b + "feed_forward.w2": (d, ffn),
                           b + "feed_forward.w3": (ffn, d)})
            if block != "context_refiner":
                shapes[b + "adaLN_modulation.0"] = (4 * d, min(d, 256))
    shapes.update({"x_embedder": (d, 16), "final_layer.linear": (16, d), "final_layer.adaLN_modulation.1": (d, d),
                   "cap_embedder.1": (d, 16), "t_embedder.mlp.0": (1024, 256), "t_embedder.mlp.2": (d, 1024)})
    return shapes


def zimage_lora(seed=0, rank=4, alpha=4.0) -> L.LoRA:
    g = torch.Generator().manual_seed(seed)
    return L.LoRA({f"unet.{p}": L.LoRALayer(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g),
                                            alpha) for p, (o, i) in comfy_shapes().items()}, family="zimage")


def fused_deltas(lora):
    return {k: v.delta(torch.float64) for k, v in fused.fuse(lora).layers.items()}


def assert_same_deltas(got, want, tol=1e-6):
    a, b = fused_deltas(got), fused_deltas(want)
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in b:
        assert (a[k] - b[k]).abs().max() <= tol * b[k].abs().max(), k


def test_every_module_has_one_diffusers_name_and_back():
    for path in comfy_shapes():
        spec = ZI.fused_weight(path)
        for part in [p.name for p in spec.parts] if spec else [None]:
            name = ZI.to_diffusers(path, part)
            assert ZI.denoiser_path(name) == (path, part)
    assert ZI.to_diffusers("layers.0.attention.qkv", "k") == "layers.0.attention.to_k"
    assert ZI.to_diffusers("x_embedder", None) == "all_x_embedder.2-1"
    assert not ZI.knows("context_refiner.0.adaLN_modulation.0")  # context refiners have no modulation


def _flat(prefix: str, split: L.LoRA, suffixes=(".lora_down.weight", ".lora_up.weight")) -> dict:
    out = {}
    for key, layer in split.layers.items():
        module, part = fused.parse_key(key)
        name = prefix + ZI.to_diffusers(module.removeprefix("unet."), part)
        if prefix.endswith("_"):
            name = prefix + dotted_to_kohya(name[len(prefix):])
        out[name + suffixes[0]] = layer.down
        out[name + suffixes[1]] = layer.up
    return out


def _spellings(lora: L.LoRA) -> dict[str, dict[str, torch.Tensor]]:
    split = diffusers_layers(lora)
    diffusers, _ = write_lora(lora, "diffusers")
    bare = {k.removeprefix("transformer."): v for k, v in diffusers.items()}
    return {
        "comfyui": write_lora(lora, "comfyui")[0],
        "kohya-fused (musubi's ComfyUI converter)": write_lora(lora, "kohya")[0],
        "musubi": _flat("lora_unet_", split),
        "ai-toolkit": {"diffusion_model." + k: v for k, v in bare.items()},
        "diffusers": diffusers,
        "diffsynth-bare": bare,
        "peft-default": {k.replace(".lora_A.weight", ".lora_A.default.weight")
                         .replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in bare.items()},
        "lycoris_": _flat("lycoris_", split),
    }


SPELLINGS = list(_spellings(zimage_lora()))


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_reads_as_zimage_with_the_same_fused_deltas(spelling):
    lora = zimage_lora()  # alpha = rank: spellings without alphas mean scale 1
    tensors = _spellings(lora)[spelling]
    got, unused = read_lora(tensors, file=f"{spelling}.safetensors")
    assert unused == [] and got.family == "zimage"
    assert_same_deltas(got, lora)
    report = inspect_lora(got)
    assert report["family"] == "zimage" and "layers.*.attention.qkv" in report["fused_weights"]


def test_the_four_writers_convert_exactly(tmp_path):
    lora = zimage_lora(alpha=3.0)
    for a in ("kohya", "comfyui", "diffusers", "peft"):
        src = load_lora(save_lora(lora, tmp_path / f"{a}.safetensors", a))
        assert src.family == "zimage"
        for b in ("kohya", "comfyui", "diffusers"):
            assert_same_deltas(load_lora(save_lora(src, tmp_path / f"{a}-{b}.safetensors", b)), lora)


def test_kohya_and_comfyui_write_comfyui_internal_fused_names():
    tensors, _ = write_lora(fused.split(zimage_lora()), "kohya")
    assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in tensors
    assert "lora_unet_noise_refiner_0_adaLN_modulation_0.alpha" in tensors
    comfy, _ = write_lora(zimage_lora(), "comfyui")
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight" in comfy
    diffusers, _ = write_lora(zimage_lora(), "diffusers")
    assert "transformer.all_final_layer.2-1.adaLN_modulation.1.lora_B.weight" in diffusers
    assert "transformer.layers.1.attention.to_v.lora_A.weight" in diffusers


def test_zimage_and_flux_do_not_mix():
    from test_flux1 import flux_lora

    with pytest.raises(LoraFormatError, match="not in the Z-Image model; they look like FLUX.1"):
        read_lora(write_lora(flux_lora(te=False), "kohya")[0], family="zimage")
    tensors = {**write_lora(flux_lora(te=False), "kohya")[0], **write_lora(zimage_lora(), "kohya")[0]}
    with pytest.raises(LoraFormatError, match="mixes modules of different model families"):
        read_lora(tensors)


def test_ai_toolkit_lokr_on_split_names_reads_as_part_layers():
    g = torch.Generator().manual_seed(7)
    tensors = {f"diffusion_model.layers.0.attention.to_{p}.{n}": torch.randn(*s, generator=g)
               for p in "qkv" for n, s in (("lokr_w1", (4, 4)), ("lokr_w2", (D // 4, D // 4)))}
    got, unused = read_lora(tensors)
    assert unused == [] and got.family == "zimage"
    layer = got["unet.layers.0.attention.qkv[k]"]
    assert layer.kind == "lokr" and layer.delta_shape == (D, D)
    with pytest.raises(LoraFormatError, match="one part of a fused weight cannot be fused"):
        write_lora(got, "kohya")
