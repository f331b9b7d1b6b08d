"""Wan through every operation: the diffusers host, diffusers' own LoRA loader, bake and extract.

The tiny model is diffusers' ``WanTransformer3DModel`` with the family's tiny config and seeded random weights
(built here, independent of any tiny-model module). Wan has two spellings: the original (Wan-Video) names, which
ComfyUI uses inside and which are the canonical keys (``unet.blocks.0.self_attn.q``, ``unet.head.head``), and
diffusers' (``blocks.0.attn1.to_q``, ``proj_out``). Nothing is fused, so the reference ΔW of a layer is its own
up @ down placed on the tensor of the same module; the rename between the two spellings is written out here
(``original_name``), checked against diffusers' ``convert_wan_transformer_to_diffusers``, and not taken from lora_ops.

diffusers' converters (run by ``WanLoraLoaderMixin.lora_state_dict``): ``_convert_non_diffusers_wan_lora_to_diffusers``
(``diffusion_model.`` keys) reads our comfyui file of the block Linears with every key used and the same ΔW, and
of every Linear when no layer has an alpha; with an ``.alpha`` on a Linear outside the blocks (embeddings,
``time_projection``, ``head.head``) it raises (it scales by alpha only inside the blocks).
``_convert_musubi_wan_lora_to_diffusers`` (``lora_unet_`` keys) reads our kohya file of every block Linear
(musubi's own target set) the same way when every layer has an alpha; it needs an ``.alpha`` on every module and
every block's q/k/v/o, cross q/k/v/o and ffn (it pops them without a default), and raises on anything outside the
blocks. bf16 bakes are checked bit for bit against the fp64 sum rounded once (torch's fp64 → bf16 rounds twice).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import WanTransformer3DModel
from test_bake import assert_within_ulp, load, no_temp_files, raw
from test_hosts_flux1 import REL, TOL, assert_deltas, flux_lora, moved, no_hooks, same_state, state
from test_interop_flux1 import complaints

from lora_ops import families
from lora_ops import lora as L
from lora_ops.bake import bake
from lora_ops.errors import LoraFormatError, LoraValueError
from lora_ops.extract import extract
from lora_ops.files import load_lora, save_lora
from lora_ops.hosts import DiffusersHost
from lora_ops.keymap import checkpoint_family, checkpoint_targets
from lora_ops.testing.tiny_flux import save_bfl_checkpoint, tiny_flux_bfl_state_dict, tiny_flux_transformer

FAMILY = families.get("wan")
CFG = dict(FAMILY.tiny_config)
PREFIX = "model.diffusion_model."
LAYOUTS = pytest.mark.parametrize("prefix", ["", PREFIX], ids=["top-level", "prefixed"])

# diffusers module → original module (the inverse of convert_wan_transformer_to_diffusers for what the tiny T2V
# model has); per block with {i}
_BLOCK = {"attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
          "attn1.to_out.0": "self_attn.o", "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k",
          "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o", "ffn.net.0.proj": "ffn.0",
          "ffn.net.2": "ffn.2", "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
          "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k", "norm2": "norm3",
          "scale_shift_table": "modulation"}  # fmt: skip
_TOP = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
        "scale_shift_table": "head.modulation", "patch_embedding": "patch_embedding"}  # fmt: skip


def original_name(name: str) -> str:
    """diffusers tensor name → original (Wan-Video / ComfyUI) tensor name."""
    module, _, suffix = name.rpartition(".") if not name.endswith("scale_shift_table") else (name, "", "")
    tail = f".{suffix}" if suffix else ""
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return f"blocks.{i}.{_BLOCK[rest]}{tail}"
    return _TOP[module] + tail


# ------------------------------------------------------------------------------------------------ the tiny model


@functools.cache
def _weights(seed: int) -> dict[str, torch.Tensor]:
    """The tiny model's (diffusers-named) state dict with seeded random values: Linear weights ~ 1/√fan-in, norm
    scales near 1, small biases and modulation tables."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in WanTransformer3DModel(**CFG).state_dict().items():
        noise = torch.randn(t.shape, generator=g)
        if t.ndim == 2 or t.ndim == 5:
            out[name] = noise * t[0].numel() ** -0.5
        elif name.endswith(".weight"):
            out[name] = 1.0 + 0.1 * noise
        else:
            out[name] = 0.02 * noise
    return out


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-named weights (what a Wan release file and ComfyUI hold)."""
    return {original_name(k): v.clone() for k, v in _weights(seed).items()}


def tiny_wan(seed: int = 0, dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    model = WanTransformer3DModel(**CFG)
    model.load_state_dict(_weights(seed))
    return (model if dtype == torch.float32 else torch.nn.Module.to(model, dtype=dtype)).eval()


def wan_forward(model: WanTransformer3DModel) -> torch.Tensor:
    """One forward pass on a 2-frame 4×4 latent and 5 text tokens."""
    g = torch.Generator().manual_seed(123)
    dtype = next(model.parameters()).dtype
    x = torch.randn(1, CFG["in_channels"], 2, 4, 4, generator=g).to(dtype)
    ctx = torch.randn(1, 5, CFG["text_dim"], generator=g).to(dtype)
    with torch.no_grad():
        out = model(hidden_states=x, timestep=torch.tensor([300]), encoder_hidden_states=ctx, return_dict=False)[0]
    return out.float()


def shapes() -> dict[str, tuple[int, int]]:
    """Original module path → (out, in) of every Linear weight (the canonical targets, less ``unet.``)."""
    return {original_name(k).removesuffix(".weight"): tuple(v.shape) for k, v in _weights(0).items() if v.ndim == 2}


def diffusers_of() -> dict[str, str]:
    """Original Linear module → its diffusers module."""
    return {original_name(k + ".weight").removesuffix(".weight"): k
            for k in (n.removesuffix(".weight") for n, v in _weights(0).items() if v.ndim == 2)}  # fmt: skip


BLOCK_LINEARS = {p for p in shapes() if p.startswith("blocks.")}


def lay(out: int, inp: int, rank: int, alpha: float | None, g: torch.Generator, scale: float = 0.2) -> L.LoRALayer:
    return L.LoRALayer(torch.randn(rank, inp, generator=g) * scale, torch.randn(out, rank, generator=g) * scale,
                       alpha=alpha)


def wan_lora(seed: int = 0, modules=None) -> L.LoRA:
    """A random LoRA on every (or the given) Linear; ranks 1–4 and alphas (some None) differ per layer."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (path, (out, inp)) in enumerate(sorted(shapes().items())):
        if modules is not None and path not in modules:
            continue
        layers[f"unet.{path}"] = lay(out, inp, 1 + i % 4, 0.5 + i % 3 if i % 5 else None, g)
    return L.LoRA(layers, family="wan")


def deltas(items) -> dict[str, torch.Tensor]:
    """Original tensor name → Σ s·ΔW (fp64) of every Linear weight, zero where no layer is."""
    acc = {k + ".weight": torch.zeros(s, dtype=torch.float64) for k, s in shapes().items()}
    for lora, sm, _st in items:
        for key, layer in lora.layers.items():
            w = acc[key.removeprefix("unet.") + ".weight"]
            w += sm * layer.delta(torch.float64).reshape(w.shape)
    return acc


def reference_deltas(lora: L.LoRA) -> dict[str, torch.Tensor]:
    """diffusers module path → ΔW (fp64) of every Linear of the model (what ``moved`` compares against)."""
    names = diffusers_of()
    return {names[k.removesuffix(".weight")]: v for k, v in deltas([(lora, 1.0, 1.0)]).items()}


# ----------------------------------------------------------------------------------- names, family, targets


def test_original_names_are_diffusers_own_conversion():
    """Our rename is the exact inverse of diffusers' single-file converter, on every tensor."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    back = convert_wan_transformer_to_diffusers(weights())
    assert set(back) == set(_weights(0)) and all(torch.equal(back[k], v) for k, v in _weights(0).items())
    for original, diff in diffusers_of().items():
        assert FAMILY.to_diffusers(original, None) == diff, original


@LAYOUTS
def test_checkpoint_family_and_targets(prefix):
    sd = {prefix + k: v for k, v in weights().items()}
    assert checkpoint_family(sd) == "wan"
    targets = checkpoint_targets(sd, "wan")
    assert set(targets) == {f"unet.{p}" for p in shapes()}
    for key, slot in targets.items():
        assert slot.tensor == f"{prefix}{key.removeprefix('unet.')}.weight" and slot.chunk is None
    # an all-in-one file: text encoder and VAE beside the transformer are no targets and no evidence
    extra = {"text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4),
             "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2, 3, 3, 3)}  # fmt: skip
    assert checkpoint_family({**sd, **extra}) == "wan"
    assert checkpoint_targets({**sd, **extra}, "wan") == targets
    # the diffusers-named transformer is Wan's too, its targets on the diffusers tensors
    dsd = {prefix + k: v for k, v in _weights(0).items()}
    assert checkpoint_family(dsd) == "wan"
    names = diffusers_of()
    assert {k: s.tensor for k, s in checkpoint_targets(dsd, "wan").items()} == {
        f"unet.{p}": f"{prefix}{names[p]}.weight" for p in shapes()}
    assert checkpoint_family(tiny_flux_bfl_state_dict()) == "flux1"
    assert checkpoint_family(tiny_flux_transformer().state_dict()) == "flux1"


# -------------------------------------------------------------------------------------------- diffusers host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apply_merge_unmerge(dtype):
    lora = wan_lora(seed=1)
    model = tiny_wan(dtype=dtype)
    host = DiffusersHost(model)
    base_state, base = state(model), wan_forward(model)
    report = host.apply([(lora, 0.7, 1.0)])
    assert report.fraction == 1.0 and len(report.matched) == len(lora) == len(shapes())
    assert same_state(state(model), base_state)  # applying touches no weight
    applied = wan_forward(model)
    assert (applied - base).abs().max().item() > 1e-2
    host.merge()
    want = reference_deltas(lora)
    if dtype == torch.float32:
        assert (wan_forward(model) - applied).abs().max().item() <= TOL  # merged = applied
        assert assert_deltas(moved(model, base_state, 0.7), want) <= REL
    else:  # cast(W + 0.7·ΔW) from fp32: within one bf16 ulp of the fp64 value
        for name, w in model.state_dict().items():
            path = name.removesuffix(".weight")
            if path in want:
                exact = base_state[name].double() + 0.7 * want[path]
                assert bool(((w.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()), name
    host.unmerge()
    assert same_state(state(model), base_state)  # bit for bit
    assert torch.equal(wan_forward(model), applied)  # hooks active again
    host.remove()
    assert no_hooks(model) and torch.equal(wan_forward(model), base)


def test_every_spelling_merges_the_same(tmp_path):
    lora = wan_lora(seed=2)
    spelled = {fmt: load_lora(save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt))
               for fmt in ("kohya", "comfyui", "diffusers", "peft")}  # fmt: skip
    names = {fmt: set(safetensors.torch.load_file(str(tmp_path / f"{fmt}.safetensors"))) for fmt in spelled}
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in names["kohya"]  # musubi's spelling
    assert "lora_unet_blocks_1_ffn_0.lora_up.weight" in names["kohya"]
    assert "diffusion_model.blocks.0.cross_attn.o.lora_down.weight" in names["comfyui"]
    assert "diffusion_model.head.head.lora_up.weight" in names["comfyui"]
    assert "transformer.blocks.0.attn1.to_out.0.lora_A.weight" in names["diffusers"]
    assert "transformer.condition_embedder.time_proj.lora_B.weight" in names["diffusers"]
    want = reference_deltas(lora)
    for name, read in spelled.items():
        assert read.family == "wan" and set(read.layers) == set(lora.layers), name
        model = tiny_wan()
        before = state(model)
        host = DiffusersHost(model)
        assert host.apply([(read, 1.0, 1.0)]).fraction == 1.0, name
        host.merge()
        assert assert_deltas(moved(model, before, 1.0), want) <= REL, name
        host.remove()


def test_wrong_family_is_one_clear_error():
    wan = wan_lora(seed=3)
    flux = flux_lora(seed=3)
    model = tiny_wan()
    host = DiffusersHost(model)
    for lora in (flux, flux.replace(family=None)):  # its family, or what its keys say
        with pytest.raises(LoraValueError, match=r"looks like a FLUX\.1 LoRA, the model is Wan"):
            host.apply([(wan, 1.0, 1.0), (lora, 1.0, 1.0)])
    assert no_hooks(model)  # nothing applied, not even the good first item
    flux_model = tiny_flux_transformer()
    flux_host = DiffusersHost(flux_model)
    for lora in (wan, wan.replace(family=None)):
        with pytest.raises(LoraValueError, match=r"looks like a Wan LoRA, the model is FLUX\.1"):
            flux_host.apply([(lora, 1.0, 1.0)])
    assert no_hooks(flux_model)
    with pytest.raises(LoraValueError, match=r"layout is 'wan' \(Wan\)"):
        DiffusersHost(model, family="flux1")
    with pytest.raises(LoraValueError, match=r"layout is 'flux1' \(FLUX\.1\)"):
        DiffusersHost(flux_model, family="wan")


# --------------------------------------------------------------------------------- full-weight deltas refused


def test_diff_tensors_are_refused_with_the_reason(tmp_path):
    lora = wan_lora(seed=6, modules=BLOCK_LINEARS)
    path = save_lora(lora, tmp_path / "c.safetensors", "comfyui")
    sd = safetensors.torch.load_file(str(path))
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(128)
    sd["diffusion_model.head.head.diff_b"] = torch.zeros(64)
    distill = tmp_path / "distill.safetensors"
    safetensors.torch.save_file(sd, str(distill))
    with pytest.raises(LoraFormatError, match=r"2 tensor\(s\) are full-weight or bias deltas \(\.diff / \.diff_b"):
        load_lora(distill)
    read = load_lora(distill, strict=False)  # the LoRA layers alone
    assert read.family == "wan" and set(read.layers) == set(lora.layers)
    model = tiny_wan()
    before = state(model)
    host = DiffusersHost(model)
    assert host.apply([(read, 1.0, 1.0)]).fraction == 1.0
    host.merge()
    assert assert_deltas(moved(model, before, 1.0), reference_deltas(lora)) <= REL
    # the kohya spelling too
    ksd = safetensors.torch.load_file(str(save_lora(lora, tmp_path / "k.safetensors", "kohya")))
    ksd["lora_unet_blocks_1_cross_attn_q.diff_b"] = torch.zeros(128)
    safetensors.torch.save_file(ksd, str(tmp_path / "kd.safetensors"))
    with pytest.raises(LoraFormatError, match=r"1 tensor\(s\) are full-weight or bias deltas"):
        load_lora(tmp_path / "kd.safetensors")
    assert set(load_lora(tmp_path / "kd.safetensors", strict=False).layers) == set(lora.layers)


# ------------------------------------------------------------------------------------ interop with diffusers


def with_alphas(lora: L.LoRA) -> L.LoRA:
    """The same LoRA with alpha = rank written out where it was None (musubi writes every alpha)."""
    return lora.replace(layers={k: L.LoRALayer(v.down, v.up, alpha=v.alpha if v.alpha is not None else v.rank)
                                for k, v in lora.layers.items()})


def load_in_diffusers(path: Path, route: str = "mixin-calls"):
    """The file loaded by diffusers into a fresh tiny model: (model, its weights before)."""
    from diffusers import WanPipeline
    from diffusers.loaders import WanLoraLoaderMixin

    model = tiny_wan()
    before = state(model)
    if route == "pipeline":  # a WanPipeline holding only the transformer: its own load_lora_weights, nothing mocked
        WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=model).load_lora_weights(
            str(path))
    else:  # what WanPipeline.load_lora_weights does, call by call
        sd, meta = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        assert all(k.startswith("transformer.") for k in sd)
        WanLoraLoaderMixin.load_lora_into_transformer(sd, transformer=model, metadata=meta)
    return model, before


def fused(model: WanTransformer3DModel) -> WanTransformer3DModel:
    """diffusers' fuse_lora + unload_lora_weights on the transformer (what the pipeline calls do)."""
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    return model


def our_applied_output(lora):
    model = tiny_wan()
    DiffusersHost(model).apply([(lora, 1.0, 1.0)])
    return wan_forward(model)


@pytest.mark.parametrize("route", ["pipeline", "mixin-calls"])
def test_diffusers_file_loads_in_diffusers_exactly(tmp_path, warnings_log, route):
    lora = wan_lora(seed=4)
    assert len({layer.rank for layer in lora.layers.values()}) > 1 and len({layer.alpha for layer in
                                                                               lora.layers.values()}) > 1
    path = save_lora(lora, tmp_path / "wan.safetensors", "diffusers")
    model, before = load_in_diffusers(path, route)
    assert not complaints(warnings_log), warnings_log
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_wan().modules())
    assert sum(hasattr(m, "lora_A") for m in model.modules()) == n_linear == len(shapes())  # every Linear
    assert (wan_forward(model) - our_applied_output(lora)).abs().max().item() <= TOL  # PEFT's forward = ours
    assert assert_deltas(moved(fused(model), before, 1.0), reference_deltas(lora)) <= REL
    assert not complaints(warnings_log), warnings_log


def no_alphas(lora: L.LoRA) -> L.LoRA:
    """The same factors with alpha None (scale 1): no ``.alpha`` tensor is written."""
    return lora.replace(layers={k: L.LoRALayer(v.down, v.up) for k, v in lora.layers.items()})


CONVERTED = {  # case → (format, the LoRA): what diffusers' converters read whole
    "kohya-blocks": ("kohya", lambda: with_alphas(wan_lora(seed=5, modules=BLOCK_LINEARS))),  # musubi's targets
    "comfyui-blocks": ("comfyui", lambda: wan_lora(seed=5, modules=BLOCK_LINEARS)),  # alphas some None
    "comfyui-all-no-alpha": ("comfyui", lambda: no_alphas(wan_lora(seed=5))),  # every Linear, no .alpha
}


@pytest.mark.parametrize("case", list(CONVERTED))
def test_diffusers_own_converters_read_our_kohya_and_comfyui_files(tmp_path, warnings_log, case):
    """``_convert_musubi_wan_lora_to_diffusers`` (``lora_unet_``) and ``_convert_non_diffusers_wan_lora_to_diffusers``
    (``diffusion_model.``), run by ``lora_state_dict``: every key used, every layer's Linear patched, the same ΔW
    (alpha baked in)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_musubi_wan_lora_to_diffusers,
        _convert_non_diffusers_wan_lora_to_diffusers,
    )

    fmt, make = CONVERTED[case]
    convert = {"kohya": _convert_musubi_wan_lora_to_diffusers,
               "comfyui": _convert_non_diffusers_wan_lora_to_diffusers}[fmt]  # fmt: skip
    lora = make()
    modules = {diffusers_of()[k.removeprefix("unet.")] for k in lora.layers}
    path = save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)
    converted = convert(safetensors.torch.load_file(str(path)))
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} == modules
    model, before = load_in_diffusers(path)
    assert not complaints(warnings_log), warnings_log
    assert {n for n, m in model.named_modules() if hasattr(m, "lora_A")} == modules
    assert (wan_forward(model) - our_applied_output(lora)).abs().max().item() <= TOL
    assert assert_deltas(moved(fused(model), before, 1.0), reference_deltas(lora)) <= REL
    assert load_lora(path).family == "wan"


def test_where_diffusers_own_converters_give_up(tmp_path):
    """Their limitations, not our files': musubi's converter needs an ``.alpha`` on every module (our kohya writer
    omits alpha None, as kohya does) and knows only the blocks; the other scales by alpha only inside the blocks."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_musubi_wan_lora_to_diffusers,
        _convert_non_diffusers_wan_lora_to_diffusers,
    )

    def tensors(lora, fmt):
        return safetensors.torch.load_file(str(save_lora(lora, tmp_path / "x.safetensors", fmt, overwrite=True)))

    with pytest.raises(KeyError, match=r"\.alpha"):
        _convert_musubi_wan_lora_to_diffusers(tensors(wan_lora(seed=5, modules=BLOCK_LINEARS), "kohya"))
    with pytest.raises(IndexError):  # a name without "blocks_"
        _convert_musubi_wan_lora_to_diffusers(tensors(with_alphas(wan_lora(seed=5)), "kohya"))
    with pytest.raises(ValueError, match=r"should be empty.*embedding\.\d\.alpha"):
        _convert_non_diffusers_wan_lora_to_diffusers(tensors(wan_lora(seed=5), "comfyui"))
    for fmt in ("kohya", "comfyui"):  # we read all of them
        assert load_lora(save_lora(wan_lora(seed=5), tmp_path / f"{fmt}.safetensors", fmt)).family == "wan"


# ---------------------------------------------------------------------------------------------------- bake


def write_ckpt(path: Path, prefix: str, dtype: torch.dtype, sd=None) -> Path:
    sd = sd if sd is not None else weights()
    stored = {prefix + k: v.to(dtype) for k, v in sd.items()}
    safetensors.torch.save_file(stored, str(path), metadata={"modelspec.title": "tiny wan"})
    return path


def rounded_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 → ``dtype`` rounded to nearest once. torch's own fp64 → bf16 goes through fp32 (rounded twice: about
    1 in 2^16 elements lands one ulp off), so its result's neighbours are tried too and the nearest kept."""
    y = x.to(dtype)
    if dtype != torch.bfloat16:
        return y
    bits = y.view(torch.int16)
    for other in ((bits + 1).view(dtype), (bits - 1).view(dtype)):
        y = torch.where((other.double() - x).abs() < (y.double() - x).abs(), other, y)
    return y


def expected_bake(base: dict[str, torch.Tensor], prefix: str, items) -> dict[str, torch.Tensor]:
    """Stored name → cast(W + Σ s·ΔW) computed in fp64 and rounded once, for every tensor a layer touches."""
    delta = deltas(items)
    return {prefix + k: rounded_once(base[k].double() + d, base[k].dtype) for k, d in delta.items()
            if d.abs().max() > 0}  # fmt: skip


def check_baked(out: Path, ckpt: Path, base, prefix: str, items) -> dict[str, torch.Tensor]:
    expected = expected_bake(base, prefix, items)
    got, stored = load(out), load(ckpt)
    assert set(got) == set(stored)
    raw_in, raw_out = raw(ckpt), raw(out)
    for name, t in got.items():
        if name in expected:
            assert_within_ulp(t, expected[name], name)
            assert torch.equal(t, expected[name]), name  # in fact bit for bit: rounded once
        else:
            assert raw_out[name] == raw_in[name], name  # byte-identical
    return expected


def lycoris_lora(seed: int) -> L.LoRA:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    return L.LoRA({
        "unet.blocks.1.ffn.0": L.LycorisLayer("loha", {"hada_w1_a": rnd(64, 2), "hada_w1_b": rnd(2, 128),
                                                       "hada_w2_a": rnd(64, 2), "hada_w2_b": rnd(2, 128)}, alpha=1.0),
        "unet.blocks.0.cross_attn.k": L.LycorisLayer("lokr", {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(32, 2),
                                                              "lokr_w2_b": rnd(2, 32)}, alpha=2.0),
    }, family="wan")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@LAYOUTS
def test_bake_both_layouts(tmp_path, prefix, dtype):
    """kohya (every Linear), diffusers (some, other ranks/alphas) and LyCORIS layers, stacked with strengths."""
    ckpt = write_ckpt(tmp_path / "w.safetensors", prefix, dtype)
    kohya = load_lora(save_lora(wan_lora(seed=7), tmp_path / "k.safetensors", "kohya"))
    some = wan_lora(seed=8, modules={"blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.1.ffn.2",
                                     "text_embedding.0", "head.head"})
    diffusers = load_lora(save_lora(some, tmp_path / "d.safetensors", "diffusers"))
    items = [(kohya, 0.8, 1.0), (diffusers, -0.6, 1.0), (lycoris_lora(10), 0.5, 1.0)]
    report = bake(ckpt, items, tmp_path / "out.safetensors")
    assert report.family == "wan" and not report.unmatched
    assert report.layers == sum(len(lo.layers) for lo, _, _ in items)
    base = {k: v.to(dtype) for k, v in weights().items()}
    expected = check_baked(tmp_path / "out.safetensors", ckpt, base, prefix, items)
    assert set(report.patched) == set(expected)
    assert set(expected) == {prefix + k + ".weight" for k in shapes()}  # the kohya LoRA touches every Linear
    assert all(t.dtype == dtype for t in load(tmp_path / "out.safetensors").values())
    assert no_temp_files(tmp_path)


def test_bake_into_a_diffusers_named_checkpoint(tmp_path):
    """The same LoRA baked into the diffusers-named transformer: the same tensors change, by the same amounts."""
    dsd = dict(_weights(0))
    ckpt = tmp_path / "d.safetensors"
    safetensors.torch.save_file(dsd, str(ckpt))
    items = [(load_lora(save_lora(wan_lora(seed=9), tmp_path / "c.safetensors", "comfyui")), 0.9, 1.0)]
    report = bake(ckpt, items, tmp_path / "out.safetensors")
    assert report.family == "wan" and not report.unmatched
    names = diffusers_of()
    expected = {f"{names[k.removesuffix('.weight')]}.weight": v
                for k, v in expected_bake(weights(), "", items).items()}  # fmt: skip
    got, raw_in, raw_out = load(tmp_path / "out.safetensors"), raw(ckpt), raw(tmp_path / "out.safetensors")
    assert set(got) == set(dsd) and set(expected) == {f"{d}.weight" for d in names.values()}
    for name, t in got.items():
        if name in expected:
            assert_within_ulp(t, expected[name], name)
            assert torch.equal(t, expected[name]), name  # in fact bit for bit: rounded once
        else:
            assert raw_out[name] == raw_in[name], name


def test_bake_refusals(tmp_path):
    out = tmp_path / "out.safetensors"
    wan = write_ckpt(tmp_path / "w.safetensors", "", torch.float32)
    flux = tmp_path / "flux.safetensors"
    save_bfl_checkpoint(flux, tiny_flux_bfl_state_dict())
    with pytest.raises(LoraValueError, match=r"LoRA 1 is for FLUX\.1, the checkpoint is Wan.*nothing was written"):
        bake(wan, [(flux_lora(seed=1), 1.0, 1.0)], out)
    with pytest.raises(LoraValueError, match=r"LoRA 1 is for Wan, the checkpoint is FLUX\.1"):
        bake(flux, [(wan_lora(seed=1), 1.0, 1.0)], out, strict=False)
    with pytest.raises(LoraValueError, match=r"LoRA 2 is for Wan, the checkpoint is FLUX\.1"):
        bake(flux, [(flux_lora(seed=1), 1.0, 1.0), (wan_lora(seed=1).replace(family=None), 1.0, 1.0)], out)
    bad = L.LoRA({"unet.blocks.0.ffn.0": L.LoRALayer(torch.ones(1, 128), torch.ones(128, 1))}, family="wan")
    with pytest.raises(LoraValueError, match="wrong shape"):
        bake(wan, [(bad, 1.0, 1.0)], out)
    assert not out.exists() and no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------- extract


def inject(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Module → a rank-``rank`` ΔW (fp64) on a few weights of every kind."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in ("blocks.0.self_attn.q", "blocks.1.cross_attn.v", "blocks.0.ffn.0", "blocks.1.ffn.2",
                   "text_embedding.0", "time_projection.1", "head.head"):  # fmt: skip
        n, m = shapes()[module]
        out[module] = (torch.randn(n, rank, generator=g, dtype=torch.float64)
                       @ torch.randn(rank, m, generator=g, dtype=torch.float64)) * 0.02
    return out


def test_extract_from_two_wan_checkpoints(tmp_path):
    injected = inject(12)
    base = weights()
    tuned = {k: (v.double() + injected[k.removesuffix(".weight")]).float() if k.removesuffix(".weight") in injected
             else v.clone() for k, v in base.items()}  # fmt: skip
    write_ckpt(tmp_path / "base.safetensors", "", torch.float32, base)
    write_ckpt(tmp_path / "tuned.safetensors", PREFIX, torch.float32, tuned)
    lora, report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", 4,
                           compute_dtype=torch.float64)
    assert lora.family == "wan"
    assert set(lora.layers) == {f"unet.{m}" for m in injected}  # untouched weights skipped
    assert all(r.new_rank == 4 for r in report.layers)
    path = save_lora(lora, tmp_path / "x.safetensors", "kohya")
    names = set(safetensors.torch.load_file(str(path)))
    assert {"lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_head_head.alpha"} <= names
    back = load_lora(path)
    assert back.family == "wan" and set(back.layers) == set(lora.layers)
    worst = 0.0
    for module, delta in injected.items():
        got = back.layers[f"unet.{module}"].delta(torch.float64)
        worst = max(worst, float((got - delta).norm() / delta.norm()))
    assert worst <= 1e-6, worst  # fp32 weights: the difference is rank 4 up to fp32 rounding
    bake(tmp_path / "base.safetensors", [(back, 1.0, 1.0)], tmp_path / "rebaked.safetensors")
    rebaked = load(tmp_path / "rebaked.safetensors")
    for name, t in tuned.items():
        step = (t.double() - base[name].double()).norm()
        if step > 0:
            assert float((rebaked[name].double() - t.double()).norm() / step) <= 1e-4, name
        else:
            assert torch.equal(rebaked[name], base[name]), name


def test_extract_refuses_checkpoints_of_two_families(tmp_path):
    write_ckpt(tmp_path / "wan.safetensors", "", torch.float32)
    save_bfl_checkpoint(tmp_path / "flux.safetensors", tiny_flux_bfl_state_dict())
    for a, b in (("wan", "flux"), ("flux", "wan")):
        label = {"wan": r"Wan", "flux": r"FLUX\.1"}
        with pytest.raises(LoraValueError, match=rf"the base is a {label[a]} checkpoint, the tuned one {label[b]}"):
            extract(tmp_path / f"{a}.safetensors", tmp_path / f"{b}.safetensors", 4)
    # a given family is used for both: FLUX.1's names are no Wan weights, so nothing is shared
    with pytest.raises(LoraValueError, match="no weight in common"):
        extract(tmp_path / "wan.safetensors", tmp_path / "flux.safetensors", 4, family="wan")
