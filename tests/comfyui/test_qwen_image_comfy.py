"""Qwen-Image LoRAs inside real ComfyUI (in-process, CPU): LoRA Ops' Apply against ComfyUI's own LoRA loader.

ComfyUI's ``comfy/ldm/qwen_image/model.py`` has diffusers' names (``transformer_blocks.N.attn.to_q``, ``img_mod.1``,
``img_mlp.net.0.proj`` …), which are also LoRA Ops' canonical names; nothing is fused. ComfyUI reads every spelling
of the wild itself (``diffusion_model.``, kohya ``lora_unet_``, diffusers ``transformer.``, DiffSynth's bare names,
PEFT's ``.lora_A.default.``, SimpleTuner's ``lycoris_``), so the reference is always `comfy.sd.load_lora_for_models`
on the same file.

Both ComfyUI versions here (0.3.64 and 0.33.0) have Qwen-Image. Their detector reads only ``in_channels`` and the
layer count (width fixed at 3072), so the tiny model of `lora_ops.testing.tiny_qwen_image` is built from an explicit
config (`tiny_qwen_image.comfy_unet_config`) and loaded with the diffusers state dict unchanged.
"""

import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import import_pack

from lora_ops.testing.tiny_flux import tiny_flux_bfl_state_dict
from lora_ops.testing.tiny_qwen_image import (
    comfy_unet_config,
    tiny_qwen_image_forward,
    tiny_qwen_image_inputs,
    tiny_qwen_image_state_dict,
    tiny_qwen_image_transformer,
    unpack,
)

from .test_flux1_comfy import FLUX_CONFIG, detects_tiny_flux

pack = import_pack()
ours = pack.nodes
host = importlib.import_module(pack.__name__ + ".nodes.comfy_host")
P = SimpleNamespace(**{name: importlib.import_module(f"{pack.__name__}.lora_ops.{name}")
                       for name in ("families", "formats", "errors")})
fixtures = importlib.import_module(pack.__name__ + ".lora_ops.testing.fixtures")
QWEN_TABLE = importlib.import_module(pack.__name__ + ".lora_ops.families.qwen_image")

TOL = 1e-5  # max |ours − native| / max |native| per patched weight (fp32 MODEL; seen: 0.0)
FORWARD_TOL = 1e-5  # ComfyUI's forward against diffusers', relative to max |diffusers| (seen: ~1e-7)
SAME_FAMILY = r"LoRA layers matched \(100%\); Qwen-Image LoRA on a Qwen-Image model\."
N_LINEARS = 2 * 14 + 6  # 14 per block × 2 blocks; img_in, txt_in, the 2 timestep-embedder Linears, norm_out, proj_out


@pytest.fixture(scope="module")
def qwen_sd():
    return tiny_qwen_image_state_dict(seed=0)


@pytest.fixture(scope="module")
def shapes(qwen_sd):
    """Canonical key → weight shape: every 2-D weight of the tiny Qwen-Image (every Linear of the model)."""
    return {"unet." + k.removesuffix(".weight"): tuple(v.shape) for k, v in qwen_sd.items()
            if k.endswith(".weight") and v.ndim == 2}


def build_qwen(c, sd):
    """A ComfyUI Qwen-Image MODEL (ModelPatcher) from the tiny config, holding the diffusers-named weights ``sd``."""
    mm = c.model_management
    config = c.supported_models.QwenImage(comfy_unet_config())
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, "", device=mm.get_torch_device())
    dm = base.diffusion_model
    assert {k: tuple(v.shape) for k, v in dm.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}
    left = dict(sd)
    base.load_model_weights(left, "")
    assert not left, f"weights not loaded: {sorted(left)[:3]}"
    assert all(torch.equal(v, sd[k]) for k, v in dm.state_dict().items())
    return c.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                        offload_device=mm.unet_offload_device())


@pytest.fixture
def qi(comfy, qwen_sd):
    """Factories for a fresh tiny Qwen-Image MODEL, and a FLUX.1 one for the wrong family."""
    c = comfy.comfy
    if not hasattr(c.supported_models, "QwenImage"):
        pytest.skip(f"ComfyUI {comfy.version} has no Qwen-Image model (comfy.supported_models.QwenImage)")
    mm = c.model_management

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

    return SimpleNamespace(model=lambda: build_qwen(c, qwen_sd), flux=flux)


def qwen_lora(shapes, *, seed=0, rank=4, alpha=2.0, keep=None):
    """A random canonical Qwen-Image LoRA (a pack value) on every Linear of the tiny model (or those ``keep`` takes)."""
    chosen = {k: s for k, s in shapes.items() if keep is None or keep(k)}
    return fixtures.random_lora(chosen, rank=rank, alpha=alpha, family="qwen_image", seed=seed)


def _lycoris(comfyui_key):
    """SimpleTuner's name for a ComfyUI-spelled key: ``lycoris_`` + the module path with dots → ``_``."""
    path, leaf = re.fullmatch(r"diffusion_model\.(.+?)\.(lora_(?:up|down)\.weight|alpha)", comfyui_key).groups()
    return f"lycoris_{path.replace('.', '_')}.{leaf}"


def spellings(lora):
    """The LoRA in every spelling of the wild, from LoRA Ops' own writers and renames of their keys."""
    diffusers, _ = P.formats.write_lora(lora, "diffusers")
    bare = {k.removeprefix("transformer."): v for k, v in diffusers.items()}
    comfyui, _ = P.formats.write_lora(lora, "comfyui")
    return {
        "comfyui": comfyui,  # diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight
        "kohya": P.formats.write_lora(lora, "kohya")[0],  # lora_unet_transformer_blocks_0_attn_to_q (musubi's)
        "diffusers": diffusers,  # transformer.transformer_blocks.0.attn.to_q.lora_A.weight
        "ai-toolkit": {"diffusion_model." + k: v for k, v in bare.items()},  # lora_A/B behind ComfyUI's prefix
        "diffsynth-bare": bare,  # transformer_blocks.0.attn.to_q.lora_A.weight
        "peft-default": {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                         for k, v in bare.items()},
        "lycoris": {_lycoris(k): v for k, v in comfyui.items()},  # SimpleTuner: lycoris_transformer_blocks_0_attn_to_q
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


@pytest.mark.parametrize(("h", "w", "txt"), [(8, 8, 8), (8, 12, 5)])
def test_the_tiny_comfyui_qwen_image_is_the_diffusers_model(comfy, qi, h, w, txt):
    model = qi.model()
    assert type(model.model.model_config).__name__ == "QwenImage"
    assert type(model.model).__name__ == "QwenImage"  # ComfyUI's model class
    unet = host.unet_targets(model)
    assert unet["unet.transformer_blocks.0.img_mod.1"] == (192, 32) and unet["unet.img_in"] == (32, 16)
    assert host.model_family(model) == "qwen_image"

    # Same function, same timestep convention (both scale t by 1000); ComfyUI takes [B, C, T, H, W] latents.
    d = tiny_qwen_image_transformer(0)
    x = tiny_qwen_image_inputs(d, seed=1, h=h, w=w, txt=txt)
    with torch.no_grad():
        got = model.model.diffusion_model(x["latent"].unsqueeze(2), x["t"], x["context"])[:, :, 0]
        want = d(hidden_states=x["packed"], encoder_hidden_states=x["context"], timestep=x["t"],
                 img_shapes=[[(1, h // 2, w // 2)]], return_dict=False)[0]
    want = unpack(want, d.config.out_channels, h, w)
    assert got.shape == want.shape == (1, 4, h, w)
    print(f"qwen-image forward {h}x{w}, {txt} tokens, ComfyUI {comfy.version}: max |diff| "
          f"{(got - want).abs().max().item():.3g} of max |out| {want.abs().max().item():.3g}")
    assert (got - want).abs().max() <= FORWARD_TOL * want.abs().max()
    assert tiny_qwen_image_forward(d).abs().max() > 0

    # A ComfyUI Qwen-Image config decides when the weight names do not (a model holding no telling weight).
    config = comfy.comfy.supported_models.QwenImage(comfy_unet_config())
    silent = SimpleNamespace(model=SimpleNamespace(model_config=config), model_state_dict=dict)
    assert host.model_family(silent) == "qwen_image"


def test_the_canonical_names_are_comfyuis_and_comfyui_maps_every_spelling(comfy, qi, shapes):
    model = qi.model()
    declared = {t.format(i=i) for t in QWEN_TABLE.ORIGINAL for i in range(2 if "{i}" in t else 1)}
    assert {k.removeprefix("unet.") for k in shapes} == declared  # ComfyUI's Linears are qwen_image.py's modules
    assert len(shapes) == N_LINEARS
    assert set(host.unet_targets(model)) >= set(shapes)

    key_map = comfy.comfy.lora.model_lora_keys_unet(model.model, {})
    for module in shapes:
        path = module.removeprefix("unet.")
        weight = f"diffusion_model.{path}.weight"
        for name in (f"diffusion_model.{path}", f"lora_unet_{path.replace('.', '_')}", f"transformer.{path}", path,
                     f"lycoris_{path.replace('.', '_')}"):
            assert key_map.get(name) == weight, name


# ---------------------------------------------------------------------------------------------- against native

NATIVE = ["comfyui", "kohya", "diffusers", "ai-toolkit", "diffsynth-bare", "peft-default", "lycoris"]
WITH_ALPHA = {"comfyui", "kohya", "lycoris"}  # the others carry no alpha: scale 1 = alpha/rank with alpha 4


@pytest.mark.parametrize("spelling", NATIVE)
def test_every_spelling_equals_native(comfy, qi, shapes, spelling, caplog):
    model = qi.model()
    lora = qwen_lora(shapes, alpha=2.0 if spelling in WITH_ALPHA else 4.0)
    tensors = spellings(lora)[spelling]
    if spelling == "kohya":
        assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in tensors
    if spelling == "lycoris":
        assert "lycoris_transformer_blocks_0_attn_to_out_0.lora_up.weight" in tensors
    caplog.clear()
    native = comfy.comfy.sd.load_lora_for_models(model, None, dict(tensors), 0.8, 0.0)[0]
    assert n_patches(native) == len(shapes)  # ComfyUI took every layer
    assert "not loaded" not in caplog.text.lower()

    loaded = read(tensors, f"{spelling}.safetensors")
    assert loaded.family == "qwen_image"
    new_model, _, text = ours.LoraOpsApply().apply(model, loaded, 0.8, 0.0)
    n = len(loaded.layers)
    assert n == len(shapes)
    assert re.fullmatch(f"{n} of {n} {SAME_FAMILY}", text), text
    assert not model.patches  # the input is untouched
    assert n_patches(new_model) == n_patches(native)
    diff = weight_diff(new_model, native)
    print(f"qwen-image {spelling} on ComfyUI {comfy.version}: max rel diff {diff:.3g}")
    assert diff <= TOL
    assert_changes_every_weight(new_model, shapes)

    # The same through the host API.
    again, _, report = host.apply_lora(model, None, loaded, 0.8, 0.0)
    assert report.fraction == 1.0 and weight_diff(again, native) == diff


# ---------------------------------------------------------------------------------------------- merge


def test_merge_and_unload_and_comfyuis_own_load_equal_apply(comfy, qi, shapes):
    model = qi.model()
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    applied, _, _ = ours.LoraOpsApply().apply(model, qwen_lora(shapes, seed=2), 0.8, 1.0)
    want = host.patched_weights(applied)
    assert len(want) == len(shapes)

    merged, _ = ours.LoraOpsMergeUnload().merge(applied, None)
    assert {p[1][0] for patches in merged.patches.values() for p in patches} == {"set"}
    got = host.patched_weights(merged)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    # ComfyUI's own full load (patch_model) puts exactly these weights into the module; unpatching restores it.
    applied.patch_model()
    try:
        state = applied.model.state_dict()
        assert all(torch.equal(state[k], want[k]) for k in want)
    finally:
        applied.unpatch_model()
    assert all(torch.equal(v, base[k]) for k, v in model.model_state_dict().items())
    assert not model.patches


# ---------------------------------------------------------------------------------------------- wrong family


def test_flux_and_qwen_image_loras_on_each_others_models_are_one_clear_error(qi, shapes):
    qwen_model, flux_model = qi.model(), qi.flux()
    assert host.model_family(flux_model) == "flux1"
    flux_shapes = {"unet." + k.removesuffix(".weight"): tuple(v.shape) for k, v in tiny_flux_bfl_state_dict(0).items()
                   if k.endswith(".weight") and v.ndim == 2}
    flux = fixtures.random_lora(flux_shapes, family="flux1")
    with pytest.raises(P.errors.LoraValueError) as err:
        ours.LoraOpsApply().apply(qwen_model, flux, 1.0, 1.0)
    assert "this looks like a FLUX.1 LoRA, the model is Qwen-Image" in str(err.value), str(err.value)

    with pytest.raises(P.errors.LoraValueError) as err:
        ours.LoraOpsApply().apply(flux_model, qwen_lora(shapes), 1.0, 1.0)
    assert "this looks like a Qwen-Image LoRA, the model is FLUX.1" in str(err.value), str(err.value)
    assert not qwen_model.patches and not flux_model.patches
