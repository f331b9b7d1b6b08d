"""Wan 2.x LoRAs in every spelling of the wild: family detection, exact conversions, distillation deltas refused."""

import pytest
import torch

from lora_ops import families
from lora_ops import lora as L
from lora_ops.errors import LoraFormatError
from lora_ops.files import load_lora, save_lora
from lora_ops.formats import read_lora, write_lora
from lora_ops.inspect import inspect_lora

D = 16
WAN = families.get("wan")


def wan_shapes(d: int = D, blocks: int = 2, i2v: bool = True) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(blocks):
        b = f"blocks.{i}."
        for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                  "cross_attn.v", "cross_attn.o", *(("cross_attn.k_img", "cross_attn.v_img") if i2v else ())):
            shapes[b + m] = (d, d)
        shapes.update({b + "ffn.0": (4 * d, d), b + "ffn.2": (d, 4 * d)})
    shapes.update({"text_embedding.0": (d, 64), "text_embedding.2": (d, d), "time_embedding.0": (d, 32),
                   "time_embedding.2": (d, d), "time_projection.1": (6 * d, d), "head.head": (64, d)})
    if i2v:
        shapes.update({"img_emb.proj.1": (48, 48), "img_emb.proj.3": (d, 48)})
    return shapes


def wan_lora(seed=0, rank=4, alpha=4.0) -> L.LoRA:
    g = torch.Generator().manual_seed(seed)
    return L.LoRA({f"unet.{p}": L.LoRALayer(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g),
                                            alpha) for p, (o, i) in wan_shapes().items()}, family="wan")


def assert_same(got, want, tol=1e-6):
    assert set(got.layers) == set(want.layers), sorted(set(got.layers) ^ set(want.layers))[:4]
    for k, layer in want.layers.items():
        d = layer.delta(torch.float64)
        assert (got[k].delta(torch.float64) - d).abs().max() <= tol * d.abs().max(), k


def _spellings(lora):
    diffusers, _ = write_lora(lora, "diffusers")
    kohya, _ = write_lora(lora, "kohya")
    comfy, _ = write_lora(lora, "comfyui")
    return {
        "comfyui": comfy,
        "musubi (kohya)": kohya,
        "wan-fun (lora_unet__)": {k.replace("lora_unet_", "lora_unet__", 1): v for k, v in kohya.items()},
        "ai-toolkit": {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v
                       for k, v in comfy.items() if not k.endswith(".alpha")},
        "diffusers": diffusers,
    }


@pytest.mark.parametrize("spelling", list(_spellings(wan_lora())))
def test_every_spelling_reads_as_wan(spelling):
    lora = wan_lora()
    got, unused = read_lora(_spellings(lora)[spelling], file=f"{spelling}.safetensors")
    assert unused == [] and got.family == "wan"
    assert_same(got, lora)
    assert inspect_lora(got)["family"] == "wan"


def test_names_map_both_ways():
    for path in wan_shapes():
        name = WAN.to_diffusers(path, None)
        assert WAN.denoiser_path(name) == (path, None)
    assert WAN.to_diffusers("blocks.3.cross_attn.k_img", None) == "blocks.3.attn2.add_k_proj"
    assert WAN.to_diffusers("head.head", None) == "proj_out"
    tensors, _ = write_lora(wan_lora(), "kohya")
    assert "lora_unet_blocks_0_cross_attn_v_img.lora_down.weight" in tensors


def test_four_writers_convert_exactly(tmp_path):
    lora = wan_lora(alpha=3.0)
    for a in ("kohya", "comfyui", "diffusers", "peft"):
        src = load_lora(save_lora(lora, tmp_path / f"{a}.safetensors", a))
        assert src.family == "wan"
        for b in ("kohya", "comfyui", "diffusers"):
            assert_same(load_lora(save_lora(src, tmp_path / f"{a}-{b}.safetensors", b)), lora)


def test_distillation_deltas_are_refused_with_the_reason_and_lenient_loads_the_rest():
    tensors = {**write_lora(wan_lora(), "comfyui")[0],
               "diffusion_model.blocks.0.norm3.diff": torch.randn(D),
               "diffusion_model.head.head.diff_b": torch.randn(64)}
    with pytest.raises(LoraFormatError, match=r"full-weight or bias deltas \(.diff / .diff_b.*not apply those yet"):
        read_lora(tensors, file="lightx2v.safetensors")
    lora, unused = read_lora(tensors, strict=False)
    assert lora.family == "wan" and sorted(unused) == ["diffusion_model.blocks.0.norm3.diff",
                                                       "diffusion_model.head.head.diff_b"]


def test_wan_and_other_families_do_not_mix():
    from test_flux1 import flux_lora

    with pytest.raises(LoraFormatError, match="not in the Wan model; they look like FLUX.1"):
        read_lora(write_lora(flux_lora(te=False), "kohya")[0], family="wan")
    with pytest.raises(LoraFormatError, match="mixes modules of different model families"):
        read_lora({**write_lora(flux_lora(te=False), "kohya")[0], **write_lora(wan_lora(), "kohya")[0]})
