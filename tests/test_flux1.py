"""FLUX.1 LoRAs in every spelling of the wild: family detection, row-slice parts, exact conversions."""

import contextlib
import io
import json

import pytest
import torch

from lora_ops import families, fused
from lora_ops import lora as L
from lora_ops.errors import LoraFormatError
from lora_ops.files import load_lora, save_lora
from lora_ops.formats import detect_format, read_lora, write_lora
from lora_ops.formats.diffusers import diffusers_layers, write_peft
from lora_ops.inspect import inspect_lora
from lora_ops.keymap import dotted_to_kohya

H = 16  # hidden width of the synthetic LoRAs (any width works: nothing is hard-coded)
FLUX = families.get("flux1")


def bfl_shapes(h: int = H, blocks: int = 2) -> dict[str, tuple[int, int]]:
    """BFL module → (out, in) of a FLUX.1-shaped transformer of width ``h`` (mlp ratio 4, as released)."""
    shapes = {}
    for i in range(blocks):
        d = f"double_blocks.{i}."
        for s in ("img", "txt"):
            shapes.update({d + f"{s}_attn.qkv": (3 * h, h), d + f"{s}_attn.proj": (h, h), d + f"{s}_mlp.0": (4 * h, h),
                           d + f"{s}_mlp.2": (h, 4 * h), d + f"{s}_mod.lin": (6 * h, h)})
        s = f"single_blocks.{i}."
        shapes.update({s + "linear1": (7 * h, h), s + "linear2": (h, 5 * h), s + "modulation.lin": (3 * h, h)})
    shapes.update({"img_in": (h, 64), "txt_in": (h, 32), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
                   "vector_in.in_layer": (h, 32), "vector_in.out_layer": (h, h), "guidance_in.in_layer": (h, 256),
                   "guidance_in.out_layer": (h, h), "final_layer.linear": (64, h),
                   "final_layer.adaLN_modulation.1": (2 * h, h)})
    return shapes


def flux_lora(seed=0, rank=4, alpha=2.0, h=H, te=True, modules=None) -> L.LoRA:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (out, inp) in bfl_shapes(h).items():
        if modules is None or path in modules:
            layers[f"unet.{path}"] = L.LoRALayer(torch.randn(rank, inp, generator=g),
                                                 torch.randn(out, rank, generator=g), alpha)
    if te:
        layers["te1.text_model.encoder.layers.0.self_attn.q_proj"] = L.LoRALayer(
            torch.randn(rank, 8, generator=g), torch.randn(8, rank, generator=g), alpha)
        layers["te3.encoder.block.0.layer.0.SelfAttention.q"] = L.LoRALayer(
            torch.randn(rank, 8, generator=g), torch.randn(8, rank, generator=g), alpha)
    return L.LoRA(layers, family="flux1")


def fused_deltas(lora: L.LoRA) -> dict[str, torch.Tensor]:
    return {k: layer.delta(torch.float64) for k, layer in fused.fuse(lora).layers.items()}


def assert_same_deltas(got: L.LoRA, want: L.LoRA, tol: float = 1e-6):
    a, b = fused_deltas(got), fused_deltas(want)
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in b:
        err = (a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-30)
        assert err <= tol, (k, err)


# ------------------------------------------------------------------ the family's name maps


def test_every_original_module_has_one_diffusers_name_and_back():
    for path in bfl_shapes():
        spec = FLUX.fused_weight(path)
        for part in [p.name for p in spec.parts] if spec else [None]:
            name = FLUX.to_diffusers(path, part)
            assert FLUX.is_diffusers_path(name) and not FLUX.is_diffusers_path(path)
            assert FLUX.from_diffusers(name) == (path, part)
    assert len(FLUX.fused) == 2


def test_detection_names_flux1_and_unknown_paths_are_errors():
    assert families.detect(["double_blocks.3.img_attn.qkv"]) == "flux1"
    assert families.detect(["single_transformer_blocks.0.proj_mlp"]) == "flux1"
    assert families.detect(["input_blocks.4.1.proj_in"]) is None  # SD 1.x and SDXL share it
    with pytest.raises(LoraFormatError, match="match no known model family.*double_blocks.0.img_attn.qkvx"):
        families.require(["double_blocks.0.img_attn.qkvx"])
    with pytest.raises(LoraFormatError, match="not in the SDXL model; they look like FLUX.1"):
        families.require(["double_blocks.0.img_attn.qkv"], "sdxl")


def test_a_file_mixing_two_families_is_refused_naming_one_module_of_each():
    with pytest.raises(LoraFormatError, match="mixes modules of different model families: double_blocks.0.img_attn"
                                              r".*FLUX.1.*input_blocks.4.1.proj_in \(SD1.x, SDXL\)"):
        families.require(["double_blocks.0.img_attn.qkv", "input_blocks.4.1.proj_in"])


def test_block_indices_are_not_bounded_and_must_be_canonical():
    assert FLUX.knows("double_blocks.118.img_attn.qkv")  # no hard-coded block count
    assert not FLUX.knows("double_blocks.01.img_attn.qkv")
    assert FLUX.block_of("single_blocks.37.linear1") == "single_blocks.37"


# ------------------------------------------------------------------ fuse / split


def test_split_then_fuse_is_exact_and_keeps_ranks():
    lora = flux_lora(te=False)
    parts = fused.split(lora)
    assert "unet.single_blocks.0.linear1[mlp]" in parts.layers
    assert parts["unet.single_blocks.0.linear1[mlp]"].rank == 4  # A shared: rank kept, B split by rows
    assert_same_deltas(parts, lora, tol=0)
    again = fused.fuse(parts)
    assert again["unet.single_blocks.0.linear1"].rank == 16  # cat(A), block-diagonal B
    assert_same_deltas(again, lora, tol=1e-12)
    back = fused.split(again)  # block-diagonal up: the part ranks come back
    assert back["unet.double_blocks.0.img_attn.qkv[k]"].rank == 4
    assert_same_deltas(back, lora, tol=1e-12)


def test_fuse_with_different_scales_per_part_is_exact():
    g = torch.Generator().manual_seed(1)
    parts = {"q": (2, 1.0), "v": (3, 6.0), "mlp": (1, None)}
    layers = {f"unet.single_blocks.0.linear1[{p}]": L.LoRALayer(
        torch.randn(r, H, generator=g), torch.randn(H * (4 if p == "mlp" else 1), r, generator=g), a)
        for p, (r, a) in parts.items()}
    lora = L.LoRA(layers, family="flux1")
    whole = fused.fuse(lora)["unet.single_blocks.0.linear1"]
    ref = torch.zeros(7 * H, H, dtype=torch.float64)
    ref[:H] = layers["unet.single_blocks.0.linear1[q]"].delta(torch.float64)
    ref[2 * H : 3 * H] = layers["unet.single_blocks.0.linear1[v]"].delta(torch.float64)
    ref[3 * H :] = layers["unet.single_blocks.0.linear1[mlp]"].delta(torch.float64)
    assert (whole.delta(torch.float64) - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert whole.rank == 6


def test_parts_that_disagree_on_the_width_are_refused():
    g = torch.Generator().manual_seed(2)
    lora = L.LoRA({"unet.double_blocks.0.img_attn.qkv[q]": L.LoRALayer(torch.randn(2, H, generator=g),
                                                                       torch.randn(H, 2, generator=g)),
                   "unet.double_blocks.0.img_attn.qkv[k]": L.LoRALayer(torch.randn(2, H, generator=g),
                                                                       torch.randn(H + 1, 2, generator=g))},
                  family="flux1")
    with pytest.raises(LoraFormatError, match="different widths"):
        fused.fuse(lora)


def test_lycoris_on_a_fused_weight_stays_fused_and_says_why():
    g = torch.Generator().manual_seed(3)
    lokr = L.LycorisLayer("lokr", {"lokr_w1": torch.randn(3, 2, generator=g), "lokr_w2": torch.randn(H, H // 2,
                                                                                                   generator=g)})
    lora = L.LoRA({"unet.double_blocks.0.img_attn.qkv": lokr}, family="flux1")
    tensors, _ = write_lora(lora, "kohya")  # fused names keep it whole
    assert "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1" in tensors
    with pytest.raises(LoraFormatError, match="lokr layer on a fused weight cannot be split exactly.*kohya"):
        write_lora(lora, "diffusers")
    on_part = L.LoRA({"unet.double_blocks.0.img_attn.qkv[q]": L.LycorisLayer(
        "lokr", {"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2": torch.randn(H // 2, H // 2, generator=g)})},
        family="flux1")
    with pytest.raises(LoraFormatError, match="one part of a fused weight cannot be fused.*applies and bakes"):
        write_lora(on_part, "kohya")


# ------------------------------------------------------------------ every spelling reads as flux1


def _kohya_flat(prefix: str, split: L.LoRA) -> dict[str, torch.Tensor]:
    """A diffusers-named LoRA in kohya suffixes under ``prefix`` (OneTrainer mixture, SimpleTuner lycoris_)."""
    out = {}
    for key, layer in split.layers.items():
        module, part = fused.parse_key(key)
        name = prefix + dotted_to_kohya(FLUX.to_diffusers(module.removeprefix("unet."), part))
        out.update({name + ".lora_down.weight": layer.down, name + ".lora_up.weight": layer.up,
                    name + ".alpha": torch.tensor(layer.alpha)})
    return out


def _spellings(lora: L.LoRA) -> dict[str, dict[str, torch.Tensor]]:
    denoiser = L.filter_layers(lora, "unet.")
    diffusers, _ = write_lora(denoiser, "diffusers")
    split = diffusers_layers(denoiser)
    bare_diffusers = {k.removeprefix("transformer."): v for k, v in diffusers.items()}
    comfy, _ = write_lora(denoiser, "comfyui")
    return {
        "kohya": write_lora(lora, "kohya")[0],
        "comfyui": write_lora(lora, "comfyui")[0],
        "onetrainer-mixture": _kohya_flat("lora_transformer_", split),
        "simpletuner-lycoris": _kohya_flat("lycoris_", split),
        "diffsynth-bare": bare_diffusers,
        "bfl-bare": {k.removeprefix("diffusion_model."): v for k, v in comfy.items()},
        "fal-peft": {"base_model.model." + k: v for k, v in bare_diffusers.items()},
        # fal's Kontext trainer as diffusers' _convert_fal_kontext_lora_to_diffusers reads it: BFL names, PEFT suffixes
        "fal-bfl": {"base_model.model." + k.removeprefix("diffusion_model.").replace(".lora_down.", ".lora_A.")
                    .replace(".lora_up.", ".lora_B."): v for k, v in comfy.items() if not k.endswith(".alpha")},
        "comfyui-diffusers-names": {"diffusion_model." + k: v for k, v in bare_diffusers.items()},
    }


@pytest.mark.parametrize("spelling", ["kohya", "comfyui", "onetrainer-mixture", "simpletuner-lycoris",
                                      "diffsynth-bare", "bfl-bare", "fal-peft", "fal-bfl",
                                      "comfyui-diffusers-names"])
def test_every_spelling_reads_as_flux1_with_the_same_fused_deltas(spelling):
    lora = flux_lora(alpha=4.0)  # alpha = rank where a spelling carries no alpha (diffusers-named, no metadata)
    tensors = _spellings(lora)[spelling]
    got, unused = read_lora(tensors, file=f"{spelling}.safetensors")
    assert unused == [] and got.family == "flux1"
    want = lora if spelling in ("kohya", "comfyui") else L.filter_layers(lora, "unet.")
    assert_same_deltas(got, want)
    report = inspect_lora(got)
    assert report["family"] == "flux1" and report["fused_weights"]["single_blocks.*.linear1"]


def test_diffusers_file_with_alphas_and_text_encoders(tmp_path):
    lora = flux_lora(alpha=3.0)
    path = save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    got = load_lora(path)
    assert got.family == "flux1" and got.source_format == "diffusers"
    assert any(k.startswith("unet.single_blocks.0.linear1[") for k in got.layers)
    assert_same_deltas(got, lora)


def test_the_four_writers_convert_exactly_between_each_other(tmp_path):
    lora = flux_lora(alpha=3.0)
    for a in ("kohya", "comfyui", "diffusers"):
        src = load_lora(save_lora(lora, tmp_path / f"{a}.safetensors", a))
        for b in ("kohya", "comfyui", "diffusers"):
            out = load_lora(save_lora(src, tmp_path / f"{a}-{b}.safetensors", b))
            assert out.family == "flux1"
            assert_same_deltas(out, lora)
        peft_sd, meta = write_peft(L.filter_layers(src, "unet."))
        assert all(k.startswith("base_model.model.") for k in peft_sd)
        got, _ = read_lora(peft_sd, meta)
        assert_same_deltas(got, L.filter_layers(lora, "unet."))


def test_kohya_output_uses_fused_bfl_names_and_family_text_encoder_prefixes():
    tensors, _ = write_lora(fused.split(flux_lora()), "kohya")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in tensors
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in tensors
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in tensors
    comfy, _ = write_lora(flux_lora(), "comfyui")
    assert "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight" in comfy
    assert "diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight" in comfy


def test_onetrainer_t5_prefix_lora_te2_reads_as_t5_in_a_flux_file():
    lora = flux_lora()
    tensors = {k.replace("lora_te3_", "lora_te2_"): v for k, v in write_lora(lora, "kohya")[0].items()}
    got, _ = read_lora(tensors)
    assert "te3.encoder.block.0.layer.0.SelfAttention.q" in got.layers
    assert_same_deltas(got, lora)


def test_final_layer_halves_are_swapped_between_bfl_and_diffusers():
    lora = flux_lora(modules={"final_layer.adaLN_modulation.1"}, te=False)
    tensors, meta = write_lora(lora, "diffusers")
    assert meta.pop("modelspec.architecture") == "flux-1-dev/lora"  # its names alone do not tell: ours say it
    up = tensors["transformer.norm_out.linear.lora_B.weight"]
    bfl_up = lora["unet.final_layer.adaLN_modulation.1"].up
    assert torch.equal(up, torch.cat([bfl_up[H:], bfl_up[:H]]))
    assert_same_deltas(read_lora(tensors, meta, family="flux1")[0], lora, tol=0)
    # norm_out.linear alone is also a Qwen-Image module name: the file must say which model it is for
    with pytest.raises(LoraFormatError, match="names different modules in FLUX.1, Qwen-Image"):
        read_lora(tensors, meta)
    tagged, _ = read_lora(tensors, {**meta, "ss_base_model_version": "flux1"})
    assert tagged.family == "flux1"
    assert_same_deltas(tagged, lora, tol=0)


def test_xlabs_files_read_as_their_kohya_equivalent():
    g = torch.Generator().manual_seed(4)
    r = 4
    tensors = {}
    for i in range(2):
        for name, out, inp in (("qkv_lora1", 3 * H, H), ("proj_lora1", H, H), ("qkv_lora2", 3 * H, H),
                               ("proj_lora2", H, H)):
            tensors[f"double_blocks.{i}.processor.{name}.down.weight"] = torch.randn(r, inp, generator=g)
            tensors[f"double_blocks.{i}.processor.{name}.up.weight"] = torch.randn(out, r, generator=g)
        for name, out, inp in (("qkv_lora", 3 * H, H), ("proj_lora", H, 5 * H)):
            tensors[f"single_blocks.{i}.processor.{name}.down.weight"] = torch.randn(r, inp, generator=g)
            tensors[f"single_blocks.{i}.processor.{name}.up.weight"] = torch.randn(out, r, generator=g)
    assert detect_format(list(tensors)) == "xlabs"
    got, unused = read_lora(tensors)
    assert unused == [] and got.family == "flux1"
    deltas = fused_deltas(got)
    up, down = tensors["single_blocks.1.processor.qkv_lora.up.weight"], tensors[
        "single_blocks.1.processor.qkv_lora.down.weight"]
    linear1 = deltas["unet.single_blocks.1.linear1"]
    assert linear1.shape == (7 * H, H)
    assert torch.allclose(linear1[: 3 * H], (up @ down).double(), atol=1e-5) and not linear1[3 * H :].any()
    qkv = deltas["unet.double_blocks.0.txt_attn.qkv"]
    want = tensors["double_blocks.0.processor.qkv_lora2.up.weight"] @ tensors[
        "double_blocks.0.processor.qkv_lora2.down.weight"]
    assert torch.allclose(qkv, want.double(), atol=1e-5)
    kohya = read_lora(write_lora(got, "kohya")[0])[0]
    assert_same_deltas(kohya, got)


def test_bfl_control_lora_extras_are_refused_with_the_reason():
    tensors = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(2, H),
               "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * H, 2),
               "double_blocks.0.img_attn.qkv.lora_B.bias": torch.randn(3 * H),
               "double_blocks.0.img_attn.norm.key_norm.scale": torch.randn(8)}
    with pytest.raises(LoraFormatError, match="BFL control LoRA.*bias deltas.*strict=False"):
        read_lora(tensors, file="canny.safetensors")
    lora, unused = read_lora(tensors, file="canny.safetensors", strict=False)  # inspect --lenient: what it holds
    assert lora.family == "flux1" and sorted(unused) == sorted(k for k in tensors if not k.endswith("weight"))


def test_kohya_split_qkv_files_read_as_the_trainer_meant():
    g = torch.Generator().manual_seed(5)
    r, alpha = 2, 2.0
    downs = [torch.randn(r, H, generator=g) for _ in range(3)]
    ups = [torch.randn(H, r, generator=g) for _ in range(3)]
    up = torch.block_diag(*ups)  # (3H, 3r): sd-scripts' split_qkv save format, alpha unchanged
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.cat(downs),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha)}
    meta = {"ss_network_args": json.dumps({"split_qkv": "True", "train_blocks": "all"})}
    got, _ = read_lora(tensors, meta)
    want = torch.cat([ups[i] @ downs[i] * (alpha / r) for i in range(3)])  # each part at alpha / r, as trained
    assert torch.allclose(got["unet.double_blocks.0.img_attn.qkv"].delta(), want, atol=1e-6)
    naive, _ = read_lora(tensors)  # without the flag: the file's own rank 3r
    assert torch.allclose(naive["unet.double_blocks.0.img_attn.qkv"].delta() * 3, want, atol=1e-6)
    out, out_meta = write_lora(got, "kohya")  # what we write reads back the same without the flag
    assert "split_qkv" not in out_meta["ss_network_args"]
    again, _ = read_lora(out, out_meta)
    assert torch.allclose(again["unet.double_blocks.0.img_attn.qkv"].delta(), want, atol=1e-6)


def test_a_flux_lora_forced_to_sdxl_names_both_families():
    tensors, _ = write_lora(flux_lora(te=False), "kohya")
    with pytest.raises(LoraFormatError, match="not in the SDXL model; they look like FLUX.1"):
        read_lora(tensors, family="sdxl", file="flux.safetensors")


def test_inspect_reports_flux1_with_counts_per_fused_weight_and_part(tmp_path):
    from lora_ops.cli import main

    path = save_lora(flux_lora(), tmp_path / "d.safetensors", "diffusers")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(buf.getvalue())
    assert report["family"] == "flux1"
    fusedw = report["fused_weights"]
    assert fusedw["single_blocks.*.linear1"] == {"q": 2, "k": 2, "v": 2, "mlp": 2}
    assert fusedw["double_blocks.*.img_attn.qkv"] == {"q": 2, "k": 2, "v": 2}


# ------------------------------------------------------------------ resize, combine on FLUX.1


def _dense_truncation(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("spelling", ["kohya", "diffusers"])
def test_resize_matches_a_dense_svd_truncation_per_written_layer(tmp_path, spelling):
    from lora_ops.resize import resize

    lora = load_lora(save_lora(flux_lora(rank=6, te=False), tmp_path / "in.safetensors", spelling))
    small, _ = resize(lora, 3, compute_dtype=torch.float64)
    assert small.family == "flux1" and set(small.layers) == set(lora.layers)
    for key, layer in small.layers.items():
        want = _dense_truncation(lora[key].delta(torch.float64), 3)
        got = layer.delta(torch.float64)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), key
    out = load_lora(save_lora(small, tmp_path / "out.safetensors", "kohya"))
    assert_same_deltas(out, small)


def test_combine_a_fused_kohya_lora_with_a_split_diffusers_lora(tmp_path):
    from lora_ops.combine import METHODS, combine

    a = load_lora(save_lora(flux_lora(seed=1, te=False), tmp_path / "a.safetensors", "kohya"))
    b = load_lora(save_lora(flux_lora(seed=2, te=False), tmp_path / "b.safetensors", "diffusers"))
    assert any("[" in k for k in b.layers) and not any("[" in k for k in a.layers)
    want = {k: 0.7 * da + 0.4 * fused_deltas(b)[k] for k, da in fused_deltas(a).items()}
    for method in METHODS:
        out, _ = combine([(a, 0.7, None), (b, 0.4, None)], method, seed=3)
        assert out.family == "flux1" and not any("[" in k for k in out.layers), method  # on the fused weights
        if method in ("concat", "svd", "linear"):
            got = fused_deltas(out)
            for k, w in want.items():
                assert (got[k] - w).abs().max() <= 1e-5 * w.abs().max(), (method, k)
        else:
            assert all(torch.isfinite(layer.delta()).all() for layer in out.layers.values()), method
    written = load_lora(save_lora(out, tmp_path / "c.safetensors", "diffusers"))
    assert_same_deltas(written, out, tol=1e-5)


def test_combining_flux_with_sdxl_names_both_families():
    from helpers import sample_lora

    from lora_ops.combine import combine
    from lora_ops.errors import LoraValueError

    with pytest.raises(LoraValueError, match="different models: FLUX.1, SDXL"):
        combine([(flux_lora(te=False), 1.0, None), (sample_lora("sdxl", rank=2), 1.0, None)], "concat")
