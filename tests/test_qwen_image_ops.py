"""Qwen-Image through every operation: the diffusers host, diffusers' own LoRA loader, bake and extract.

The tiny model is diffusers' ``QwenImageTransformer2DModel`` with the family's tiny config and seeded random weights
(built here). Qwen-Image has one spelling of its weights — the release, diffusers and ComfyUI all use
``transformer_blocks.N.attn.to_q``, ``img_mod.1``, ``img_mlp.net.0.proj`` … — and nothing is fused, so the canonical
key of a module is ``unet.`` + its diffusers path and the reference ΔW of a layer is its own up @ down, placed on the
tensor of the same name (no name table of lora_ops is involved).

Several of these names are FLUX.1's diffusers names too (``transformer_blocks.N.attn.*``, ``norm_out.linear``,
``proj_out``, the timestep embedder); the LoRAs here touch every Linear, so ``img_mod``/``img_mlp``/``txt_*`` make
them Qwen-Image's, and a whole checkpoint is Qwen-Image's for the same reason.

diffusers' converter for non-diffusers Qwen-Image LoRAs (``_convert_non_diffusers_qwen_lora_to_diffusers``) reads
our kohya file (``lora_unet_transformer_blocks_0_attn_to_q``, musubi-tuner's spelling: its protected n-grams
un-flatten every name, its table maps the top-level ones) and our comfyui file (``diffusion_model.…lora_down``)
with every key used and the same ΔW.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import QwenImageTransformer2DModel
from test_bake import assert_within_ulp, load, no_temp_files, raw
from test_hosts_flux1 import REL, TOL, assert_deltas, flux_lora, moved, no_hooks, same_state, state
from test_interop_flux1 import complaints

from lora_ops import families
from lora_ops import lora as L
from lora_ops.bake import bake
from lora_ops.errors import LoraValueError
from lora_ops.extract import extract
from lora_ops.files import load_lora, save_lora
from lora_ops.hosts import DiffusersHost
from lora_ops.keymap import checkpoint_family, checkpoint_targets
from lora_ops.testing.tiny_flux import save_bfl_checkpoint, tiny_flux_bfl_state_dict, tiny_flux_transformer

FAMILY = families.get("qwen_image")
CFG = dict(FAMILY.tiny_config)
PREFIX = "model.diffusion_model."
LAYOUTS = pytest.mark.parametrize("prefix", ["", PREFIX], ids=["top-level", "prefixed"])


# ------------------------------------------------------------------------------------------------ the tiny model


@functools.cache
def _weights(seed: int) -> dict[str, torch.Tensor]:
    """The tiny model's state dict with seeded random values: Linear weights ~ 1/√fan-in, norm scales near 1,
    small biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in QwenImageTransformer2DModel(**CFG).state_dict().items():
        noise = torch.randn(t.shape, generator=g)
        if t.ndim == 2:
            out[name] = noise * t.shape[1] ** -0.5
        elif name.endswith(".weight"):
            out[name] = 1.0 + 0.1 * noise
        else:
            out[name] = 0.02 * noise
    return out


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _weights(seed).items()}


def tiny_qwen(seed: int = 0, dtype: torch.dtype = torch.float32) -> QwenImageTransformer2DModel:
    model = QwenImageTransformer2DModel(**CFG)
    model.load_state_dict(_weights(seed))
    return (model if dtype == torch.float32 else torch.nn.Module.to(model, dtype=dtype)).eval()


def qwen_forward(model: QwenImageTransformer2DModel) -> torch.Tensor:
    """One forward pass on a 4×4 grid of packed latents and 7 text tokens."""
    g = torch.Generator().manual_seed(123)
    dtype = next(model.parameters()).dtype
    x = torch.randn(1, 16, CFG["in_channels"], generator=g).to(dtype)
    ctx = torch.randn(1, 7, CFG["joint_attention_dim"], generator=g).to(dtype)
    with torch.no_grad():
        out = model(hidden_states=x, encoder_hidden_states=ctx, encoder_hidden_states_mask=torch.ones(1, 7),
                    timestep=torch.tensor([0.3]).to(dtype), img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
    return out.float()


def shapes() -> dict[str, tuple[int, int]]:
    """Module path → (out, in) of every Linear weight (the canonical targets, less ``unet.``)."""
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in _weights(0).items() if v.ndim == 2}


def lay(out: int, inp: int, rank: int, alpha: float | None, g: torch.Generator, scale: float = 0.2) -> L.LoRALayer:
    return L.LoRALayer(torch.randn(rank, inp, generator=g) * scale, torch.randn(out, rank, generator=g) * scale,
                       alpha=alpha)


def qwen_lora(seed: int = 0, modules=None) -> L.LoRA:
    """A random LoRA on every (or the given) Linear; ranks 1–4 and alphas (some None) differ per layer."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (path, (out, inp)) in enumerate(sorted(shapes().items())):
        if modules is not None and path not in modules:
            continue
        layers[f"unet.{path}"] = lay(out, inp, 1 + i % 4, 0.5 + i % 3 if i % 5 else None, g)
    return L.LoRA(layers, family="qwen_image")


def deltas(items) -> dict[str, torch.Tensor]:
    """Tensor name → Σ s·ΔW (fp64) of every Linear weight, zero where no layer is."""
    acc = {k + ".weight": torch.zeros(s, dtype=torch.float64) for k, s in shapes().items()}
    for lora, sm, _st in items:
        for key, layer in lora.layers.items():
            w = acc[key.removeprefix("unet.") + ".weight"]
            w += sm * layer.delta(torch.float64).reshape(w.shape)
    return acc


def reference_deltas(lora: L.LoRA) -> dict[str, torch.Tensor]:
    """Module path → ΔW (fp64) of every Linear of the model."""
    return {k.removesuffix(".weight"): v for k, v in deltas([(lora, 1.0, 1.0)]).items()}


# ----------------------------------------------------------------------------------- names, family, targets


@LAYOUTS
def test_checkpoint_family_and_targets(prefix):
    sd = {prefix + k: v for k, v in weights().items()}
    assert checkpoint_family(sd) == "qwen_image"  # FLUX.1-like attention names too, but img_mod/img_mlp decide
    targets = checkpoint_targets(sd, "qwen_image")
    assert set(targets) == {f"unet.{p}" for p in shapes()}
    for key, slot in targets.items():
        assert slot.tensor == f"{prefix}{key.removeprefix('unet.')}.weight" and slot.chunk is None
    assert checkpoint_family([f"{prefix}transformer_blocks.0.img_mlp.net.0.proj.weight"]) == "qwen_image"
    # only names FLUX.1's diffusers transformer has too: no decision
    assert checkpoint_family([f"{prefix}transformer_blocks.0.attn.to_q.weight", f"{prefix}proj_out.weight"]) is None
    # an all-in-one file: text encoder and VAE beside the transformer are no targets and no evidence
    extra = {"text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
             "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2, 3, 3)}
    assert checkpoint_family({**sd, **extra}) == "qwen_image"
    assert checkpoint_targets({**sd, **extra}, "qwen_image") == targets
    # FLUX.1 is still FLUX.1, in both of its spellings
    assert checkpoint_family(tiny_flux_bfl_state_dict()) == "flux1"
    assert checkpoint_family(tiny_flux_transformer().state_dict()) == "flux1"


# -------------------------------------------------------------------------------------------- diffusers host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_apply_merge_unmerge(dtype):
    lora = qwen_lora(seed=1)
    model = tiny_qwen(dtype=dtype)
    host = DiffusersHost(model)
    base_state, base = state(model), qwen_forward(model)
    report = host.apply([(lora, 0.7, 1.0)])
    assert report.fraction == 1.0 and len(report.matched) == len(lora) == len(shapes())
    assert same_state(state(model), base_state)  # applying touches no weight
    applied = qwen_forward(model)
    assert (applied - base).abs().max().item() > 1e-2
    host.merge()
    want = reference_deltas(lora)
    if dtype == torch.float32:
        assert (qwen_forward(model) - applied).abs().max().item() <= TOL  # merged = applied
        assert assert_deltas(moved(model, base_state, 0.7), want) <= REL
    else:  # cast(W + 0.7·ΔW) from fp32: within one bf16 ulp of the fp64 value
        for name, w in model.state_dict().items():
            path = name.removesuffix(".weight")
            if path in want:
                exact = base_state[name].double() + 0.7 * want[path]
                assert bool(((w.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-6).all()), name
    host.unmerge()
    assert same_state(state(model), base_state)  # bit for bit
    assert torch.equal(qwen_forward(model), applied)  # hooks active again
    host.remove()
    assert no_hooks(model) and torch.equal(qwen_forward(model), base)


def test_every_spelling_merges_the_same(tmp_path):
    lora = qwen_lora(seed=2)
    spelled = {fmt: load_lora(save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt))
               for fmt in ("kohya", "comfyui", "diffusers", "peft")}  # fmt: skip
    names = {fmt: set(safetensors.torch.load_file(str(tmp_path / f"{fmt}.safetensors"))) for fmt in spelled}
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in names["kohya"]  # musubi's spelling
    assert "lora_unet_transformer_blocks_1_img_mlp_net_0_proj.lora_up.weight" in names["kohya"]
    assert "diffusion_model.transformer_blocks.0.img_mod.1.lora_down.weight" in names["comfyui"]
    assert "transformer.transformer_blocks.0.attn.to_add_out.lora_A.weight" in names["diffusers"]
    want = reference_deltas(lora)
    for name, read in spelled.items():
        assert read.family == "qwen_image" and set(read.layers) == set(lora.layers), name
        model = tiny_qwen()
        before = state(model)
        host = DiffusersHost(model)
        assert host.apply([(read, 1.0, 1.0)]).fraction == 1.0, name
        host.merge()
        assert assert_deltas(moved(model, before, 1.0), want) <= REL, name
        host.remove()


def test_wrong_family_is_one_clear_error():
    qwen = qwen_lora(seed=3)
    flux = flux_lora(seed=3)
    model = tiny_qwen()
    host = DiffusersHost(model)
    for lora in (flux, flux.replace(family=None)):  # its family, or what its keys say
        with pytest.raises(LoraValueError, match=r"looks like a FLUX\.1 LoRA, the model is Qwen-Image"):
            host.apply([(qwen, 1.0, 1.0), (lora, 1.0, 1.0)])
    assert no_hooks(model)  # nothing applied, not even the good first item
    flux_model = tiny_flux_transformer()
    flux_host = DiffusersHost(flux_model)
    for lora in (qwen, qwen.replace(family=None)):
        with pytest.raises(LoraValueError, match=r"looks like a Qwen-Image LoRA, the model is FLUX\.1"):
            flux_host.apply([(lora, 1.0, 1.0)])
    assert no_hooks(flux_model)
    with pytest.raises(LoraValueError, match=r"layout is 'qwen_image' \(Qwen-Image\)"):
        DiffusersHost(model, family="flux1")
    with pytest.raises(LoraValueError, match=r"layout is 'flux1' \(FLUX\.1\)"):
        DiffusersHost(flux_model, family="qwen_image")


# ------------------------------------------------------------------------------------ interop with diffusers


def bare_pipeline(transformer):
    """A QwenImagePipeline holding only the transformer: load_lora_weights runs its own code, nothing mocked."""
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def load_in_diffusers(path: Path, route: str = "mixin-calls"):
    """The file loaded by diffusers into a fresh tiny model in a bare pipeline: (model, its weights before, pipe)."""
    from diffusers.loaders import QwenImageLoraLoaderMixin

    model = tiny_qwen()
    before = state(model)
    pipe = bare_pipeline(model)
    if route == "pipeline":
        pipe.load_lora_weights(str(path))
    else:  # what QwenImagePipeline.load_lora_weights does, call by call
        sd, meta = QwenImageLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
        assert all(k.startswith("transformer.") for k in sd)
        QwenImageLoraLoaderMixin.load_lora_into_transformer(sd, transformer=model, metadata=meta)
    return model, before, pipe


def our_applied_output(lora):
    model = tiny_qwen()
    DiffusersHost(model).apply([(lora, 1.0, 1.0)])
    return qwen_forward(model)


@pytest.mark.parametrize("route", ["pipeline", "mixin-calls"])
def test_diffusers_file_loads_in_diffusers_exactly(tmp_path, warnings_log, route):
    lora = qwen_lora(seed=4)
    assert len({layer.rank for layer in lora.layers.values()}) > 1 and len({layer.alpha for layer in
                                                                               lora.layers.values()}) > 1
    path = save_lora(lora, tmp_path / "qwen.safetensors", "diffusers")
    model, before, pipe = load_in_diffusers(path, route)
    assert not complaints(warnings_log), warnings_log
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_qwen().modules())
    assert sum(hasattr(m, "lora_A") for m in model.modules()) == n_linear == len(shapes())  # every Linear
    assert (qwen_forward(model) - our_applied_output(lora)).abs().max().item() <= TOL  # PEFT's forward = ours
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert assert_deltas(moved(model, before, 1.0), reference_deltas(lora)) <= REL
    assert not complaints(warnings_log), warnings_log


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_diffusers_own_converter_reads_our_kohya_and_comfyui_files(tmp_path, warnings_log, fmt):
    """``_convert_non_diffusers_qwen_lora_to_diffusers`` (run by ``lora_state_dict`` for ``lora_unet_`` /
    ``diffusion_model.`` keys and alphas): every key used, every Linear patched, the same ΔW (alpha baked in)."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    lora = qwen_lora(seed=5)
    path = save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(safetensors.torch.load_file(str(path)))
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} == set(shapes())
    model, before, pipe = load_in_diffusers(path)
    assert not complaints(warnings_log), warnings_log
    assert {n for n, m in model.named_modules() if hasattr(m, "lora_A")} == set(shapes())
    assert (qwen_forward(model) - our_applied_output(lora)).abs().max().item() <= TOL
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    assert assert_deltas(moved(model, before, 1.0), reference_deltas(lora)) <= REL
    assert load_lora(path).family == "qwen_image"


# ---------------------------------------------------------------------------------------------------- bake


def write_ckpt(path: Path, prefix: str, dtype: torch.dtype, sd=None) -> Path:
    sd = sd if sd is not None else weights()
    stored = {prefix + k: v.to(dtype) for k, v in sd.items()}
    safetensors.torch.save_file(stored, str(path), metadata={"modelspec.title": "tiny qwen-image"})
    return path


def expected_bake(base: dict[str, torch.Tensor], prefix: str, items) -> dict[str, torch.Tensor]:
    """Stored name → cast(W + Σ s·ΔW) computed in fp64 and rounded once, for every tensor a layer touches."""
    delta = deltas(items)
    return {prefix + k: (base[k].double() + d).to(base[k].dtype) for k, d in delta.items() if d.abs().max() > 0}


def check_baked(out: Path, ckpt: Path, base, prefix: str, items) -> dict[str, torch.Tensor]:
    expected = expected_bake(base, prefix, items)
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
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    return L.LoRA({
        "unet.transformer_blocks.1.img_mod.1": L.LycorisLayer("loha", {"hada_w1_a": rnd(192, 2),
                                                                       "hada_w1_b": rnd(2, 32),
                                                                       "hada_w2_a": rnd(192, 2),
                                                                       "hada_w2_b": rnd(2, 32)}, alpha=1.0),
        "unet.transformer_blocks.0.attn.to_k": L.LycorisLayer("lokr", {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(8, 2),
                                                                       "lokr_w2_b": rnd(2, 8)}, alpha=2.0),
    }, family="qwen_image")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@LAYOUTS
def test_bake_both_layouts(tmp_path, prefix, dtype):
    """kohya (every Linear), diffusers (some, other ranks/alphas) and LyCORIS layers, stacked with strengths."""
    ckpt = write_ckpt(tmp_path / "q.safetensors", prefix, dtype)
    kohya = load_lora(save_lora(qwen_lora(seed=7), tmp_path / "k.safetensors", "kohya"))
    some = qwen_lora(seed=8, modules={"transformer_blocks.0.attn.to_q", "transformer_blocks.1.txt_mlp.net.2",
                                      "img_in", "norm_out.linear"})
    diffusers = load_lora(save_lora(some, tmp_path / "d.safetensors", "diffusers"))
    items = [(kohya, 0.8, 1.0), (diffusers, -0.6, 1.0), (lycoris_lora(10), 0.5, 1.0)]
    report = bake(ckpt, items, tmp_path / "out.safetensors")
    assert report.family == "qwen_image" and not report.unmatched
    assert report.layers == sum(len(lo.layers) for lo, _, _ in items)
    base = {k: v.to(dtype) for k, v in weights().items()}
    expected = check_baked(tmp_path / "out.safetensors", ckpt, base, prefix, items)
    assert set(report.patched) == set(expected)
    assert set(expected) == {prefix + k + ".weight" for k in shapes()}  # the kohya LoRA touches every Linear
    assert all(t.dtype == dtype for t in load(tmp_path / "out.safetensors").values())
    assert no_temp_files(tmp_path)


def test_bake_refusals(tmp_path):
    out = tmp_path / "out.safetensors"
    qwen = write_ckpt(tmp_path / "q.safetensors", "", torch.float32)
    flux = tmp_path / "flux.safetensors"
    save_bfl_checkpoint(flux, tiny_flux_bfl_state_dict())
    with pytest.raises(LoraValueError, match=r"LoRA 1 is for FLUX\.1, the checkpoint is Qwen-Image.*nothing was "
                                             r"written"):
        bake(qwen, [(flux_lora(seed=1), 1.0, 1.0)], out)
    with pytest.raises(LoraValueError, match=r"LoRA 1 is for Qwen-Image, the checkpoint is FLUX\.1"):
        bake(flux, [(qwen_lora(seed=1), 1.0, 1.0)], out, strict=False)
    with pytest.raises(LoraValueError, match=r"LoRA 2 is for Qwen-Image, the checkpoint is FLUX\.1"):
        bake(flux, [(flux_lora(seed=1), 1.0, 1.0), (qwen_lora(seed=1).replace(family=None), 1.0, 1.0)], out)
    bad = L.LoRA({"unet.transformer_blocks.0.img_mod.1": L.LoRALayer(torch.ones(1, 32), torch.ones(64, 1))},
                 family="qwen_image")
    with pytest.raises(LoraValueError, match="wrong shape"):
        bake(qwen, [(bad, 1.0, 1.0)], out)
    assert not out.exists() and no_temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------- extract


def inject(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """Module → a rank-``rank`` ΔW (fp64) on a few weights of every kind."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj",
                   "transformer_blocks.0.img_mod.1", "transformer_blocks.1.txt_mlp.net.0.proj", "img_in",
                   "norm_out.linear"):  # fmt: skip
        n, m = shapes()[module]
        out[module] = (torch.randn(n, rank, generator=g, dtype=torch.float64)
                       @ torch.randn(rank, m, generator=g, dtype=torch.float64)) * 0.02
    return out


def test_extract_from_two_qwen_image_checkpoints(tmp_path):
    injected = inject(12)
    base = weights()
    tuned = {k: (v.double() + injected[k.removesuffix(".weight")]).float() if k.removesuffix(".weight") in injected
             else v.clone() for k, v in base.items()}  # fmt: skip
    write_ckpt(tmp_path / "base.safetensors", "", torch.float32, base)
    write_ckpt(tmp_path / "tuned.safetensors", PREFIX, torch.float32, tuned)
    lora, report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", 4,
                           compute_dtype=torch.float64)
    assert lora.family == "qwen_image"
    assert set(lora.layers) == {f"unet.{m}" for m in injected}  # untouched weights skipped
    assert all(r.new_rank == 4 for r in report.layers)
    path = save_lora(lora, tmp_path / "x.safetensors", "kohya")
    names = set(safetensors.torch.load_file(str(path)))
    assert {"lora_unet_transformer_blocks_0_img_mod_1.lora_down.weight", "lora_unet_img_in.alpha"} <= names
    back = load_lora(path)
    assert back.family == "qwen_image" and set(back.layers) == set(lora.layers)
    worst = 0.0
    for module, delta in injected.items():
        got = back.layers[f"unet.{module}"].delta(torch.float64)
        worst = max(worst, float((got - delta).norm() / delta.norm()))
    assert worst <= 1e-6, worst  # fp32 weights: the difference is rank 4 up to fp32 rounding
    # baked back into the base, the extracted LoRA gives the tuned weights
    bake(tmp_path / "base.safetensors", [(back, 1.0, 1.0)], tmp_path / "rebaked.safetensors")
    rebaked = load(tmp_path / "rebaked.safetensors")
    for name, t in tuned.items():
        step = (t.double() - base[name].double()).norm()
        if step > 0:
            assert float((rebaked[name].double() - t.double()).norm() / step) <= 1e-4, name
        else:
            assert torch.equal(rebaked[name], base[name]), name


def test_extract_refuses_checkpoints_of_two_families(tmp_path):
    write_ckpt(tmp_path / "qwen.safetensors", "", torch.float32)
    save_bfl_checkpoint(tmp_path / "flux.safetensors", tiny_flux_bfl_state_dict())
    for a, b in (("qwen", "flux"), ("flux", "qwen")):
        label = {"qwen": r"Qwen-Image", "flux": r"FLUX\.1"}
        with pytest.raises(LoraValueError, match=rf"the base is a {label[a]} checkpoint, the tuned one {label[b]}"):
            extract(tmp_path / f"{a}.safetensors", tmp_path / f"{b}.safetensors", 4)
    # a given family is used for both, as before: then the shapes disagree
    with pytest.raises(LoraValueError, match="shapes differ"):
        extract(tmp_path / "qwen.safetensors", tmp_path / "flux.safetensors", 4, family="qwen_image")
