"""FLUX.1 LoRAs inside real ComfyUI (in-process, CPU): LoRA Ops' Apply against ComfyUI's own LoRA loader.

LoRA Ops applies through ComfyUI's patch mechanism with its own key map: whole layers patch
``diffusion_model.X.weight``, layers on part of a fused weight (``unet.single_blocks.0.linear1[mlp]``) patch it at
a row offset. The references are ComfyUI's own: `comfy.sd.load_lora_for_models` / ``LoraLoaderModelOnly`` on the
same file where ComfyUI reads that spelling, and on the kohya spelling of the same LoRA where it drops it (XLabs,
DiffSynth's bare diffusers names, ``diffusion_model.<diffusers name>``). Weights are compared as ComfyUI computes
them on a full load (`comfy_host.patched_weights`), which one test checks against ComfyUI's own ``patch_model``.

The tiny FLUX.1 of `lora_ops.testing.tiny_flux` (hidden 128, 2 double + 2 single blocks) is detected from its
weights by ComfyUI ≥ 0.3.65 (checked on 0.33.0); 0.3.64 hard-codes FLUX.1's width, so there the model is built
from an explicit config. The CLIP is ComfyUI's FLUX.1 text encoder pair (CLIP-L + T5-XXL) with tiny configs.
"""

import importlib
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import canonical_shapes, import_pack

from lora_ops.testing.tiny_flux import tiny_flux_bfl_state_dict

pack = import_pack()
ours = pack.nodes
host = importlib.import_module(pack.__name__ + ".nodes.comfy_host")
P = SimpleNamespace(**{name: importlib.import_module(f"{pack.__name__}.lora_ops.{name}")
                       for name in ("families", "formats", "fused", "lora", "files", "errors")})
fixtures = importlib.import_module(pack.__name__ + ".lora_ops.testing.fixtures")
FLUX = P.families.get("flux1")

TOL = 1e-5  # max |ours − native| / max |native| per patched weight (fp32 MODEL; seen: 0.0)
FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                   hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56],
                   theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
TINY_CLIP_L = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
               "projection_dim": 32}
TINY_T5 = {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2, "vocab_size": 64}
TE_LAYERS = ("te1.text_model.encoder.layers.0.self_attn.q_proj", "te1.text_model.encoder.layers.1.mlp.fc1",
             "te3.encoder.block.0.layer.0.SelfAttention.q", "te3.encoder.block.1.layer.1.DenseReluDense.wi_0")
LINEAR1 = "diffusion_model.single_blocks.0.linear1.weight"
SAME_FAMILY = r"LoRA layers matched \(100%\); FLUX\.1 LoRA on a FLUX\.1 model\."


def detects_tiny_flux(comfy) -> bool:
    """ComfyUI reads FLUX.1's width from the weights since 0.3.65; 0.3.64 hard-codes 3072."""
    return tuple(int(x) for x in comfy.version.split(".")[:3]) >= (0, 3, 65)


@pytest.fixture(scope="module")
def flux_sd():
    return tiny_flux_bfl_state_dict(seed=0)


@pytest.fixture(scope="module")
def shapes(flux_sd):
    """Canonical key → weight shape: every 2-D weight of the tiny FLUX.1, and a few text-encoder weights."""
    out = {"unet." + k.removesuffix(".weight"): tuple(v.shape) for k, v in flux_sd.items()
           if k.endswith(".weight") and v.ndim == 2}
    assert all(FLUX.knows(k.removeprefix("unet.")) for k in out)
    te = {"te1.text_model.encoder.layers.1.mlp.fc1": (128, 32), "te3.encoder.block.1.layer.1.DenseReluDense.wi_0":
          (64, 32)}
    return {**out, **{k: te.get(k, (32, 32)) for k in TE_LAYERS}}


def clip_weights(clip):
    """Random weights for ComfyUI's FLUX.1 CLIP (layer norms 1, biases 0), in its state dict's names."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, tensor in clip.cond_stage_model.state_dict().items():
        if tensor.ndim >= 2:
            out[name] = torch.randn(tensor.shape, generator=gen) * 0.1
        else:
            out[name] = torch.ones(tensor.shape) if name.endswith(".weight") else torch.zeros(tensor.shape)
    return out


@pytest.fixture
def flux(comfy, flux_sd):
    """Factories for a fresh tiny FLUX.1 MODEL and CLIP (CLIP-L + T5-XXL), and an SDXL MODEL for the wrong family."""
    c = comfy.comfy
    mm = c.model_management

    def patcher(base):
        return c.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())

    def model():
        if detects_tiny_flux(comfy):
            new = c.sd.load_diffusion_model_state_dict(dict(flux_sd), model_options={"dtype": torch.float32})
            assert type(new.model.model_config).__name__ == "Flux"
            return new
        config = c.supported_models.Flux(dict(FLUX_CONFIG))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({}, "", device=mm.get_torch_device())
        sd = dict(flux_sd)
        base.load_model_weights(sd, "")
        assert not sd, f"weights not loaded: {sorted(sd)[:3]}"
        return patcher(base)

    def clip():
        flux_te = importlib.import_module("comfy.text_encoders.flux")
        target = c.supported_models_base.ClipTarget(flux_te.FluxTokenizer, flux_te.flux_clip())
        new = c.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(TINY_CLIP_L),
                                                      "t5xxl_model_config": dict(TINY_T5)})
        missing, unexpected = new.load_sd(clip_weights(new), full_model=True)
        assert not missing and not unexpected, (missing, unexpected)
        return new

    def sdxl():
        from lora_ops import keymap
        from lora_ops.testing import tiny

        sd = {f"{keymap.unet_diffusers_to_ldm(n.rsplit('.', 1)[0], 'sdxl')}.{n.rsplit('.', 1)[1]}": t.detach().clone()
              for n, t in tiny.tiny_unet("sdxl").state_dict().items()}
        config = c.supported_models.SDXL(c.model_detection.detect_unet_config(sd, ""))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model(sd, "")
        base.load_model_weights(sd, "")
        return patcher(base)

    return SimpleNamespace(model=model, clip=clip, sdxl=sdxl)


def flux_lora(shapes, *, seed=0, rank=4, alpha=2.0, te=True, keep=None):
    """A random canonical FLUX.1 LoRA (a pack value) on every weight of ``shapes`` (or those ``keep`` accepts)."""
    chosen = {k: s for k, s in shapes.items() if (te or k.startswith("unet.")) and (keep is None or keep(k))}
    return fixtures.random_lora(chosen, rank=rank, alpha=alpha, family="flux1", seed=seed)


def read(tensors, name="lora.safetensors", metadata=None):
    lora, unused = P.formats.read_lora(dict(tensors), metadata, file=name)
    assert unused == [], unused[:3]
    return lora


def weight_diff(a, b, keys=None):
    """max over patched weights of max |a − b| / max |b| (the two patchers must patch the same weights)."""
    wa, wb = host.patched_weights(a), host.patched_weights(b)
    assert set(wa) == set(wb), sorted(set(wa) ^ set(wb))[:5]
    assert wb and (keys is None or set(wb) == set(keys))
    return max(((wa[k].double() - wb[k].double()).abs().max() / wb[k].double().abs().max()).item() for k in wb)


def n_patches(patcher):
    return sum(len(v) for v in patcher.patches.values())


def assert_changes_every_weight(patcher):
    state = patcher.model_state_dict()
    for key, w in host.patched_weights(patcher).items():
        assert not torch.equal(w, state[key]), f"{key} unchanged"


# ---------------------------------------------------------------------------------------------- family, targets


def test_the_model_is_flux1_from_its_weights_and_the_clip_has_t5(comfy, flux):
    model, clip = flux.model(), flux.clip()
    unet = host.unet_targets(model)
    assert unet["unet.single_blocks.0.linear1"] == (7 * 128, 128)
    assert host.model_family(model) == "flux1"
    targets = host.clip_targets(clip, "flux1")
    assert targets["te3.encoder.block.0.layer.0.SelfAttention.q"] == (32, 32)
    assert targets["te1.text_model.encoder.layers.0.self_attn.q_proj"] == (32, 32)
    assert {k.split(".", 1)[0] for k in targets} == {"te1", "te3"}
    assert host._patch_key("unet.single_blocks.0.linear1[mlp]") == LINEAR1
    assert host._patch_key("te3.encoder.block.0.layer.0.SelfAttention.q", "flux1") == (
        "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight")

    # A ComfyUI FLUX.1 config decides when the weight names do not (e.g. a model holding no telling weight).
    config = comfy.comfy.supported_models
    for cls in ("Flux", "FluxSchnell"):
        silent = SimpleNamespace(model=SimpleNamespace(model_config=getattr(config, cls)(dict(FLUX_CONFIG))),
                                 model_state_dict=dict)
        assert host.model_family(silent) == "flux1"


def test_comfyui_detects_the_tiny_flux_and_so_do_we(comfy, flux_sd):
    if not detects_tiny_flux(comfy):
        pytest.skip(f"ComfyUI {comfy.version} hard-codes FLUX.1's width (detected since 0.3.65)")
    model = comfy.comfy.sd.load_diffusion_model_state_dict(dict(flux_sd), model_options={"dtype": torch.float32})
    assert type(model.model.model_config).__name__ == "Flux"
    assert host.model_family(model) == "flux1"


# ---------------------------------------------------------------------------------------------- against native


def test_kohya_lora_equals_native_on_model_and_both_text_encoders(comfy, flux, shapes, caplog):
    model, clip = flux.model(), flux.clip()
    lora = flux_lora(shapes, alpha=2.0)  # alpha ≠ rank: the file's alphas must be read alike
    tensors, metadata = P.formats.write_lora(lora.replace(metadata={"ss_network_dim": "4"}), "kohya")
    n_unet = sum(k.startswith("unet.") for k in lora.layers)

    native_model, native_clip = comfy.comfy.sd.load_lora_for_models(model, clip, dict(tensors), 0.8, 0.6)
    assert n_patches(native_model) == n_unet and n_patches(native_clip.patcher) == len(TE_LAYERS)  # it took all

    caplog.clear()
    new_model, new_clip, text = ours.LoraOpsApply().apply(model, read(tensors, metadata=metadata), 0.8, 0.6,
                                                          clip=clip)
    assert re.fullmatch(f"{len(lora.layers)} of {len(lora.layers)} {SAME_FAMILY}", text), text
    assert not model.patches and not clip.patcher.patches  # the inputs are untouched
    assert weight_diff(new_model, native_model) <= TOL
    assert weight_diff(new_clip.patcher, native_clip.patcher) <= TOL  # fp16 T5/CLIP-L: rounded alike
    assert "t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight" in new_clip.patcher.patches
    assert_changes_every_weight(new_model)
    assert "not loaded" not in caplog.text.lower()  # ComfyUI consumed every tensor of our key map
    if host._takes_metadata():  # ComfyUI ≥ 0.3.65 attaches the file's metadata to the clones, and so do we
        for patcher in (new_model, new_clip.patcher):
            assert patcher.get_attachment("lora_metadata")["ss_network_dim"] == "4"


def test_diffusers_lora_equals_native_with_row_offsets(comfy, flux, shapes, loras_dir):
    model = flux.model()
    lora = flux_lora(shapes, rank=4, alpha=4.0, te=False)  # diffusers files carry alpha only in metadata
    P.files.save_lora(lora, loras_dir / "flux_diffusers.safetensors", "diffusers", overwrite=True)
    (native,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, "flux_diffusers.safetensors", 0.7)
    loaded = ours.LoraOpsLoad().load("flux_diffusers.safetensors")[0]
    assert "unet.single_blocks.0.linear1[mlp]" in loaded.layers
    assert n_patches(native) == len(loaded.layers)  # ComfyUI reads this spelling fully, with offsets

    new_model, _, report = host.apply_lora(model, None, loaded, 0.7, 0.0)
    assert weight_diff(new_model, native) <= TOL
    offsets = sorted(p[3] for p in new_model.patches[LINEAR1])
    assert offsets == [(0, 0, 128), (0, 128, 128), (0, 256, 128), (0, 384, 512)]  # q, k, v, mlp rows
    assert sorted(p[3] for p in native.patches[LINEAR1]) == offsets

    # The report counts layers per part and per whole weight, under their canonical keys.
    assert {"unet.single_blocks.0.linear1[mlp]", "unet.double_blocks.1.txt_attn.qkv[v]",
            "unet.single_blocks.1.linear2", "unet.final_layer.adaLN_modulation.1"} <= set(report.matched)
    n = len(loaded.layers)
    assert re.fullmatch(f"{n} of {n} {SAME_FAMILY}", report.summary()), report.summary()
    assert n == len(shapes) - len(TE_LAYERS) + 2 * 2 * 2 + 2 * 3  # qkv: 3 parts, linear1: 4 parts

    # Parts of a block the model lacks are reported by block, and the rest still applies.
    extra = {f"unet.single_blocks.5.linear1[{p}]": loaded.layers[f"unet.single_blocks.0.linear1[{p}]"]
             for p in ("q", "mlp")}
    partial = loaded.replace(layers={**loaded.layers, **extra})
    _, _, report = host.apply_lora(model, None, partial, 0.7, 0.0)
    assert report.unmatched == {"unet.single_blocks.*": tuple(extra)}
    assert report.summary().endswith("Not in the model: unet.single_blocks.*: 2 layers."), report.summary()


def _xlabs(shapes, seed=3, rank=4):
    """An XLabs file (attention processors, no alpha) and its kohya equivalent, written independently."""
    gen = torch.Generator().manual_seed(seed)
    xlabs, kohya = {}, {}

    def add(xname, kname, out, inp, pad=0):
        down, up = torch.randn(rank, inp, generator=gen) * 0.1, torch.randn(out, rank, generator=gen) * 0.1
        xlabs.update({f"{xname}.down.weight": down, f"{xname}.up.weight": up})
        full_up = torch.cat([up, torch.zeros(pad, rank)]) if pad else up
        kohya.update({f"lora_unet_{kname}.lora_down.weight": down, f"lora_unet_{kname}.lora_up.weight": full_up})

    h = shapes["unet.img_in"][0]
    for i in range(2):
        for n, stream in (("1", "img"), ("2", "txt")):
            add(f"double_blocks.{i}.processor.qkv_lora{n}", f"double_blocks_{i}_{stream}_attn_qkv", 3 * h, h)
            add(f"double_blocks.{i}.processor.proj_lora{n}", f"double_blocks_{i}_{stream}_attn_proj", h, h)
        add(f"single_blocks.{i}.processor.qkv_lora", f"single_blocks_{i}_linear1", 3 * h, h, pad=4 * h)  # no mlp
    # (x-flux's single-block proj_lora acts on linear2's h-wide output, not on its 5h-wide input: left out.)
    return xlabs, kohya


def _bare(lora, prefix):
    """DiffSynth's bare diffusers names (``transformer_blocks.0.attn.to_q``), under ``prefix``."""
    tensors, _ = P.formats.write_lora(lora, "diffusers")
    return {prefix + k.removeprefix("transformer."): v for k, v in tensors.items()}


@pytest.mark.parametrize("spelling", ["xlabs", "diffsynth-bare", "comfyui-diffusers-names"])
def test_spellings_comfyui_drops_equal_native_on_their_kohya_equivalent(comfy, flux, shapes, spelling):
    model = flux.model()
    if spelling == "xlabs":
        tensors, kohya = _xlabs(shapes)
    else:
        lora = flux_lora(shapes, seed=1, alpha=4.0, te=False)  # alpha = rank: these spellings carry none
        tensors = _bare(lora, "" if spelling == "diffsynth-bare" else "diffusion_model.")
        kohya, _ = P.formats.write_lora(lora, "kohya")
    ref = comfy.comfy.sd.load_lora_for_models(model, None, dict(kohya), 0.9, 0.0)[0]
    loaded = read(tensors, f"{spelling}.safetensors")
    assert loaded.family == "flux1"
    new_model, _, report = host.apply_lora(model, None, loaded, 0.9, 0.0)
    assert report.fraction == 1.0
    assert weight_diff(new_model, ref) <= TOL
    assert_changes_every_weight(new_model)


def test_lycoris_and_dora_layers_equal_native(comfy, flux, shapes):
    gen = torch.Generator().manual_seed(4)
    h = shapes["unet.img_in"][0]

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.1

    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": rnd(3, 4),  # LoKr on a fused weight, kept whole
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": rnd(h, h // 4),
        "lora_unet_single_blocks_1_linear2.hada_w1_a": rnd(h, 2), "lora_unet_single_blocks_1_linear2.hada_w1_b":
            rnd(2, 5 * h), "lora_unet_single_blocks_1_linear2.hada_w2_a": rnd(h, 2),
        "lora_unet_single_blocks_1_linear2.hada_w2_b": rnd(2, 5 * h), "lora_unet_single_blocks_1_linear2.alpha":
            torch.tensor(1.0),
        "lora_unet_double_blocks_1_img_attn_proj.lora_down.weight": rnd(4, h),  # DoRA
        "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": rnd(h, 4),
        "lora_unet_double_blocks_1_img_attn_proj.alpha": torch.tensor(2.0),
        "lora_unet_double_blocks_1_img_attn_proj.dora_scale": 1 + rnd(h, 1),
    }
    model = flux.model()
    native = comfy.comfy.sd.load_lora_for_models(model, None, dict(tensors), 1.0, 0.0)[0]
    assert n_patches(native) == 3
    new_model, _, _ = ours.LoraOpsApply().apply(model, read(tensors), 1.0, 1.0)
    assert weight_diff(new_model, native) <= TOL
    assert_changes_every_weight(new_model)


# ---------------------------------------------------------------------------------------------- merge, load


def test_merge_and_unload_and_comfyuis_own_load_equal_apply(comfy, flux, shapes):
    model, clip = flux.model(), flux.clip()
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    parts = P.fused.split(flux_lora(shapes, seed=2))  # q/k/v/mlp part layers: several offset patches per weight
    assert "unet.double_blocks.0.txt_attn.qkv[k]" in parts.layers
    applied, applied_clip, _ = ours.LoraOpsApply().apply(model, parts, 0.8, 1.2, clip=clip)
    assert len(applied.patches[LINEAR1]) == 4
    want = host.patched_weights(applied)

    merged, merged_clip = ours.LoraOpsMergeUnload().merge(applied, applied_clip)
    assert {p[1][0] for patches in merged.patches.values() for p in patches} == {"set"}
    got = host.patched_weights(merged)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert weight_diff(merged_clip.patcher, applied_clip.patcher) == 0.0

    # ComfyUI's own full load (patch_model) puts exactly these weights into the module, and unpatching restores it.
    applied.patch_model()
    try:
        state = applied.model.state_dict()
        assert all(torch.equal(state[k], want[k]) for k in want)
    finally:
        applied.unpatch_model()
    assert all(torch.equal(v, base[k]) for k, v in model.model_state_dict().items())
    assert not model.patches


def test_stacked_loras_equal_native_applied_in_turn(comfy, flux, shapes):
    model = flux.model()
    a = flux_lora(shapes, seed=5, te=False)
    b = P.fused.split(flux_lora(shapes, seed=6, alpha=1.0, te=False, keep=lambda k: "blocks" in k))
    native = model
    for lora, s in ((a, 0.5), (b, -0.7)):
        native = comfy.comfy.sd.load_lora_for_models(native, None, P.formats.write_lora(lora, "kohya")[0], s, 0)[0]
    stacked, _, report = host.apply_loras(model, None, [(a, 0.5, 0.0), (b, -0.7, 0.0)])
    assert weight_diff(stacked, native) <= TOL
    assert report.summary().count("(100%)") == 2


# ---------------------------------------------------------------------------------------------- wrong family


def test_a_wrong_family_lora_is_one_clear_error_both_ways(flux, shapes):
    flux_model, sdxl_model = flux.model(), flux.sdxl()
    assert host.model_family(sdxl_model) == "sdxl"
    with pytest.raises(P.errors.LoraValueError) as err:
        ours.LoraOpsApply().apply(sdxl_model, flux_lora(shapes, te=False), 1.0, 1.0)
    assert re.search(r"this looks like a FLUX\.1 LoRA, the model is SDXL", str(err.value)), str(err.value)

    sdxl = fixtures.random_lora(canonical_shapes("sdxl", attention_only=True), family="sdxl")
    with pytest.raises(P.errors.LoraValueError) as err:
        ours.LoraOpsApply().apply(flux_model, sdxl, 1.0, 1.0)
    assert "this looks like an SDXL LoRA, the model is FLUX.1" in str(err.value), str(err.value)
    assert not flux_model.patches and not sdxl_model.patches
