"""Z-Image LoRAs inside real ComfyUI (in-process, CPU): LoRA Ops' Apply against ComfyUI's own LoRA loader.

ComfyUI runs Z-Image as a Lumina-2 NextDiT with fused ``layers.N.attention.qkv`` (LoRA Ops' canonical names);
it maps the ComfyUI names (``diffusion_model.…``, kohya ``lora_unet_…``) and, through ``comfy.utils.
z_image_to_diffusers``, the diffusers names (``transformer.``, ai-toolkit's ``diffusion_model.``, ``lycoris_``,
bare) onto q/k/v row offsets. The references are ComfyUI's own `comfy.sd.load_lora_for_models` on the same file
where ComfyUI reads that spelling, and on the kohya spelling of the same LoRA where it does not (musubi's
``lora_unet_layers_0_attention_to_q``: kohya-style names of the diffusers modules).

Only ComfyUI versions with Z-Image (0.33.0 here; not 0.3.64) run these. Its detector knows only the released width
(dim 3840), so the tiny model of `lora_ops.testing.tiny_zimage` is built from an explicit config
(`tiny_zimage.comfy_unet_config`), with its timestep MLP rebuilt at diffusers' sizes (ComfyUI's NextDiT sizes it
256 → min(dim, 1024) → 256, the released model's only from dim 1024 up), and loaded with `diffusers_to_comfy` weights.
"""

import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import import_pack

from lora_ops.testing.tiny_flux import tiny_flux_bfl_state_dict
from lora_ops.testing.tiny_zimage import (
    comfy_unet_config,
    diffusers_to_comfy,
    tiny_zimage_comfy_state_dict,
    tiny_zimage_forward,
    tiny_zimage_transformer,
)

pack = import_pack()
ours = pack.nodes
host = importlib.import_module(pack.__name__ + ".nodes.comfy_host")
P = SimpleNamespace(**{name: importlib.import_module(f"{pack.__name__}.lora_ops.{name}")
                       for name in ("families", "formats", "fused", "errors", "keymap")})
diffusers_layers = importlib.import_module(pack.__name__ + ".lora_ops.formats.diffusers").diffusers_layers
fixtures = importlib.import_module(pack.__name__ + ".lora_ops.testing.fixtures")
ZI = P.families.get("zimage")

TOL = 1e-5  # max |ours − native| / max |native| per patched weight (fp32 MODEL)
FORWARD_TOL = 1e-3  # ComfyUI's NextDiT (fused RMS-norm + RoPE kernels) against diffusers' forward, relative
QKV = "diffusion_model.layers.0.attention.qkv.weight"
SAME_FAMILY = r"LoRA layers matched \(100%\); Z-Image LoRA on a Z-Image model\."
N_BLOCKS = 4  # 2 layers + 1 noise refiner + 1 context refiner, each with one fused qkv


@pytest.fixture(scope="module")
def zimage_sd():
    return tiny_zimage_comfy_state_dict(seed=0)


@pytest.fixture(scope="module")
def shapes(zimage_sd):
    """Canonical key → weight shape: every 2-D weight of the tiny Z-Image (every Linear of the model)."""
    return {"unet." + k.removesuffix(".weight"): tuple(v.shape) for k, v in zimage_sd.items()
            if k.endswith(".weight") and v.ndim == 2}


def build_zimage(c, sd):
    """A ComfyUI Z-Image MODEL (ModelPatcher) from the tiny config, holding the ComfyUI-named weights ``sd``."""
    mm = c.model_management
    uc = comfy_unet_config()
    config = c.supported_models.ZImage(uc)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, "", device=mm.get_torch_device())
    dm = base.diffusion_model
    # The released layout's timestep MLP (see the module docstring), built with the model's own operations.
    ops = getattr(importlib.import_module("comfy.ops"), type(dm.x_embedder).__qualname__.split(".")[0])
    embedder = importlib.import_module("comfy.ldm.modules.diffusionmodules.mmdit").TimestepEmbedder
    dm.t_embedder = embedder(1024, output_size=min(uc["dim"], 256), dtype=torch.float32,
                             device=mm.get_torch_device(), operations=ops)
    model_sd = dm.state_dict()
    assert {k: tuple(v.shape) for k, v in model_sd.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    left = dict(sd)
    base.load_model_weights(left, "")
    assert not left, f"weights not loaded: {sorted(left)[:3]}"
    assert all(torch.equal(v, sd[k]) for k, v in dm.state_dict().items())
    return c.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                        offload_device=mm.unet_offload_device())


@pytest.fixture
def zi(comfy, zimage_sd):
    """Factories for a fresh tiny Z-Image MODEL, and a FLUX.1 one for the wrong family."""
    c = comfy.comfy
    if not hasattr(c.supported_models, "ZImage"):
        pytest.skip(f"ComfyUI {comfy.version} has no Z-Image model (comfy.supported_models.ZImage; added after 0.3.64)")

    def flux():
        new = c.sd.load_diffusion_model_state_dict(tiny_flux_bfl_state_dict(seed=0),
                                                   model_options={"dtype": torch.float32})
        assert type(new.model.model_config).__name__ == "Flux"
        return new

    return SimpleNamespace(model=lambda: build_zimage(c, zimage_sd), flux=flux)


def zimage_lora(shapes, *, seed=0, rank=4, alpha=2.0, keep=None):
    """A random canonical Z-Image LoRA (a pack value) on every Linear of the tiny model (or those ``keep`` accepts)."""
    chosen = {k: s for k, s in shapes.items() if keep is None or keep(k)}
    return fixtures.random_lora(chosen, rank=rank, alpha=alpha, family="zimage", seed=seed)


def _flat(prefix, lora, *, alphas=True):
    """Kohya-style keys (``lora_down/lora_up``, ``.alpha``) on the diffusers names, dots → ``_``: musubi's
    ``lora_unet_layers_0_attention_to_q`` and SimpleTuner's ``lycoris_…`` (q, k, v as separate layers)."""
    out = {}
    for key, layer in diffusers_layers(lora).layers.items():
        module, part = P.fused.parse_key(key)
        name = prefix + P.keymap.dotted_to_kohya(ZI.to_diffusers(module.removeprefix("unet."), part))
        out.update({f"{name}.lora_down.weight": layer.down, f"{name}.lora_up.weight": layer.up})
        if alphas and layer.alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(float(layer.alpha))
    return out


def spellings(lora):
    """The LoRA in every spelling of the wild, from LoRA Ops' own writers and renames of their keys."""
    diffusers, _ = P.formats.write_lora(lora, "diffusers")
    bare = {k.removeprefix("transformer."): v for k, v in diffusers.items()}
    return {
        "comfyui": P.formats.write_lora(lora, "comfyui")[0],  # diffusion_model.layers.0.attention.qkv.lora_up…
        "kohya": P.formats.write_lora(lora, "kohya")[0],  # lora_unet_layers_0_attention_qkv (musubi's converter)
        "diffusers": diffusers,  # transformer.layers.0.attention.to_q.lora_A.weight
        "ai-toolkit": {"diffusion_model." + k: v for k, v in bare.items()},  # diffusers names behind ComfyUI's prefix
        "diffsynth-bare": bare,
        "peft-default": {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                         for k, v in bare.items()},
        "lycoris": _flat("lycoris_", lora),
        "musubi": _flat("lora_unet_", lora),
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


def test_the_tiny_comfyui_zimage_is_the_diffusers_model(comfy, zi):
    model = zi.model()
    assert type(model.model.model_config).__name__ == "ZImage"
    assert type(model.model).__name__ == "Lumina2"  # ComfyUI's model class for Z-Image
    unet = host.unet_targets(model)
    assert unet["unet.layers.0.attention.qkv"] == (96, 32) and unet["unet.final_layer.adaLN_modulation.1"] == (32, 32)
    assert host.model_family(model) == "zimage"

    # Same function: ComfyUI's NextDiT returns −(diffusers' output) at t = 1 − σ (its flow convention).
    d = tiny_zimage_transformer(0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cap = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.model.diffusion_model(x, torch.tensor([0.3]), cap, 8)
        want = d(x=[x[0].unsqueeze(1)], t=torch.tensor([0.7]), cap_feats=[cap[0]], return_dict=False)[0][0][:, 0]
    assert (got[0] + want).abs().max() <= FORWARD_TOL * want.abs().max()
    assert tiny_zimage_forward(d).abs().max() > 0

    # A ComfyUI Z-Image config decides when the weight names do not (a model holding no telling weight).
    config = comfy.comfy.supported_models.ZImage(comfy_unet_config())
    silent = SimpleNamespace(model=SimpleNamespace(model_config=config), model_state_dict=dict)
    assert host.model_family(silent) == "zimage"


def test_the_canonical_names_are_comfyuis_and_its_diffusers_map_is_ours(comfy, zi, shapes):
    c = comfy.comfy
    model = zi.model()
    declared = {t.format(i=i) for t in importlib.import_module(pack.__name__ + ".lora_ops.families.zimage").ORIGINAL
                for i in range(2 if t.startswith("layers.") else 1)}
    assert {k.removeprefix("unet.") for k in shapes} == declared  # ComfyUI's Linears are zimage.py's modules

    # ComfyUI's own converter (comfy.utils.z_image_to_diffusers, used to load diffusers-format files) = ours.
    sd = tiny_zimage_transformer(0).state_dict()
    want = diffusers_to_comfy(sd)
    mapped = c.model_detection.convert_diffusers_mmdit(dict(sd), "")
    assert sorted(mapped) == sorted(want) and all(torch.equal(mapped[k], want[k]) for k in want)
    sd_map = c.utils.z_image_to_diffusers(model.model.model_config.unet_config)
    assert set(sd) <= set(sd_map)  # ComfyUI has a name for every diffusers tensor

    # Its LoRA key map for diffusers names (transformer.<diffusers>) places every part where ZI does.
    key_map = c.lora.model_lora_keys_unet(model.model, {})
    seen = 0
    for lora_key, target in key_map.items():
        if not lora_key.startswith("transformer.") or not isinstance(target, (str, tuple)):
            continue
        weight, offset = (target, None) if isinstance(target, str) else target[:2]
        module = "unet." + weight.removeprefix("diffusion_model.").removesuffix(".weight")
        if module not in shapes:
            continue  # norms, biases
        path, part = ZI.denoiser_path(lora_key.removeprefix("transformer."))
        assert "unet." + path == module, lora_key
        if part is None:
            assert offset is None, lora_key
        else:
            spec = ZI.fused_weight(path)
            assert offset == (0, *spec.rows(part, spec.unit_of_weight(shapes[module][0]))), lora_key
        seen += 1
    assert seen == len(shapes) + 2 * N_BLOCKS  # every Linear, q/k/v apart
    for module in shapes:  # and every canonical module has ComfyUI's own names too
        path = module.removeprefix("unet.")
        assert key_map["diffusion_model." + path] == f"diffusion_model.{path}.weight"
        assert key_map["lora_unet_" + P.keymap.dotted_to_kohya(path)] == f"diffusion_model.{path}.weight"


# ---------------------------------------------------------------------------------------------- against native

NATIVE = ["comfyui", "kohya", "diffusers", "ai-toolkit", "diffsynth-bare", "peft-default", "lycoris"]
WITH_ALPHA = {"comfyui", "kohya", "lycoris", "musubi"}  # the others carry no alpha: scale 1 = alpha/rank with alpha 4


@pytest.mark.parametrize("spelling", NATIVE)
def test_spellings_comfyui_reads_equal_native(comfy, zi, shapes, spelling, caplog):
    model = zi.model()
    lora = zimage_lora(shapes, alpha=2.0 if spelling in WITH_ALPHA else 4.0)
    tensors = spellings(lora)[spelling]
    caplog.clear()
    native = comfy.comfy.sd.load_lora_for_models(model, None, dict(tensors), 0.8, 0.0)[0]
    whole = spelling in ("comfyui", "kohya")
    assert n_patches(native) == len(shapes) + (0 if whole else 2 * N_BLOCKS)  # ComfyUI took every layer
    assert "not loaded" not in caplog.text.lower()

    loaded = read(tensors, f"{spelling}.safetensors")
    assert loaded.family == "zimage"
    new_model, _, text = ours.LoraOpsApply().apply(model, loaded, 0.8, 0.0)
    n = len(loaded.layers)
    assert re.fullmatch(f"{n} of {n} {SAME_FAMILY}", text), text
    assert not model.patches  # the input is untouched
    assert n_patches(new_model) == n_patches(native)
    assert weight_diff(new_model, native) <= TOL
    if not whole:
        offsets = sorted(p[3] for p in new_model.patches[QKV])
        assert offsets == [(0, 0, 32), (0, 32, 32), (0, 64, 32)]  # q, k, v rows
        assert sorted(p[3] for p in native.patches[QKV]) == offsets
    assert_changes_every_weight(new_model, shapes)


def test_musubi_which_comfyui_drops_equals_native_on_its_kohya_fused_equivalent(comfy, zi, shapes, caplog):
    model = zi.model()
    lora = zimage_lora(shapes, seed=1, alpha=2.0)
    tensors = spellings(lora)["musubi"]  # lora_unet_layers_0_attention_to_q, ….to_out_0, lora_unet_all_x_embedder_2-1
    caplog.clear()
    partial = comfy.comfy.sd.load_lora_for_models(model, None, dict(tensors), 0.9, 0.0)[0]
    assert "lora key not loaded: lora_unet_layers_0_attention_to_q" in caplog.text  # native drops these
    assert 0 < n_patches(partial) < len(shapes)  # feed-forward, adaLN, embedders share ComfyUI's names

    ref = comfy.comfy.sd.load_lora_for_models(model, None, P.formats.write_lora(lora, "kohya")[0], 0.9, 0.0)[0]
    loaded = read(tensors, "musubi.safetensors")
    assert loaded.family == "zimage"
    new_model, _, report = host.apply_lora(model, None, loaded, 0.9, 0.0)
    assert report.fraction == 1.0
    assert weight_diff(new_model, ref) <= TOL
    assert_changes_every_weight(new_model, shapes)


def test_lycoris_kinds_and_dora_on_parts_equal_native(comfy, zi):
    """ai-toolkit's LoKr on q, k, v (ComfyUI #10973), a LoHa and a DoRA layer: ComfyUI's adapters, same offsets."""
    gen = torch.Generator().manual_seed(4)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    d = 32
    tensors = {f"diffusion_model.layers.0.attention.to_{p}.{n}": rnd(*s)
               for p in "qkv" for n, s in (("lokr_w1", (4, 4)), ("lokr_w2", (d // 4, d // 4)))}
    tensors.update({
        "diffusion_model.noise_refiner.0.feed_forward.w2.hada_w1_a": rnd(d, 2),
        "diffusion_model.noise_refiner.0.feed_forward.w2.hada_w1_b": rnd(2, 85),
        "diffusion_model.noise_refiner.0.feed_forward.w2.hada_w2_a": rnd(d, 2),
        "diffusion_model.noise_refiner.0.feed_forward.w2.hada_w2_b": rnd(2, 85),
        "diffusion_model.noise_refiner.0.feed_forward.w2.alpha": torch.tensor(1.0),
        "diffusion_model.layers.1.attention.to_out.0.lora_down.weight": rnd(4, d),  # DoRA
        "diffusion_model.layers.1.attention.to_out.0.lora_up.weight": rnd(d, 4),
        "diffusion_model.layers.1.attention.to_out.0.alpha": torch.tensor(2.0),
        "diffusion_model.layers.1.attention.to_out.0.dora_scale": 1 + rnd(d, 1),
    })
    model = zi.model()
    native = comfy.comfy.sd.load_lora_for_models(model, None, dict(tensors), 1.0, 0.0)[0]
    assert n_patches(native) == 5
    new_model, _, _ = ours.LoraOpsApply().apply(model, read(tensors), 1.0, 1.0)
    assert weight_diff(new_model, native) <= TOL
    assert sorted(p[3] for p in new_model.patches[QKV]) == [(0, 0, 32), (0, 32, 32), (0, 64, 32)]


# ---------------------------------------------------------------------------------------------- merge


def test_merge_and_unload_and_comfyuis_own_load_equal_apply(comfy, zi, shapes):
    model = zi.model()
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    parts = P.fused.split(zimage_lora(shapes, seed=2))  # q/k/v part layers: three offset patches per qkv
    assert "unet.context_refiner.0.attention.qkv[k]" in parts.layers
    applied, _, _ = ours.LoraOpsApply().apply(model, parts, 0.8, 1.0)
    assert len(applied.patches[QKV]) == 3
    want = host.patched_weights(applied)

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


def test_flux_and_zimage_loras_on_each_others_models_are_one_clear_error(zi, shapes):
    zimage_model, flux_model = zi.model(), zi.flux()
    assert host.model_family(flux_model) == "flux1"
    flux_shapes = {"unet." + k.removesuffix(".weight"): tuple(v.shape) for k, v in tiny_flux_bfl_state_dict(0).items()
                   if k.endswith(".weight") and v.ndim == 2}
    flux = fixtures.random_lora(flux_shapes, family="flux1")
    with pytest.raises(P.errors.LoraValueError) as err:
        ours.LoraOpsApply().apply(zimage_model, flux, 1.0, 1.0)
    assert re.search(r"this looks like a FLUX\.1 LoRA, the model is Z-Image", str(err.value)), str(err.value)

    with pytest.raises(P.errors.LoraValueError) as err:
        ours.LoraOpsApply().apply(flux_model, zimage_lora(shapes), 1.0, 1.0)
    assert "this looks like a Z-Image LoRA, the model is FLUX.1" in str(err.value), str(err.value)
    assert not zimage_model.patches and not flux_model.patches
