"""Wan LoRAs inside real ComfyUI (in-process, CPU): LoRA Ops' Apply against ComfyUI's own LoRA loader.

ComfyUI's ``comfy/ldm/wan/model.py`` has the original (Wan-Video) names (``blocks.N.self_attn.q``, ``ffn.0``,
``head.head``), which are also LoRA Ops' canonical names; nothing is fused. ComfyUI has no Wan-specific LoRA key map:
it reads ``diffusion_model.<original>`` (with lora_up/down or lora_A/B), kohya/musubi ``lora_unet_<original>`` and
Wan-Fun's ``lora_unet__`` (`comfy.lora_convert`), but no diffusers name (``transformer.blocks.0.attn1.to_q``), so a
diffusers-named Wan LoRA loads 0 modules natively; the reference for it is native on the ComfyUI spelling.

Both ComfyUI versions here (0.3.64 and 0.33.0) detect the tiny original-named state dict of
`lora_ops.testing.tiny_wan` as Wan (`comfy.sd.load_diffusion_model_state_dict`; dim 128 = 1 head of 128).
"""

import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import import_pack

from lora_ops.testing.tiny_flux import tiny_flux_bfl_state_dict
from lora_ops.testing.tiny_wan import (
    diffusers_to_wan,
    tiny_wan_forward,
    tiny_wan_inputs,
    tiny_wan_state_dict,
    tiny_wan_transformer,
    wan_to_diffusers,
)

from .test_flux1_comfy import FLUX_CONFIG, detects_tiny_flux

pack = import_pack()
ours = pack.nodes
host = importlib.import_module(pack.__name__ + ".nodes.comfy_host")
P = SimpleNamespace(**{name: importlib.import_module(f"{pack.__name__}.lora_ops.{name}")
                       for name in ("families", "formats", "errors")})
fixtures = importlib.import_module(pack.__name__ + ".lora_ops.testing.fixtures")
WAN_TABLE = importlib.import_module(pack.__name__ + ".lora_ops.families.wan")

TOL = 1e-5  # max |ours − native| / max |native| per patched weight (fp32 MODEL)
FORWARD_TOL = 1e-5  # ComfyUI's forward against diffusers', relative to max |diffusers|
SAME_FAMILY = r"LoRA layers matched \(100%\); Wan LoRA on a Wan model\."
N_LINEARS = 2 * 10 + 6  # 10 per block × 2 blocks; text_embedding.0/2, time_embedding.0/2, time_projection.1, head.head
I2V_ONLY = ("cross_attn.k_img", "cross_attn.v_img", "img_emb.")  # the tiny model is T2V


@pytest.fixture(scope="module")
def wan_sd():
    return tiny_wan_state_dict(seed=0)


@pytest.fixture(scope="module")
def shapes(wan_sd):
    """Canonical key → weight shape: every 2-D weight of the tiny Wan (every Linear of the model)."""
    return {"unet." + k.removesuffix(".weight"): tuple(v.shape) for k, v in wan_sd.items()
            if k.endswith(".weight") and v.ndim == 2}


@pytest.fixture
def wan(comfy, wan_sd):
    """Factories for a fresh tiny Wan MODEL (detected by ComfyUI), and a FLUX.1 one for the wrong family."""
    c = comfy.comfy
    mm = c.model_management

    def model():
        sd = dict(wan_sd)
        new = c.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
        assert new is not None, f"ComfyUI {comfy.version} did not detect the tiny Wan"
        return new

    def flux():  # as tests/comfyui/test_flux1_comfy.py builds it
        flux_sd = tiny_flux_bfl_state_dict(seed=0)
        if detects_tiny_flux(comfy):
            new = c.sd.load_diffusion_model_state_dict(flux_sd, model_options={"dtype": torch.float32})
        else:
            config = c.supported_models.Flux(dict(FLUX_CONFIG))
            config.set_inference_dtype(torch.float32, None)
            base = config.get_model({}, "", device=mm.get_torch_device())
            base.load_model_weights(flux_sd, "")
            assert not flux_sd, f"weights not loaded: {sorted(flux_sd)[:3]}"
            new = c.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
        assert type(new.model.model_config).__name__ == "Flux"
        return new

    return SimpleNamespace(model=model, flux=flux)


def wan_lora(shapes, *, seed=0, rank=4, alpha=2.0, keep=None):
    """A random canonical Wan LoRA (a pack value) on every Linear of the tiny model (or those ``keep`` takes)."""
    chosen = {k: s for k, s in shapes.items() if keep is None or keep(k)}
    return fixtures.random_lora(chosen, rank=rank, alpha=alpha, family="wan", seed=seed)


def spellings(lora):
    """The LoRA in every spelling of the wild, from LoRA Ops' own writers and renames of their keys."""
    diffusers, _ = P.formats.write_lora(lora, "diffusers")
    comfyui, _ = P.formats.write_lora(lora, "comfyui")
    kohya, _ = P.formats.write_lora(lora, "kohya")
    lora_ab = {}  # ai-toolkit: the original names behind ComfyUI's prefix, PEFT's lora_A / lora_B and no alpha
    for k, v in comfyui.items():
        if not k.endswith(".alpha"):
            lora_ab[k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")] = v
    return {
        "comfyui": comfyui,  # diffusion_model.blocks.0.self_attn.q.lora_up.weight
        "kohya": kohya,  # lora_unet_blocks_0_self_attn_q (musubi-tuner's)
        "wan-fun": {k.replace("lora_unet_", "lora_unet__", 1): v for k, v in kohya.items()},  # lora_unet__blocks_0_…
        "ai-toolkit": lora_ab,  # diffusion_model.blocks.0.self_attn.q.lora_A.weight
        "diffusers": diffusers,  # transformer.blocks.0.attn1.to_q.lora_A.weight
    }


def read(tensors, name="lora.safetensors"):
    lora, unused = P.formats.read_lora(dict(tensors), None, file=name)
    assert unused == [], unused[:3]
    return lora


def weight_diff(a, b):
    """max over patched weights of max |a − b| / max |b| (the two patchers must patch the same weights)."""
    wa, wb = host.patched_weights(a), host.patched_weights(b)
    assert wb and set(wa) == set(wb), sorted(set(wa) ^ set(wb))[:5]
    return max(((wa[k].double() - wb[k].double()).abs().max() / wb[k].double().abs().max()).item() for k in wb)


def n_patches(patcher):
    return sum(len(v) for v in patcher.patches.values())


def assert_changes_every_weight(patcher, shapes):
    state = patcher.model_state_dict()
    patched = host.patched_weights(patcher)
    assert {"unet." + k.removeprefix("diffusion_model.").removesuffix(".weight") for k in patched} == set(shapes)
    for key, w in patched.items():
        assert not torch.equal(w, state[key]), f"{key} unchanged"


# ---------------------------------------------------------------------------------------------- the model, names


@pytest.mark.parametrize("config", [{}, {"image_dim": 32, "added_kv_proj_dim": 128}], ids=["t2v", "i2v"])
def test_the_tiny_wan_names_are_the_inverse_of_diffusers_converter(config):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    d = {k: v.detach() for k, v in tiny_wan_transformer(0, config).state_dict().items()}
    assert all(v.abs().max() > 0 for v in d.values())  # seeded nonzero weights, biases and tables
    original = diffusers_to_wan(d)
    assert len(original) == len(d) and {id(v) for v in original.values()} == {id(v) for v in d.values()}
    assert "head.modulation" in original and "blocks.1.norm3.weight" in original
    assert "blocks.0.cross_attn.k_img.weight" in original if config else "img_emb.proj.1.weight" not in original
    back = convert_wan_transformer_to_diffusers(dict(original))  # diffusers' own single-file converter
    assert back.keys() == d.keys() and all(back[k] is d[k] for k in d)
    again = wan_to_diffusers(original)
    assert list(again) == list(d) and all(again[k] is d[k] for k in d)
    with pytest.raises(ValueError, match="not original"):
        wan_to_diffusers({**original, "blocks.0.unknown.weight": d["proj_out.bias"]})


def test_comfyui_detects_the_tiny_wan_and_runs_the_diffusers_function(comfy, wan):
    model = wan.model()
    name = type(model.model.model_config).__name__
    assert name in ("WAN21_T2V", "WAN22_T2V"), name
    assert type(model.model).__name__ == "WAN21"  # ComfyUI's model class
    unet = host.unet_targets(model)
    assert unet["unet.blocks.0.self_attn.q"] == (128, 128) and unet["unet.head.head"] == (64, 128)
    assert host.model_family(model) == "wan"

    # Same function: ComfyUI's WanModel takes the same [B, C, F, H, W] latent and 0–1000 timestep as diffusers'.
    d = tiny_wan_transformer(0)
    x = tiny_wan_inputs(d, seed=1, frames=2, h=4, w=6, txt=5)
    with torch.no_grad():
        got = model.model.diffusion_model(x["latent"], x["t"], x["context"])
    want = tiny_wan_forward(d, seed=1, frames=2, h=4, w=6, txt=5)
    assert got.shape == want.shape == (1, 16, 2, 4, 6)
    print(f"wan forward, ComfyUI {comfy.version} ({name}): max |diff| {(got - want).abs().max().item():.3g} "
          f"of max |out| {want.abs().max().item():.3g}")
    assert (got - want).abs().max() <= FORWARD_TOL * want.abs().max()


def test_the_canonical_names_are_comfyuis(comfy, wan, shapes):
    model = wan.model()
    declared = {t.format(i=i) for t in WAN_TABLE.ORIGINAL for i in range(2 if "{i}" in t else 1)}
    declared = {p for p in declared if not any(s in p for s in I2V_ONLY)}
    assert {k.removeprefix("unet.") for k in shapes} == declared  # ComfyUI's Linears are the family's modules
    assert len(shapes) == N_LINEARS
    assert set(host.unet_targets(model)) >= set(shapes)

    key_map = comfy.comfy.lora.model_lora_keys_unet(model.model, {})
    for module in shapes:
        path = module.removeprefix("unet.")
        weight = f"diffusion_model.{path}.weight"
        for name in (f"diffusion_model.{path}", f"lora_unet_{path.replace('.', '_')}"):
            assert key_map.get(name) == weight, name
    diffusers_paths = {P.families.get("wan").to_diffusers(k.removeprefix("unet."), None) for k in shapes}
    assert not any(f"transformer.{p}" in key_map or p in key_map for p in diffusers_paths if p != "proj_out")


# ---------------------------------------------------------------------------------------------- against native

NATIVE = ["comfyui", "kohya", "wan-fun", "ai-toolkit"]
WITH_ALPHA = {"comfyui", "kohya", "wan-fun"}  # the others carry no alpha: scale 1 = alpha/rank with alpha 4


@pytest.mark.parametrize("spelling", NATIVE)
def test_every_spelling_comfyui_reads_equals_native(comfy, wan, shapes, spelling, caplog):
    model = wan.model()
    lora = wan_lora(shapes, alpha=2.0 if spelling in WITH_ALPHA else 4.0)
    tensors = spellings(lora)[spelling]
    first = {"comfyui": "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
             "kohya": "lora_unet_blocks_0_self_attn_q.lora_down.weight",
             "wan-fun": "lora_unet__blocks_0_self_attn_q.lora_down.weight",
             "ai-toolkit": "diffusion_model.blocks.0.self_attn.q.lora_A.weight"}[spelling]
    assert first in tensors
    caplog.clear()
    native = comfy.comfy.sd.load_lora_for_models(model, None, dict(tensors), 0.8, 0.0)[0]
    assert n_patches(native) == len(shapes)  # ComfyUI took every layer
    assert "not loaded" not in caplog.text.lower()

    loaded = read(tensors, f"{spelling}.safetensors")
    assert loaded.family == "wan"
    new_model, _, text = ours.LoraOpsApply().apply(model, loaded, 0.8, 0.0)
    n = len(loaded.layers)
    assert n == len(shapes)
    assert re.fullmatch(f"{n} of {n} {SAME_FAMILY}", text), text
    assert not model.patches  # the input is untouched
    assert n_patches(new_model) == n_patches(native)
    diff = weight_diff(new_model, native)
    print(f"wan {spelling} on ComfyUI {comfy.version}: max rel diff {diff:.3g}")
    assert diff <= TOL
    assert_changes_every_weight(new_model, shapes)

    again, _, report = host.apply_lora(model, None, loaded, 0.8, 0.0)
    assert report.fraction == 1.0 and weight_diff(again, native) == diff


def test_the_diffusers_spelling_loads_nothing_natively_and_everything_in_ours(comfy, wan, shapes, caplog):
    model = wan.model()
    lora = wan_lora(shapes, alpha=4.0)  # the diffusers writer stores no alpha: scale alpha / rank = 1
    tensors = spellings(lora)["diffusers"]
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert "transformer.condition_embedder.time_proj.lora_B.weight" in tensors
    assert "transformer.proj_out.lora_A.weight" in tensors
    caplog.clear()
    native = comfy.comfy.sd.load_lora_for_models(model, None, dict(tensors), 0.8, 0.0)[0]
    assert n_patches(native) == 0  # ComfyUI maps no diffusers name for Wan
    reference = comfy.comfy.sd.load_lora_for_models(model, None, dict(spellings(lora)["comfyui"]), 0.8, 0.0)[0]
    assert n_patches(reference) == len(shapes)

    loaded = read(tensors, "diffusers.safetensors")
    assert loaded.family == "wan" and len(loaded.layers) == len(shapes)
    new_model, _, text = ours.LoraOpsApply().apply(model, loaded, 0.8, 0.0)
    assert re.fullmatch(f"{len(shapes)} of {len(shapes)} {SAME_FAMILY}", text), text
    assert not model.patches
    diff = weight_diff(new_model, reference)
    print(f"wan diffusers on ComfyUI {comfy.version}: native loads 0 of {len(shapes)}; ours vs native(comfyui) "
          f"max rel diff {diff:.3g}")
    assert diff <= TOL
    assert_changes_every_weight(new_model, shapes)


# ---------------------------------------------------------------------------------------------- merge


def test_merge_and_unload_and_comfyuis_own_load_equal_apply(comfy, wan, shapes):
    model = wan.model()
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    applied, _, _ = ours.LoraOpsApply().apply(model, wan_lora(shapes, seed=2), 0.8, 1.0)
    want = host.patched_weights(applied)
    assert len(want) == len(shapes)

    merged, _ = ours.LoraOpsMergeUnload().merge(applied, None)
    assert {p[1][0] for patches in merged.patches.values() for p in patches} == {"set"}
    got = host.patched_weights(merged)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    applied.patch_model()
    try:
        state = applied.model.state_dict()
        assert all(torch.equal(state[k], want[k]) for k in want)
    finally:
        applied.unpatch_model()
    assert all(torch.equal(v, base[k]) for k, v in model.model_state_dict().items())
    assert not model.patches


# ---------------------------------------------------------------------------------------------- wrong family


def test_flux_and_wan_loras_on_each_others_models_are_one_clear_error(wan, shapes):
    wan_model, flux_model = wan.model(), wan.flux()
    assert host.model_family(flux_model) == "flux1"
    flux_shapes = {"unet." + k.removesuffix(".weight"): tuple(v.shape) for k, v in tiny_flux_bfl_state_dict(0).items()
                   if k.endswith(".weight") and v.ndim == 2}
    flux = fixtures.random_lora(flux_shapes, family="flux1")
    with pytest.raises(P.errors.LoraValueError) as err:
        ours.LoraOpsApply().apply(wan_model, flux, 1.0, 1.0)
    assert "this looks like a FLUX.1 LoRA, the model is Wan" in str(err.value), str(err.value)

    with pytest.raises(P.errors.LoraValueError) as err:
        ours.LoraOpsApply().apply(flux_model, wan_lora(shapes), 1.0, 1.0)
    assert "this looks like a Wan LoRA, the model is FLUX.1" in str(err.value), str(err.value)
    assert not wan_model.patches and not flux_model.patches
