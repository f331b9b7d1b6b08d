"""Qwen-Image LoRAs in every spelling of the wild, and telling them from FLUX.1's diffusers-named LoRAs."""

import pytest
import torch

from lora_ops import families
from lora_ops import lora as L
from lora_ops.errors import LoraFormatError
from lora_ops.files import load_lora, save_lora
from lora_ops.formats import read_lora, write_lora
from lora_ops.inspect import inspect_lora
from lora_ops.keymap import dotted_to_kohya

H = 16
QWEN = families.get("qwen_image")


def qwen_shapes(h: int = H, blocks: int = 2) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(blocks):
        b = f"transformer_blocks.{i}."
        for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out"):
            shapes[b + m] = (h, h)
        for s in ("img", "txt"):
            shapes.update({b + f"{s}_mod.1": (6 * h, h), b + f"{s}_mlp.net.0.proj": (4 * h, h),
                           b + f"{s}_mlp.net.2": (h, 4 * h)})
    shapes.update({"img_in": (h, 64), "txt_in": (h, 32), "time_text_embed.timestep_embedder.linear_1": (h, 256),
                   "time_text_embed.timestep_embedder.linear_2": (h, h), "norm_out.linear": (2 * h, h),
                   "proj_out": (64, h)})
    return shapes


def qwen_lora(seed=0, rank=4, alpha=4.0, modules=None) -> L.LoRA:
    g = torch.Generator().manual_seed(seed)
    return L.LoRA({f"unet.{p}": L.LoRALayer(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g),
                                            alpha)
                   for p, (o, i) in qwen_shapes().items() if modules is None or p in modules}, family="qwen_image")


def assert_same(got: L.LoRA, want: L.LoRA, tol=1e-6):
    assert set(got.layers) == set(want.layers), sorted(set(got.layers) ^ set(want.layers))[:4]
    for k, layer in want.layers.items():
        d = layer.delta(torch.float64)
        assert (got[k].delta(torch.float64) - d).abs().max() <= tol * d.abs().max(), k


def _spellings(lora):
    diffusers, _ = write_lora(lora, "diffusers")
    bare = {k.removeprefix("transformer."): v for k, v in diffusers.items()}
    return {
        "comfyui": write_lora(lora, "comfyui")[0],
        "kohya (musubi)": write_lora(lora, "kohya")[0],
        "ai-toolkit": {"diffusion_model." + k: v for k, v in bare.items()},
        "diffusers": diffusers,
        "diffsynth-bare": bare,
        "peft-default": {k.replace(".lora_A.weight", ".lora_A.default.weight")
                         .replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in bare.items()},
        "lycoris_": {"lycoris_" + dotted_to_kohya(k.split(".lora_")[0]) + (".lora_down.weight" if ".lora_A" in k
                     else ".lora_up.weight"): v for k, v in bare.items()},
    }


@pytest.mark.parametrize("spelling", list(_spellings(qwen_lora())))
def test_every_spelling_reads_as_qwen_image(spelling):
    lora = qwen_lora()
    got, unused = read_lora(_spellings(lora)[spelling], file=f"{spelling}.safetensors")
    assert unused == [] and got.family == "qwen_image"
    assert_same(got, lora)
    assert inspect_lora(got)["family"] == "qwen_image"


def test_names_are_one_spelling_and_kohya_writes_them():
    for path in qwen_shapes():
        assert QWEN.denoiser_path(path) == (path, None) and QWEN.to_diffusers(path, None) == path
    tensors, _ = write_lora(qwen_lora(), "kohya")
    assert "lora_unet_transformer_blocks_0_img_mlp_net_0_proj.lora_down.weight" in tensors


def test_four_writers_convert_exactly(tmp_path):
    lora = qwen_lora(alpha=3.0)
    for a in ("kohya", "comfyui", "diffusers", "peft"):
        src = load_lora(save_lora(lora, tmp_path / f"{a}.safetensors", a))
        assert src.family == "qwen_image"
        for b in ("kohya", "comfyui", "diffusers"):
            assert_same(load_lora(save_lora(src, tmp_path / f"{a}-{b}.safetensors", b)), lora)


def test_attention_only_lora_is_ambiguous_with_flux_until_something_says_which():
    attention = {p for p in qwen_shapes() if ".attn." in p}
    tensors, meta = write_lora(qwen_lora(modules=attention), "diffusers")
    assert meta.pop("modelspec.architecture") == "qwen-image/lora"  # ours say it; a third-party file may not
    with pytest.raises(LoraFormatError, match="names different modules in FLUX.1, Qwen-Image.*pass family="):
        read_lora(tensors, meta, file="attn.safetensors")
    forced, _ = read_lora(tensors, meta, family="qwen_image")
    tagged, _ = read_lora(tensors, {**meta, "ss_base_model_version": "qwen_image"})
    as_flux, _ = read_lora(tensors, {**meta, "modelspec.architecture": "flux-1-dev/lora"})
    assert forced.family == tagged.family == "qwen_image" and as_flux.family == "flux1"
    assert "unet.double_blocks.0.img_attn.qkv[q]" in as_flux.layers  # the same file read as FLUX.1 names
    written, written_meta = write_lora(forced, "kohya")  # what we write says which model it is for
    assert written_meta["modelspec.architecture"] == "qwen-image/lora"
    assert read_lora(written, written_meta)[0].family == "qwen_image"
    assert "modelspec.architecture" not in write_lora(qwen_lora(), "kohya")[1]  # names that tell need no tag


def test_a_flux_lora_is_not_read_as_qwen_image():
    from test_flux1 import flux_lora

    with pytest.raises(LoraFormatError, match="not in the Qwen-Image model; they look like FLUX.1"):
        read_lora(write_lora(flux_lora(te=False), "kohya")[0], family="qwen_image")
    got, _ = read_lora(*write_lora(flux_lora(te=False), "diffusers"))  # single blocks and norms tell
    assert got.family == "flux1"
