"""FLUX.1 single-file checkpoints (BFL names): family and targets, streaming bake (fused rows patched in place,
rounded once), refusals across families, and extraction back to a kohya-format FLUX.1 LoRA."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_bake import assert_within_ulp, load, no_temp_files, raw, write_checkpoint

from lora_ops import fused
from lora_ops import lora as L
from lora_ops.bake import bake
from lora_ops.cli import main
from lora_ops.errors import LoraFileError, LoraFormatError, LoraValueError
from lora_ops.extract import extract
from lora_ops.files import load_lora, save_lora
from lora_ops.keymap import checkpoint_family, checkpoint_targets
from lora_ops.testing.tiny_flux import save_bfl_checkpoint, tiny_flux_bfl_state_dict

PREFIX = "model.diffusion_model."
PREFIXES = pytest.mark.parametrize("prefix", ["", PREFIX], ids=["top-level", "prefixed"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# Rows of the fused weights in units of the hidden width (BFL: qkv = [q; k; v], linear1 = [q; k; v; mlp]).
PART_UNITS = {"qkv": {"q": (0, 1), "k": (1, 2), "v": (2, 3)},
              "linear1": {"q": (0, 1), "k": (1, 2), "v": (2, 3), "mlp": (3, 7)}}  # fmt: skip


@pytest.fixture(scope="module")
def bfl() -> dict[str, torch.Tensor]:
    return tiny_flux_bfl_state_dict(seed=0)


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """BFL module → (out, in) for every 2-D ``.weight`` (the Linear layers a LoRA can target)."""
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2}


def random_lora(shapes, seed: int, *, rank: int = 4, alpha: float | None = 2.0, modules=None) -> L.LoRA:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (out, inp) in shapes.items():
        if modules is None or path in modules:
            layers[f"unet.{path}"] = L.LoRALayer(torch.randn(rank, inp, generator=g) * 0.1,
                                                 torch.randn(out, rank, generator=g) * 0.1, alpha)
    return L.LoRA(layers, family="flux1")


def part_lora(seed: int) -> L.LoRA:
    """Layers on parts of fused weights with different ranks and alphas, beside plain layers (diffusers-like)."""
    g = torch.Generator().manual_seed(seed)

    def lay(out, inp, rank, alpha):
        return L.LoRALayer(torch.randn(rank, inp, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1,
                           alpha)

    h = 128
    return L.LoRA({
        "unet.double_blocks.0.img_attn.qkv[q]": lay(h, h, 2, 1.0),
        "unet.double_blocks.0.img_attn.qkv[k]": lay(h, h, 4, 4.0),
        "unet.double_blocks.0.img_attn.qkv[v]": lay(h, h, 3, None),
        "unet.double_blocks.1.txt_attn.qkv[k]": lay(h, h, 4, 2.0),
        "unet.single_blocks.0.linear1[mlp]": lay(4 * h, h, 3, 1.5),
        "unet.single_blocks.1.linear1[q]": lay(h, h, 2, 2.0),
        "unet.single_blocks.1.linear1[v]": lay(h, h, 2, 1.0),
        "unet.double_blocks.0.img_attn.proj": lay(h, h, 2, 1.0),
        "unet.final_layer.adaLN_modulation.1": lay(2 * h, h, 2, 1.0),
    }, family="flux1")  # fmt: skip


def write_ckpt(path: Path, sd, dtype: torch.dtype, prefix: str = "") -> Path:
    save_bfl_checkpoint(path, {k: v.to(dtype) for k, v in sd.items()}, prefix=prefix)
    return path


def reference(base: dict[str, torch.Tensor], prefix: str, items) -> dict[str, torch.Tensor]:
    """Each patched tensor's W + Σ s·ΔW in fp64 from the dense ΔW of every layer, rounded once to its dtype.

    Part rows come from the hidden width (``img_in`` rows) and the BFL layout, not from lora_ops' tables.
    """
    h = base[prefix + "img_in.weight"].shape[0]
    acc: dict[str, torch.Tensor] = {}
    for lora, sm, _st in items:
        for key, layer in lora.layers.items():
            m = re.fullmatch(r"unet\.(.+?)(?:\[(\w+)\])?", key)
            module, part = m.group(1), m.group(2)
            name = f"{prefix}{module}.weight"
            w = acc.setdefault(name, base[name].double())
            rows = slice(None)
            if part is not None:
                a, b = PART_UNITS[module.rsplit(".", 1)[1]][part]
                rows = slice(a * h, b * h)
            w[rows] += sm * layer.delta(torch.float64).reshape(w[rows].shape)
    return {k: v.to(base[k].dtype) for k, v in acc.items()}


def check_baked(out: Path, base_path: Path, prefix: str, items) -> dict[str, torch.Tensor]:
    """Patched tensors within one ulp of the fp64 reference (rounded once), all others byte-identical."""
    base, got = load(base_path), load(out)
    expected = reference(base, prefix, items)
    assert set(got) == set(base)
    raw_in, raw_out = raw(base_path), raw(out)
    for name, t in got.items():
        if name in expected:
            assert_within_ulp(t, expected[name], name)
        else:
            assert raw_out[name] == raw_in[name], name
    return expected


# ------------------------------------------------------------------------------------- family and targets


@PREFIXES
def test_checkpoint_family_and_targets(bfl, prefix):
    keys = {prefix + k: v for k, v in bfl.items()}
    assert checkpoint_family(keys) == "flux1"
    extra = {"text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(2, 2),
             "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2),
             "vae.decoder.conv_in.weight": torch.zeros(2, 2, 3, 3), "first_stage_model.encoder.conv_in.weight":
             torch.zeros(2, 2, 3, 3)}  # fmt: skip
    assert checkpoint_family({**keys, **extra}) == "flux1"  # an all-in-one file: text encoders and VAE beside
    targets = checkpoint_targets({**keys, **extra}, "flux1")
    linear = shapes_of(bfl)
    assert set(targets) == {f"unet.{p}" for p in linear}  # every 2-D Linear weight, nothing else
    assert len(targets) == 36 and "unet.double_blocks.0.img_attn.qkv" in targets
    for key, slot in targets.items():
        assert slot.tensor == f"{prefix}{key.removeprefix('unet.')}.weight"
        assert slot.chunk is None and not slot.transpose
        assert torch.equal(slot.read(keys[slot.tensor]), bfl[slot.tensor.removeprefix(prefix)])


def test_flux1_detection_needs_evidence_and_refuses_doubles(bfl):
    assert checkpoint_family(["double_blocks.0.img_attn.norm.query_norm.scale"]) is None  # no Linear: no evidence
    assert checkpoint_family(["single_blocks.0.linear1.weight"]) == "flux1"
    assert checkpoint_family(["txt_in.weight"]) is None  # Qwen-Image has a txt_in too
    both = [*bfl, *(PREFIX + k for k in bfl)]
    with pytest.raises(LoraFormatError, match="two tensors hold the same weight"):
        checkpoint_targets(both, "flux1")
    with pytest.raises(LoraValueError, match="not supported"):
        checkpoint_targets(bfl, "flux1", component="unet")
    mixed = checkpoint_targets(["double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.to_q.weight"],
                               "flux1")
    assert set(mixed) == {"unet.double_blocks.0.img_attn.qkv"}  # diffusers spellings are not single-file names


# -------------------------------------------------------------------------------------------------- bake


@DTYPES
@PREFIXES
def test_bake_kohya_and_diffusers_files_stacked(tmp_path, bfl, dtype, prefix):
    """A kohya (fused) file and a diffusers (split: part layers) file, stacked with strengths."""
    ckpt = write_ckpt(tmp_path / "flux.safetensors", bfl, dtype, prefix)
    shapes = shapes_of(bfl)
    kohya = load_lora(save_lora(random_lora(shapes, 1), tmp_path / "k.safetensors", "kohya"))
    split = fused.split(random_lora(shapes, 2, rank=3, alpha=1.5,
                                    modules={"double_blocks.1.img_attn.qkv", "single_blocks.0.linear1",
                                             "double_blocks.0.txt_mlp.0"}))  # fmt: skip
    split = split.replace(layers={**split.layers, **part_lora(3).layers})
    diffusers_path = save_lora(split, tmp_path / "d.safetensors", "diffusers")
    diffusers = load_lora(diffusers_path)
    assert diffusers.family == "flux1" and fused.has_parts(diffusers)  # the file really holds part layers
    assert not fused.has_parts(kohya) and kohya.family == "flux1"
    items = [(kohya, 0.8, 1.0), (diffusers, -0.6, 1.0)]
    report = bake(ckpt, items, tmp_path / "out.safetensors")
    assert report.family == "flux1" and not report.unmatched
    assert report.layers == len(kohya.layers) + len(diffusers.layers)
    expected = check_baked(tmp_path / "out.safetensors", ckpt, prefix, items)
    assert set(report.patched) == set(expected) == {f"{prefix}{p}.weight" for p in shapes}
    assert all(t.dtype == dtype for t in load(tmp_path / "out.safetensors").values())
    # the diffusers file alone, through the CLI (detected as FLUX.1, strengths from the command line)
    out = tmp_path / "cli.safetensors"
    assert main(["bake", str(ckpt), f"{diffusers_path}:0.7", "-o", str(out), "-q"]) == 0
    check_baked(out, ckpt, prefix, [(diffusers, 0.7, 0.7)])
    assert no_temp_files(tmp_path)


@DTYPES
def test_part_layers_patch_only_their_rows_as_fused_would(tmp_path, bfl, dtype):
    ckpt = write_ckpt(tmp_path / "flux.safetensors", bfl, dtype)
    parts = part_lora(4)
    bake(ckpt, [(parts, 1.3, 0.0)], tmp_path / "parts.safetensors")
    expected = check_baked(tmp_path / "parts.safetensors", ckpt, "", [(parts, 1.3, 0.0)])
    base, got = load(ckpt), load(tmp_path / "parts.safetensors")
    h = 128
    qkv = "double_blocks.1.txt_attn.qkv.weight"  # only [k]: rows of q and v untouched, bit for bit
    assert torch.equal(got[qkv][:h], base[qkv][:h]) and torch.equal(got[qkv][2 * h:], base[qkv][2 * h:])
    assert not torch.equal(got[qkv][h:2 * h], base[qkv][h:2 * h])
    lin = "single_blocks.0.linear1.weight"  # only [mlp]: q, k, v rows untouched
    assert torch.equal(got[lin][:3 * h], base[lin][:3 * h]) and not torch.equal(got[lin][3 * h:], base[lin][3 * h:])
    # the same as fusing first (lora_ops.fused.fuse: cat down, block-diagonal up) and baking whole layers
    whole = fused.fuse(parts)
    assert not fused.has_parts(whole)
    bake(ckpt, [(whole, 1.3, 0.0)], tmp_path / "fused.safetensors")
    again = load(tmp_path / "fused.safetensors")
    for name, t in expected.items():
        assert_within_ulp(again[name], t, name)


def test_lycoris_and_whole_layers_on_parts_of_one_weight(tmp_path, bfl):
    """A LoKr layer on one part (SimpleTuner lycoris_ files keep diffusers' split names) cannot be fused exactly,
    but baking its rows in place is exact; a whole layer on the same weight in the same LoRA adds to all rows."""
    ckpt = write_ckpt(tmp_path / "flux.safetensors", bfl, torch.float32)
    g = torch.Generator().manual_seed(5)
    lokr = L.LycorisLayer("lokr", {"lokr_w1": torch.randn(4, 4, generator=g) * 0.1,
                                   "lokr_w2_a": torch.randn(32, 2, generator=g) * 0.1,
                                   "lokr_w2_b": torch.randn(2, 32, generator=g) * 0.1}, alpha=1.0)  # (128, 128)
    loha = L.LycorisLayer("loha", {k: torch.randn(*s, generator=g) * 0.2 for k, s in
                                   {"hada_w1_a": (512, 2), "hada_w1_b": (2, 128), "hada_w2_a": (512, 2),
                                    "hada_w2_b": (2, 128)}.items()}, alpha=1.0)  # fmt: skip
    whole = L.LoRALayer(torch.randn(2, 128, generator=g) * 0.1, torch.randn(896, 2, generator=g) * 0.1, 2.0)
    lora = L.LoRA({"unet.double_blocks.0.img_attn.qkv[v]": lokr, "unet.single_blocks.1.linear1[mlp]": loha,
                   "unet.single_blocks.1.linear1": whole}, family="flux1")  # fmt: skip
    with pytest.raises(LoraFormatError, match="cannot be fused into it exactly"):
        fused.fuse(lora)
    bake(ckpt, [(lora, 0.9, 1.0)], tmp_path / "out.safetensors")
    check_baked(tmp_path / "out.safetensors", ckpt, "", [(lora, 0.9, 1.0)])


def test_bf16_parts_round_once_from_the_exact_value(tmp_path):
    """Bit for bit: every stored bf16 element is the exact W + Σ s·ΔW (rational arithmetic) correctly rounded, on
    a narrow BFL file (width 8: the part rows come from the stored shape, not from FLUX.1's real widths)."""
    from test_rounding import correctly_rounded

    g = torch.Generator().manual_seed(7)
    h = 8
    names = {"double_blocks.0.img_attn.qkv.weight": (3 * h, h), "single_blocks.0.linear1.weight": (7 * h, h)}
    stored = {n: (torch.randn(*s, generator=g) * 0.1).to(torch.bfloat16) for n, s in names.items()}
    stored["double_blocks.0.img_attn.qkv.bias"] = torch.zeros(3 * h, dtype=torch.bfloat16)
    safetensors.torch.save_file(stored, str(tmp_path / "a.safetensors"))
    assert checkpoint_family(stored) == "flux1"

    def lay(out, rank, alpha):
        return L.LoRALayer(torch.randn(rank, h, generator=g) * 0.1, torch.randn(out, rank, generator=g) * 0.1, alpha)

    layers = {"unet.double_blocks.0.img_attn.qkv[k]": lay(h, 2, 1.0), "unet.double_blocks.0.img_attn.qkv": lay(
        3 * h, 3, 1.0), "unet.single_blocks.0.linear1[mlp]": lay(4 * h, 2, 3.0),
        "unet.single_blocks.0.linear1[q]": lay(h, 1, 1.0)}  # fmt: skip
    lora = L.LoRA(layers, family="flux1")
    bake(tmp_path / "a.safetensors", [(lora, 0.7, 1.0)], tmp_path / "b.safetensors")
    got = load(tmp_path / "b.safetensors")
    for name, w in stored.items():
        if not name.endswith(".weight"):
            assert torch.equal(got[name], w)
            continue
        module = name.removesuffix(".weight")
        exact = [[Fraction(v) for v in row] for row in w.double().tolist()]
        for key, layer in layers.items():
            m = re.fullmatch(r"unet\.(.+?)(?:\[(\w+)\])?", key)
            if m.group(1) != module:
                continue
            start = 0 if m.group(2) is None else PART_UNITS[module.rsplit(".", 1)[1]][m.group(2)][0] * h
            up, down = layer.up.double().tolist(), layer.down.double().tolist()
            s = Fraction(0.7) * Fraction(layer.scale)
            for i, up_row in enumerate(up):
                for j in range(h):
                    exact[start + i][j] += s * sum(Fraction(u) * Fraction(down[r][j]) for r, u in enumerate(up_row))
        expected = [[correctly_rounded(e, torch.bfloat16) for e in row] for row in exact]
        assert got[name].double().tolist() == expected, name


# ------------------------------------------------------------------------------------------------ refusals


def test_flux1_lora_on_sdxl_checkpoint_and_back_is_one_clear_error(tmp_path, bfl):
    from helpers import sample_lora

    sdxl = write_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    flux = write_ckpt(tmp_path / "flux.safetensors", bfl, torch.bfloat16)
    flux_lora = random_lora(shapes_of(bfl), 1, modules={"double_blocks.0.img_attn.qkv", "img_in"})
    flux_lora = flux_lora.replace(layers={**flux_lora.layers, **part_lora(2).layers,  # with CLIP-L: it exists in SDXL
                                          "te1.text_model.encoder.layers.0.self_attn.q_proj": L.LoRALayer(
                                              torch.ones(1, 32), torch.ones(32, 1))})  # fmt: skip
    out = tmp_path / "out.safetensors"
    for strict in (True, False):
        with pytest.raises(LoraValueError, match=r"LoRA 1 is for FLUX\.1, the checkpoint is SDXL.*nothing was written"):
            bake(sdxl, [(flux_lora, 1.0, 1.0)], out, strict=strict)
        unnamed = flux_lora.replace(family=None)  # the names alone tell
        with pytest.raises(LoraValueError, match=r"is for FLUX\.1, the checkpoint is SDXL"):
            bake(sdxl, [(unnamed, 1.0, 1.0)], out, strict=strict)
        with pytest.raises(LoraValueError, match=r"LoRA 2 is for SDXL, the checkpoint is FLUX\.1"):
            bake(flux, [(flux_lora, 1.0, 1.0), (sample_lora("sdxl", attention_only=True), 1.0, 1.0)], out,
                 strict=strict)
    with pytest.raises(LoraValueError, match=r"is for FLUX\.1, the checkpoint is SD1\.x"):
        bake(sdxl, [(flux_lora, 1.0, 1.0)], out, family="sd1")
    assert not out.exists() and no_temp_files(tmp_path)


def test_other_flux1_refusals(tmp_path, bfl):
    ckpt = write_ckpt(tmp_path / "flux.safetensors", bfl, torch.float32)
    out = tmp_path / "out.safetensors"
    lora = random_lora(shapes_of(bfl), 1, modules={"img_in"})
    te = lora.replace(layers={**lora.layers, "te3.encoder.block.0.layer.0.SelfAttention.q": L.LoRALayer(
        torch.ones(1, 8), torch.ones(8, 1))})  # text encoders are not in FLUX.1 single files
    with pytest.raises(LoraValueError, match="1 LoRA layers have no weight"):
        bake(ckpt, [(te, 1.0, 1.0)], out)
    report = bake(ckpt, [(te, 1.0, 1.0)], out, strict=False)
    assert report.patched == ("img_in.weight",) and report.coverage.unmatched_count == 1
    bad = L.LoRA({"unet.double_blocks.0.img_attn.qkv[q]": L.LoRALayer(torch.ones(1, 128), torch.ones(100, 1))},
                 family="flux1")
    with pytest.raises(LoraValueError, match="wrong shape"):
        bake(ckpt, [(bad, 1.0, 1.0)], tmp_path / "o2.safetensors")
    folder = tmp_path / "FLUX.1-dev"
    (folder / "transformer").mkdir(parents=True)
    safetensors.torch.save_file({"x_embedder.weight": torch.ones(2, 2)},
                                str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(LoraFileError, match="FLUX.1 are not supported"):
        bake(folder, [(lora, 1.0, 1.0)], tmp_path / "o3")
    assert not (tmp_path / "o2.safetensors").exists() and not (tmp_path / "o3").exists()


# ------------------------------------------------------------------------------------------------ extract


def inject(base: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, tuple[str, torch.Tensor]]:
    """Module → (rows, ΔW): rank-``rank`` deltas on fused weights (whole, or only a part's rows) and plain ones."""
    g = torch.Generator().manual_seed(seed)
    h = base["img_in.weight"].shape[0]
    out = {}
    for module, rows in {"double_blocks.0.img_attn.qkv": slice(None), "double_blocks.1.txt_attn.qkv":
                         slice(h, 2 * h), "single_blocks.1.linear1": slice(None), "single_blocks.0.linear1":
                         slice(3 * h, 7 * h), "double_blocks.1.img_mlp.2": slice(None), "img_in": slice(None),
                         "single_blocks.0.linear2": slice(None)}.items():  # fmt: skip
        w = base[module + ".weight"]
        delta = torch.zeros(w.shape, dtype=torch.float64)
        n = delta[rows].shape[0]
        delta[rows] = (torch.randn(n, rank, generator=g, dtype=torch.float64)
                       @ torch.randn(rank, w.shape[1], generator=g, dtype=torch.float64)) * 0.02
        out[module] = delta
    return out


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_extract_from_two_bfl_checkpoints_recovers_the_deltas(tmp_path, bfl, dtype, tol):
    """base (top level) and tuned (under model.diffusion_model.) = base + injected rank-4 deltas; bf16 stores the
    tuned weights rounded, so its difference is only rank 4 up to bf16 rounding (≈ 2^-9 of the weights)."""
    base = {k: v.to(dtype) for k, v in bfl.items()}
    deltas = inject(bfl, 4, seed=11)
    tuned = {k: ((v.double() + deltas[k[:-7]]).to(dtype) if k[:-7] in deltas and k.endswith(".weight") else v)
             for k, v in base.items()}  # fmt: skip
    write_ckpt(tmp_path / "base.safetensors", base, dtype)
    write_ckpt(tmp_path / "tuned.safetensors", tuned, dtype, PREFIX)
    lora, report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", 4,
                           compute_dtype=torch.float64)
    assert lora.family == "flux1"
    assert set(lora.layers) == {f"unet.{m}" for m in deltas}  # whole layers; untouched weights skipped
    assert all(r.new_rank == 4 for r in report.layers)
    path = save_lora(lora, tmp_path / "x.safetensors", "kohya")
    names = set(safetensors.torch.load_file(str(path)))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in names
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in names and "lora_unet_img_in.alpha" in names
    back = load_lora(path)
    assert back.family == "flux1" and set(back.layers) == set(lora.layers)
    for module, delta in deltas.items():
        exact = (tuned[module + ".weight"].double() - base[module + ".weight"].double()) if dtype != torch.float32 \
            else delta
        got = back.layers[f"unet.{module}"].delta(torch.float64)
        rel = float((got - delta).norm() / delta.norm())
        assert rel <= tol, (module, rel)
        assert float((got - exact).norm() / exact.norm()) <= tol, module
    # baked back into the base, the extracted LoRA gives the tuned weights (to the extraction's accuracy)
    bake(tmp_path / "base.safetensors", [(back, 1.0, 1.0)], tmp_path / "rebaked.safetensors")
    rebaked = load(tmp_path / "rebaked.safetensors")
    for module in deltas:
        w, t = rebaked[module + ".weight"].double(), tuned[module + ".weight"].double()
        assert float((w - t).norm() / (t - base[module + ".weight"].double()).norm()) <= 2 * tol


def test_extract_without_a_family_is_an_error_naming_the_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"model.diffusion_model.foo.proj.weight": torch.randn(8, 8, generator=g)}
    tuned = {k: v + 0.1 * torch.ones(8, 1) @ torch.ones(1, 8) for k, v in base.items()}
    with pytest.raises(LoraValueError, match=r"cannot tell the model family.*model\.diffusion_model\.foo\.proj"):
        extract(base, tuned, 1)
    lora, _ = extract(base, tuned, 1, family="sd1")  # a given family is used as is
    assert set(lora.layers) == {"unet.foo.proj"} and lora.family == "sd1"
    safetensors.torch.save_file(base, str(tmp_path / "b.safetensors"))
    safetensors.torch.save_file(tuned, str(tmp_path / "t.safetensors"))
    with pytest.raises(LoraValueError, match="pass family="):
        extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", 1)
