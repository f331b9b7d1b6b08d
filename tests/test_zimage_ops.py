"""Z-Image through every operation: the diffusers host, diffusers' own LoRA loader, bake and extract.

The tiny model is diffusers' ``ZImageTransformer2DModel`` with the family's tiny config and seeded random weights
(built here). Its weights have two spellings: the official/diffusers names (``layers.0.attention.to_q``, separate
q, k, v) and ComfyUI's internal names (``layers.0.attention.qkv`` = [q; k; v], ``attention.out``, ``x_embedder``,
``final_layer``), which are the canonical keys. The reference for every ΔW is independent of lora_ops' tables:
LoRA deltas are placed in ComfyUI names (part rows from the config's ``dim``) and converted to diffusers names by
diffusers' own single-file converter ``convert_z_image_transformer_checkpoint_to_diffusers``, which the first test
checks against the model's state dict.

diffusers' converter for non-diffusers Z-Image LoRAs (``_convert_non_diffusers_z_image_lora_to_diffusers``) reads
our kohya files (fused ``lora_unet_layers_0_attention_qkv``: it splits them) and musubi-style files
(``lora_unet_layers_0_attention_to_q``) exactly, but it has no mapping for the ComfyUI names of the embedder and
final layer (kohya ``lora_unet_x_embedder``, ``lora_unet_final_layer_linear``, ``…_final_layer_adaLN_modulation_1``
come out as ``x.embedder`` / ``final.layer.*`` and are reported as unexpected keys), and our comfyui-format file
(``diffusion_model.layers.0.attention.qkv.lora_down``) keeps its fused ``qkv``, which the diffusers model does not
have; those two cases are left out here (see the interop tests below for what is checked).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from test_bake import assert_within_ulp, load, no_temp_files, raw
from test_hosts_flux1 import REL, TOL, assert_deltas, flux_lora, moved, no_hooks, same_state, state
from test_interop_flux1 import complaints

from lora_ops import families, fused
from lora_ops import lora as L
from lora_ops.bake import bake
from lora_ops.errors import LoraFileError, LoraFormatError, LoraValueError
from lora_ops.extract import extract
from lora_ops.files import load_lora, save_lora
from lora_ops.hosts import DiffusersHost, LoraHost
from lora_ops.keymap import checkpoint_family, checkpoint_targets
from lora_ops.keymap.model_keys import denoiser_canonical_keys
from lora_ops.testing.tiny_flux import save_bfl_checkpoint, tiny_flux_bfl_state_dict, tiny_flux_transformer

FAMILY = families.get("zimage")
CFG = dict(FAMILY.tiny_config)
DIM = int(CFG["dim"])
PREFIX = "model.diffusion_model."
QKV_ROWS = {"q": slice(0, DIM), "k": slice(DIM, 2 * DIM), "v": slice(2 * DIM, 3 * DIM)}
LAYOUTS = pytest.mark.parametrize(("layout", "prefix"), [("comfy", PREFIX), ("comfy", ""), ("official", ""),
                                                         ("official", PREFIX)],
                                  ids=["comfy-prefixed", "comfy-top", "official-top", "official-prefixed"])


# ------------------------------------------------------------------------------------------------ the tiny model


@functools.cache
def _weights(seed: int) -> dict[str, torch.Tensor]:
    """The tiny model's state dict (diffusers names) with seeded random values: Linear weights ~ 1/√fan-in, norm
    scales near 1, small biases and pad tokens."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in ZImageTransformer2DModel(**CFG).state_dict().items():
        noise = torch.randn(t.shape, generator=g)
        if t.ndim == 2:
            out[name] = noise * t.shape[1] ** -0.5
        elif name.endswith(".weight"):
            out[name] = 1.0 + 0.1 * noise
        else:
            out[name] = 0.02 * noise
    return out


def official_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _weights(seed).items()}


def tiny_zimage(seed: int = 0, dtype: torch.dtype = torch.float32) -> ZImageTransformer2DModel:
    model = ZImageTransformer2DModel(**CFG)
    model.load_state_dict(_weights(seed))
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def zimage_forward(model: ZImageTransformer2DModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    dtype = next(model.parameters()).dtype
    x = [torch.randn(CFG["in_channels"], 1, 8, 8, generator=g).to(dtype)]  # (C, F, H, W)
    cap = [torch.randn(7, CFG["cap_feat_dim"], generator=g).to(dtype)]
    with torch.no_grad():
        return model(x, torch.tensor([0.3]), cap, return_dict=False)[0][0].float()


_TO_COMFY = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."),
             (".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
             (".attention.norm_k.", ".attention.k_norm."))  # fmt: skip


def diffusers_to_comfy(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers/official state dict in ComfyUI's internal names: q, k, v stacked into ``attention.qkv``."""
    out = {}
    for name, t in sd.items():
        m = re.fullmatch(r"(.+\.attention)\.to_([qkv])\.weight", name)
        if m is not None:
            if m.group(2) == "q":
                out[f"{prefix}{m.group(1)}.qkv.weight"] = torch.cat([sd[f"{m.group(1)}.to_{p}.weight"] for p in "qkv"])
            continue
        for old, new in _TO_COMFY:
            name = name.replace(old, new)
        out[prefix + name] = t
    return out


def comfy_shapes() -> dict[str, tuple[int, int]]:
    """ComfyUI module path → (out, in) of every Linear weight (the canonical targets)."""
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in diffusers_to_comfy(_weights(0)).items()
            if k.endswith(".weight") and v.ndim == 2}  # fmt: skip


def to_diffusers_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI names → diffusers names by diffusers' own converter (the independent reference)."""
    return convert_z_image_transformer_checkpoint_to_diffusers(dict(sd))


def lay(out: int, inp: int, rank: int, alpha: float | None, g: torch.Generator, scale: float = 0.2) -> L.LoRALayer:
    return L.LoRALayer(torch.randn(rank, inp, generator=g) * scale, torch.randn(out, rank, generator=g) * scale,
                       alpha=alpha)


def zimage_lora(seed: int = 0, modules=None, exclude=()) -> L.LoRA:
    """A random LoRA on every (or the given) ComfyUI-named weight; ranks 1–4 and alphas differ per layer."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (path, (out, inp)) in enumerate(sorted(comfy_shapes().items())):
        if (modules is not None and path not in modules) or path in exclude:
            continue
        layers[f"unet.{path}"] = lay(out, inp, 1 + i % 4, 0.5 + i % 3 if i % 5 else None, g)
    return L.LoRA(layers, family="zimage")


def comfy_deltas(items) -> dict[str, torch.Tensor]:
    """ComfyUI tensor name → Σ s·ΔW (fp64) of every Linear weight, zero where no layer is; part rows from DIM."""
    acc = {k + ".weight": torch.zeros(s, dtype=torch.float64) for k, s in comfy_shapes().items()}
    for lora, sm, _st in items:
        for key, layer in lora.layers.items():
            module, part = re.fullmatch(r"unet\.(.+?)(?:\[(\w)\])?", key).groups()
            rows = QKV_ROWS[part] if part is not None else slice(None)
            w = acc[module + ".weight"]
            w[rows] += sm * layer.delta(torch.float64).reshape(w[rows].shape)
    return acc


def reference_deltas(lora: L.LoRA) -> dict[str, torch.Tensor]:
    """diffusers module path → ΔW (fp64) of every Linear of the model."""
    return {k.removesuffix(".weight"): v for k, v in to_diffusers_names(comfy_deltas([(lora, 1.0, 1.0)])).items()}


def musubi_file(lora: L.LoRA, path: Path) -> Path:
    """musubi-tuner's spelling: kohya flattening of the diffusers names (``lora_unet_layers_0_attention_to_q``)."""
    sd = {}
    for key, layer in fused.split(lora).layers.items():
        module, part = fused.parse_key(key)
        name = "lora_unet_" + FAMILY.to_diffusers(module.removeprefix("unet."), part).replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = layer.down.contiguous(), layer.up.contiguous()
        if layer.alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(layer.alpha))
    safetensors.torch.save_file(sd, str(path))
    return path


# ----------------------------------------------------------------------------------- names, family, targets


def test_comfy_layout_matches_diffusers_converter_and_both_layouts_are_zimage():
    sd = official_weights()
    for prefix in ("", PREFIX):
        comfy = diffusers_to_comfy(sd, prefix)
        back = to_diffusers_names(comfy)
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)  # our fixture is right
        assert checkpoint_family(comfy) == "zimage"
        assert checkpoint_family({prefix + k: v for k, v in sd.items()}) == "zimage"
    assert checkpoint_family(["layers.0.attention.to_q.weight"]) == "zimage"
    assert checkpoint_family(["model.diffusion_model.layers.3.attention.qkv.weight"]) == "zimage"
    assert checkpoint_family(["layers.0.attention.norm_q.weight"]) is None  # no Linear: no evidence


@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["top-level", "prefixed"])
def test_checkpoint_targets_of_both_layouts(prefix):
    sd = official_weights()
    comfy = diffusers_to_comfy(sd, prefix)
    whole = checkpoint_targets(comfy, "zimage")
    assert set(whole) == {f"unet.{p}" for p in comfy_shapes()}  # every Linear weight, whole
    for key, slot in whole.items():
        assert slot.tensor == f"{prefix}{key.removeprefix('unet.')}.weight" and slot.chunk is None
    official = {prefix + k: v for k, v in sd.items()}
    split = checkpoint_targets(official, "zimage")
    linears = {k for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2}
    assert {s.tensor for s in split.values()} == {prefix + k for k in linears}
    assert split["unet.layers.0.attention.qkv[q]"].tensor == f"{prefix}layers.0.attention.to_q.weight"
    assert split["unet.context_refiner.0.attention.qkv[v]"].tensor == f"{prefix}context_refiner.0.attention.to_v.weight"
    assert split["unet.layers.1.attention.out"].tensor == f"{prefix}layers.1.attention.to_out.0.weight"
    assert split["unet.x_embedder"].tensor == f"{prefix}all_x_embedder.2-1.weight"
    final = split["unet.final_layer.adaLN_modulation.1"]
    assert final.tensor == f"{prefix}all_final_layer.2-1.adaLN_modulation.1.weight"
    assert split["unet.layers.0.feed_forward.w1"].tensor == f"{prefix}layers.0.feed_forward.w1.weight"  # shared name
    assert {fused.parse_key(k)[0] for k in split} == set(whole)
    # an all-in-one file: Qwen3 text encoder and VAE beside the transformer are no targets and no evidence
    extra = {"text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
             "text_encoders.qwen3_4b.transformer.model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4),
             "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2, 3, 3)}  # fmt: skip
    for stored, want in ((comfy, whole), (official, split)):
        assert checkpoint_family({**stored, **extra}) == "zimage"
        assert checkpoint_targets({**stored, **extra}, "zimage") == want
    # one weight in both spellings is two copies
    with pytest.raises(LoraFormatError, match="two tensors hold the same weight"):
        checkpoint_targets(["layers.0.attention.qkv.weight", "layers.0.attention.to_k.weight"], "zimage")
    with pytest.raises(LoraFormatError, match="two tensors hold the same weight"):
        checkpoint_targets(["x_embedder.weight", "all_x_embedder.2-1.weight"], "zimage")


# -------------------------------------------------------------------------------------------- diffusers host


def test_live_model_keys_and_shared_names():
    model = tiny_zimage()
    keys = denoiser_canonical_keys(model)
    assert keys == denoiser_canonical_keys(model, "zimage")  # detected from the module names
    assert keys["unet.layers.0.attention.qkv[q]"] == "layers.0.attention.to_q"
    assert keys["unet.noise_refiner.0.attention.qkv[v]"] == "noise_refiner.0.attention.to_v"
    assert keys["unet.layers.1.attention.out"] == "layers.1.attention.to_out.0"
    assert keys["unet.x_embedder"] == "all_x_embedder.2-1"
    assert keys["unet.final_layer.linear"] == "all_final_layer.2-1.linear"
    assert keys["unet.layers.0.adaLN_modulation.0"] == "layers.0.adaLN_modulation.0"
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(keys.values()) == sorted(linears)
    # names both spellings share are original names; either spelling maps to the canonical module
    for shared in ("layers.0.feed_forward.w1", "noise_refiner.0.adaLN_modulation.0", "cap_embedder.1",
                   "t_embedder.mlp.2"):
        assert not FAMILY.is_diffusers_path(shared) and FAMILY.denoiser_path(shared) == (shared, None)
    assert FAMILY.is_diffusers_path("layers.0.attention.to_q")
    assert FAMILY.denoiser_path("layers.0.attention.to_q") == ("layers.0.attention.qkv", "q")
    assert FAMILY.denoiser_path("layers.0.attention.qkv") == ("layers.0.attention.qkv", None)

    host = DiffusersHost(model)
    assert isinstance(host, LoraHost) and host.family == "zimage"
    assert {k.removeprefix("unet."): v for k, v in host.targets().items()} == comfy_shapes()  # whole qkv (3d, d)
    assert host.module("unet.layers.0.attention.qkv[k]") is model.layers[0].attention.to_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apply_merge_unmerge(dtype):
    lora = zimage_lora(seed=1)
    model = tiny_zimage(dtype=dtype)
    host = DiffusersHost(model)
    base_state, base = state(model), zimage_forward(model)
    report = host.apply([(lora, 0.7, 1.0)])
    assert report.fraction == 1.0  # every qkv layer split into q, k, v: one module each
    assert len(report.matched) == len(lora) + 2 * 4 and "unet.layers.0.attention.qkv[v]" in report.matched
    assert same_state(state(model), base_state)  # applying touches no weight
    applied = zimage_forward(model)
    assert (applied - base).abs().max().item() > 1e-2
    host.merge()
    want = reference_deltas(lora)
    if dtype == torch.float32:
        assert (zimage_forward(model) - applied).abs().max().item() <= TOL  # merged = applied
        assert assert_deltas(moved(model, base_state, 0.7), want) <= REL
    else:  # cast(W + 0.7·ΔW) from fp32: within one bf16 ulp of the fp64 value
        for name, w in model.state_dict().items():
            path = name.removesuffix(".weight")
            if path in want:
                exact = base_state[name].double() + 0.7 * want[path]
                assert bool(((w.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()), name
    host.unmerge()
    assert same_state(state(model), base_state)  # bit for bit
    assert torch.equal(zimage_forward(model), applied)  # hooks active again
    host.remove()
    assert no_hooks(model) and torch.equal(zimage_forward(model), base)


def test_kohya_fused_and_diffusers_split_spellings_merge_the_same(tmp_path):
    lora = zimage_lora(seed=2)
    split = fused.split(lora)
    assert "unet.layers.0.attention.qkv[q]" in split.layers and "unet.layers.0.attention.qkv" not in split.layers
    spelled = {fmt: load_lora(save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt))
               for fmt in ("kohya", "comfyui", "diffusers", "peft")}  # fmt: skip
    spelled["split"] = split
    spelled["musubi"] = load_lora(musubi_file(lora, tmp_path / "musubi.safetensors"))
    names = set(safetensors.torch.load_file(str(tmp_path / "kohya.safetensors")))
    assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in names
    assert "lora_unet_noise_refiner_0_feed_forward_w2.lora_up.weight" in names
    want = reference_deltas(lora)
    merged = {}
    for name, read in spelled.items():
        assert read.family == "zimage", name
        assert fused.has_parts(read) == (name in ("split", "musubi", "diffusers", "peft")), name
        model = tiny_zimage()
        before = state(model)
        host = DiffusersHost(model)
        assert host.apply([(read, 1.0, 1.0)]).fraction == 1.0, name
        host.merge()
        merged[name] = moved(model, before, 1.0)
        host.remove()
        assert assert_deltas(merged[name], want) <= REL, name
    for deltas in merged.values():
        assert_deltas(deltas, merged["kohya"])


def test_wrong_family_is_one_clear_error():
    zimage = zimage_lora(seed=3)
    flux = flux_lora(seed=3)
    model = tiny_zimage()
    host = DiffusersHost(model)
    for lora in (flux, flux.replace(family=None)):  # its family, or what its keys say
        with pytest.raises(LoraValueError, match=r"looks like a FLUX\.1 LoRA, the model is Z-Image"):
            host.apply([(zimage, 1.0, 1.0), (lora, 1.0, 1.0)])
    assert no_hooks(model)  # nothing applied, not even the good first item
    flux_model = tiny_flux_transformer()
    flux_host = DiffusersHost(flux_model)
    for lora in (zimage, zimage.replace(family=None)):
        with pytest.raises(LoraValueError, match=r"looks like a Z-Image LoRA, the model is FLUX\.1"):
            flux_host.apply([(lora, 1.0, 1.0)])
    assert no_hooks(flux_model)
    with pytest.raises(LoraValueError, match=r"layout is 'zimage' \(Z-Image\)"):
        DiffusersHost(model, family="flux1")
    with pytest.raises(LoraValueError, match=r"layout is 'flux1' \(FLUX\.1\)"):
        DiffusersHost(flux_model, family="zimage")


# ------------------------------------------------------------------------------------ interop with diffusers


def bare_pipeline(transformer):
    """A ZImagePipeline holding only the transformer: load_lora_weights runs its own code, nothing mocked."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def load_in_diffusers(path: Path, route: str = "mixin-calls"):
    """The file loaded by diffusers into a fresh tiny model in a bare pipeline: (model, its weights before, pipe)."""
    from diffusers.loaders import ZImageLoraLoaderMixin

    model = tiny_zimage()
    before = state(model)
    pipe = bare_pipeline(model)
    if route == "pipeline":
        pipe.load_lora_weights(str(path))
    else:  # what ZImagePipeline.load_lora_weights does, call by call
        sd, meta = ZImageLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        assert all(k.startswith("transformer.") for k in sd)
        ZImageLoraLoaderMixin.load_lora_into_transformer(sd, transformer=model, metadata=meta)
    return model, before, pipe


def our_applied_output(lora):
    model = tiny_zimage()
    DiffusersHost(model).apply([(lora, 1.0, 1.0)])
    return zimage_forward(model)


@pytest.mark.parametrize("route", ["pipeline", "mixin-calls"])
def test_diffusers_file_loads_in_diffusers_exactly(tmp_path, warnings_log, route):
    lora = zimage_lora(seed=4)
    assert len({layer.rank for layer in lora.layers.values()}) > 1 and len({layer.alpha for layer in
                                                                               lora.layers.values()}) > 1
    path = save_lora(lora, tmp_path / "zimage.safetensors", "diffusers")
    model, before, pipe = load_in_diffusers(path, route)
    assert not complaints(warnings_log), warnings_log
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_zimage().modules())
    assert sum(hasattr(m, "lora_A") for m in model.modules()) == n_linear  # every Linear got its adapter
    assert (zimage_forward(model) - our_applied_output(lora)).abs().max().item() <= TOL  # PEFT's forward = ours
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert assert_deltas(moved(model, before, 1.0), reference_deltas(lora)) <= REL
    assert not complaints(warnings_log), warnings_log


KNOWN_TO_DIFFUSERS_KOHYA = ("x_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1")


@pytest.mark.parametrize("spelling", ["kohya", "musubi"])
def test_diffusers_own_converter_reads_our_kohya_and_musubi_files(tmp_path, warnings_log, spelling):
    """``_convert_non_diffusers_z_image_lora_to_diffusers``: our kohya file (fused ``attention_qkv``, split by
    diffusers into to_q/to_k/to_v sharing down) and a musubi-style file (diffusers names flattened) load with
    every key used and the same ΔW. kohya's embedder/final-layer names are ComfyUI's, which that converter does not
    map (it would report them as unexpected keys): they are left out of the kohya file."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    if spelling == "kohya":
        lora = zimage_lora(seed=5, exclude=KNOWN_TO_DIFFUSERS_KOHYA)
        path = save_lora(lora, tmp_path / "k.safetensors", "kohya")
        keys = set(safetensors.torch.load_file(str(path)))
        assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in keys
        assert "lora_unet_context_refiner_0_attention_qkv.alpha" in keys  # alphas too (layers.0's is None)
    else:
        lora = zimage_lora(seed=6)
        path = musubi_file(lora, tmp_path / "m.safetensors")
        keys = set(safetensors.torch.load_file(str(path)))
        assert "lora_unet_layers_0_attention_to_q.lora_down.weight" in keys
        assert "lora_unet_all_x_embedder_2-1.lora_up.weight" in keys
    converted = _convert_non_diffusers_z_image_lora_to_diffusers(safetensors.torch.load_file(str(path)))
    assert "transformer.layers.0.attention.to_q.lora_A.weight" in converted
    model, before, pipe = load_in_diffusers(path)
    assert not complaints(warnings_log), warnings_log
    want = reference_deltas(lora)
    patched = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert patched == {n for n, d in want.items() if d.abs().max() > 0}  # exactly the modules the LoRA has
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    assert assert_deltas(moved(model, before, 1.0), want) <= REL
    assert load_lora(path).family == "zimage"


# ---------------------------------------------------------------------------------------------------- bake


def write_ckpt(path: Path, layout: str, prefix: str, dtype: torch.dtype, sd=None) -> Path:
    """The tiny model as a single file: ``comfy`` (fused qkv, ComfyUI names) or ``official`` (diffusers names)."""
    sd = {k: v.to(dtype) for k, v in (sd if sd is not None else official_weights()).items()}
    stored = diffusers_to_comfy(sd, prefix) if layout == "comfy" else {prefix + k: v for k, v in sd.items()}
    safetensors.torch.save_file(stored, str(path), metadata={"modelspec.title": "tiny z-image"})
    return path


def expected_bake(base: dict[str, torch.Tensor], layout: str, prefix: str, items) -> dict[str, torch.Tensor]:
    """Stored name → cast(W + Σ s·ΔW) computed in fp64 and rounded once, for every tensor a layer touches.

    The fp64 sum is formed in ComfyUI names (part rows from DIM) and, for the official layout, converted by
    diffusers' converter (exact row chunks), so the reference uses none of lora_ops' name tables."""
    dtype = next(iter(base.values())).dtype
    comfy = {k: v.double() for k, v in diffusers_to_comfy(base).items()}
    delta = comfy_deltas(items)
    acc = {k: w + delta[k] if k in delta else w for k, w in comfy.items()}
    if layout == "official":
        acc, delta = to_diffusers_names(acc), to_diffusers_names(delta)
    return {prefix + k: acc[k].to(dtype) for k, d in delta.items() if d.abs().max() > 0}


def check_baked(out: Path, ckpt: Path, base, layout: str, prefix: str, items) -> dict[str, torch.Tensor]:
    expected = expected_bake(base, layout, prefix, items)
    got, stored = load(out), load(ckpt)
    assert set(got) == set(stored)
    raw_in, raw_out = raw(ckpt), raw(out)
    for name, t in got.items():
        if name in expected:
            assert_within_ulp(t, expected[name], name)
        else:
            assert raw_out[name] == raw_in[name], name  # byte-identical
    return expected


def lycoris_lora(seed: int) -> L.LoRA:
    """LyCORIS layers no split can turn into part layers: a LoHa on a whole qkv, a LoKr on one part of one."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    return L.LoRA({
        "unet.layers.1.attention.qkv": L.LycorisLayer("loha", {"hada_w1_a": rnd(3 * DIM, 2), "hada_w1_b": rnd(2, DIM),
                                                               "hada_w2_a": rnd(3 * DIM, 2), "hada_w2_b": rnd(2, DIM)},
                                                      alpha=1.0),
        "unet.noise_refiner.0.attention.qkv[v]": L.LycorisLayer("lokr", {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(8, 2),
                                                                         "lokr_w2_b": rnd(2, 8)}, alpha=2.0),
    }, family="zimage")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@LAYOUTS
def test_bake_both_layouts(tmp_path, layout, prefix, dtype):
    """kohya (whole qkv), diffusers (part layers, other ranks/alphas) and LyCORIS layers, stacked with strengths:
    on the official layout a whole-qkv layer patches to_q, to_k and to_v with its rows, a part layer one of them."""
    ckpt = write_ckpt(tmp_path / "z.safetensors", layout, prefix, dtype)
    kohya = load_lora(save_lora(zimage_lora(seed=7), tmp_path / "k.safetensors", "kohya"))
    parts = fused.split(zimage_lora(seed=8, modules={"layers.0.attention.qkv", "context_refiner.0.attention.qkv",
                                                     "layers.1.feed_forward.w3", "x_embedder"}))
    g = torch.Generator().manual_seed(9)
    parts = parts.replace(layers={**{k: v for k, v in parts.layers.items() if not k.endswith("[v]")},
                                  "unet.layers.1.attention.qkv[k]": lay(DIM, DIM, 3, 1.5, g)})
    diffusers = load_lora(save_lora(parts, tmp_path / "d.safetensors", "diffusers"))
    assert fused.has_parts(diffusers) and not fused.has_parts(kohya)
    items = [(kohya, 0.8, 1.0), (diffusers, -0.6, 1.0), (lycoris_lora(10), 0.5, 1.0)]
    report = bake(ckpt, items, tmp_path / "out.safetensors")
    assert report.family == "zimage" and not report.unmatched
    assert report.layers == sum(len(lo.layers) for lo, _, _ in items)
    base = {k: v.to(dtype) for k, v in official_weights().items()}
    expected = check_baked(tmp_path / "out.safetensors", ckpt, base, layout, prefix, items)
    assert set(report.patched) == set(expected)
    linears = {k for k, v in load(ckpt).items() if k.endswith(".weight") and v.ndim == 2}
    assert set(expected) == linears  # the kohya LoRA touches every Linear
    if layout == "official":
        assert f"{prefix}layers.0.attention.to_k.weight" in expected
    assert all(t.dtype == dtype for t in load(tmp_path / "out.safetensors").values())
    assert no_temp_files(tmp_path)


@LAYOUTS
def test_part_layers_patch_only_their_tensor_or_rows(tmp_path, layout, prefix):
    ckpt = write_ckpt(tmp_path / "z.safetensors", layout, prefix, torch.float32)
    g = torch.Generator().manual_seed(11)
    lora = L.LoRA({"unet.layers.0.attention.qkv[k]": lay(DIM, DIM, 2, 1.0, g),
                   "unet.layers.1.attention.qkv": lay(3 * DIM, DIM, 3, 2.0, g)}, family="zimage")
    report = bake(ckpt, [(lora, 1.2, 1.0)], tmp_path / "out.safetensors")
    base = official_weights()
    expected = check_baked(tmp_path / "out.safetensors", ckpt, base, layout, prefix, [(lora, 1.2, 1.0)])
    if layout == "official":  # [k] touches to_k alone; the whole qkv of layer 1 its three tensors
        assert set(report.patched) == {f"{prefix}layers.0.attention.to_k.weight",
                                       *(f"{prefix}layers.1.attention.to_{p}.weight" for p in "qkv")}
    else:  # rows of the fused tensor: q and v rows bit for bit the same
        got, stored = load(tmp_path / "out.safetensors"), load(ckpt)
        qkv = f"{prefix}layers.0.attention.qkv.weight"
        assert set(report.patched) == {qkv, f"{prefix}layers.1.attention.qkv.weight"}
        assert torch.equal(got[qkv][:DIM], stored[qkv][:DIM]) and torch.equal(got[qkv][2 * DIM:], stored[qkv][2 * DIM:])
    assert set(expected) == set(report.patched)


def test_bake_refusals(tmp_path):
    out = tmp_path / "out.safetensors"
    zimage = write_ckpt(tmp_path / "z.safetensors", "official", "", torch.float32)
    flux = tmp_path / "flux.safetensors"
    save_bfl_checkpoint(flux, tiny_flux_bfl_state_dict())
    with pytest.raises(LoraValueError, match=r"LoRA 1 is for FLUX\.1, the checkpoint is Z-Image.*nothing was written"):
        bake(zimage, [(flux_lora(seed=1), 1.0, 1.0)], out)
    # final_layer.linear, final_layer.adaLN_modulation.1 (and x_embedder, in diffusers) are FLUX.1 names too: one error
    with pytest.raises(LoraValueError, match=r"LoRA 1 is for Z-Image, the checkpoint is FLUX\.1: 26 of its 29"):
        bake(flux, [(zimage_lora(seed=1), 1.0, 1.0)], out, strict=False)
    with pytest.raises(LoraValueError, match=r"LoRA 2 is for Z-Image, the checkpoint is FLUX\.1"):
        bake(flux, [(flux_lora(seed=1), 1.0, 1.0), (zimage_lora(seed=1).replace(family=None), 1.0, 1.0)], out)
    sd = official_weights()
    mixed = {**sd, "layers.0.attention.qkv.weight": torch.zeros(3 * DIM, DIM)}
    safetensors.torch.save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoraFormatError, match="two tensors hold the same weight"):
        bake(tmp_path / "mixed.safetensors", [(zimage_lora(seed=1), 1.0, 1.0)], out)
    del sd["layers.0.attention.to_v.weight"]
    safetensors.torch.save_file(sd, str(tmp_path / "partial.safetensors"))
    with pytest.raises(LoraFileError, match=r"holds parts \['k', 'q'\] of this weight but not \['v'\]"):
        bake(tmp_path / "partial.safetensors", [(zimage_lora(seed=1), 1.0, 1.0)], out)
    bad = L.LoRA({"unet.layers.0.attention.qkv": L.LoRALayer(torch.ones(1, DIM), torch.ones(2 * DIM, 1))},
                 family="zimage")
    with pytest.raises(LoraValueError, match="wrong shape"):
        bake(zimage, [(bad, 1.0, 1.0)], out)
    assert not out.exists() and no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------- extract


def inject(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """ComfyUI module → a rank-``rank`` ΔW (fp64): whole qkv, one part's rows of another qkv, plain weights."""
    g = torch.Generator().manual_seed(seed)
    shapes = comfy_shapes()
    out = {}
    for module, rows in {"layers.0.attention.qkv": slice(None), "context_refiner.0.attention.qkv": QKV_ROWS["k"],
                         "layers.1.feed_forward.w2": slice(None), "x_embedder": slice(None),
                         "final_layer.adaLN_modulation.1": slice(None), "noise_refiner.0.attention.out":
                         slice(None)}.items():  # fmt: skip
        delta = torch.zeros(shapes[module], dtype=torch.float64)
        n = delta[rows].shape[0]
        delta[rows] = (torch.randn(n, rank, generator=g, dtype=torch.float64)
                       @ torch.randn(rank, delta.shape[1], generator=g, dtype=torch.float64)) * 0.02
        out[module] = delta
    return out


@pytest.mark.parametrize(("base_layout", "tuned_layout"), [("comfy", "official"), ("official", "comfy"),
                                                           ("official", "official")])
def test_extract_from_two_zimage_checkpoints(tmp_path, base_layout, tuned_layout):
    deltas = inject(12)
    base = official_weights()
    tuned_comfy = {k: v.double() for k, v in diffusers_to_comfy(base).items()}
    for module, delta in deltas.items():
        tuned_comfy[module + ".weight"] += delta
    tuned = {k: v.float() for k, v in to_diffusers_names(tuned_comfy).items()}
    write_ckpt(tmp_path / "base.safetensors", base_layout, "", torch.float32, base)
    write_ckpt(tmp_path / "tuned.safetensors", tuned_layout, PREFIX, torch.float32, tuned)
    lora, report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", 4,
                           compute_dtype=torch.float64)
    assert lora.family == "zimage"
    assert set(lora.layers) == {f"unet.{m}" for m in deltas}  # whole qkv layers; untouched weights skipped
    assert all(r.new_rank == 4 for r in report.layers)
    path = save_lora(lora, tmp_path / "x.safetensors", "kohya")
    names = set(safetensors.torch.load_file(str(path)))
    assert {"lora_unet_layers_0_attention_qkv.lora_down.weight", "lora_unet_layers_0_attention_qkv.alpha",
            "lora_unet_x_embedder.lora_up.weight"} <= names
    back = load_lora(path)
    assert back.family == "zimage" and set(back.layers) == set(lora.layers)
    worst = 0.0
    for module, delta in deltas.items():
        got = back.layers[f"unet.{module}"].delta(torch.float64)
        worst = max(worst, float((got - delta).norm() / delta.norm()))
    assert worst <= 1e-6, worst  # fp32 weights: the difference is rank 4 up to fp32 rounding (7e-8 seen)
    # baked back into the base, the extracted LoRA gives the tuned weights
    bake(tmp_path / "base.safetensors", [(back, 1.0, 1.0)], tmp_path / "rebaked.safetensors")
    rebaked = load(tmp_path / "rebaked.safetensors")
    rebaked = to_diffusers_names(rebaked) if base_layout == "comfy" else rebaked
    for name, t in tuned.items():
        step = (t.double() - base[name].double()).norm()
        if step > 0:
            assert float((rebaked[name].double() - t.double()).norm() / step) <= 1e-4, name
        else:
            assert torch.equal(rebaked[name], base[name]), name
