"""Streaming bake: exact results (fp64 reference, ≤ 1 ulp), untouched bytes, dtypes, refusals, peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers.loaders import single_file_utils as sfu
from helpers import sample_lora
from test_checkpoint_keys import OPEN_CLIP_PREFIX, pipeline, single_file_state

from lora_ops import io
from lora_ops.bake import BakeReport, bake
from lora_ops.errors import LoraFileError, LoraValueError
from lora_ops.keymap import checkpoint_targets, te_to_canonical_path
from lora_ops.lora import LoRA, LoRALayer, LycorisLayer, is_text_encoder_key

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- helpers


def write_checkpoint(path: Path, family: str, dtype: torch.dtype = torch.float32, **meta: str) -> Path:
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in single_file_state(family).items()}
    safetensors.torch.save_file(sd, str(path), metadata={"modelspec.title": "tiny", **meta})
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def raw(path: Path) -> dict[str, bytes]:
    """Each tensor's bytes as stored in the file."""
    header, start = io.read_safetensors_header(path)
    data = path.read_bytes()
    return {k: data[start + v["data_offsets"][0] : start + v["data_offsets"][1]] for k, v in header.items()
            if k != "__metadata__"}  # fmt: skip


def ordered(t: torch.Tensor) -> torch.Tensor:
    """Float bits as integers ordered like the values (adjacent floats differ by 1; ±0 both map to 0)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    i = t.contiguous().view(ints).to(torch.int64)
    mag = i & ((1 << (8 * t.element_size() - 1)) - 1)
    return torch.where(i < 0, -mag, mag)


def assert_within_ulp(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    diff = (ordered(got) - ordered(expected)).abs().max().item() if got.numel() else 0
    assert diff <= 1, f"{what}: {diff} ulps off"


def reference(
    base: dict[str, torch.Tensor], family: str, items, out_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every patched tensor's W + Σ s·ΔW, computed independently in fp64 from the dense ΔW, rounded once."""
    targets = checkpoint_targets(base, family)
    acc: dict[str, torch.Tensor] = {}
    for lora, sm, st in items:
        for key, layer in lora.layers.items():
            if key not in targets:
                continue
            slot = targets[key]
            w = acc.setdefault(slot.tensor, base[slot.tensor].double())
            delta = layer.delta(torch.float64).reshape(slot.shape(tuple(w.shape)))
            s = st if is_text_encoder_key(key) else sm
            slot.read(w).add_(delta, alpha=s)  # a view: rows of a fused tensor, or the transposed projection
    return {k: v.to(out_dtype or base[k].dtype) for k, v in acc.items()}


def lycoris_lora(family: str, seed: int = 1) -> LoRA:
    """LoHa (plain and Tucker), LoKr (linear, conv and Tucker conv) and a Tucker LoCon on real keys of the tiny UNet."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    attn = "unet.input_blocks.4.1"
    layers = {
        # SD1 proj_in is a 1x1 conv (64, 64, 1, 1): the 2-D LoHa ΔW is reshaped onto it.
        f"{attn}.proj_in": LycorisLayer("loha", {"hada_w1_a": r(64, 2), "hada_w1_b": r(2, 64),
                                                 "hada_w2_a": r(64, 2), "hada_w2_b": r(2, 64)}, alpha=1.0),
        f"{attn}.transformer_blocks.0.attn1.to_q": LycorisLayer(
            "lokr", {"lokr_w1": r(4, 4), "lokr_w2_a": r(16, 2), "lokr_w2_b": r(2, 16)}, alpha=1.0),
        # input_blocks.4.0.in_layers.2: a 3x3 conv (64, 32, 3, 3)
        "unet.input_blocks.4.0.in_layers.2": LycorisLayer("lokr", {"lokr_w1": r(4, 2), "lokr_w2": r(16, 16, 3, 3)}),
        "unet.input_blocks.4.0.out_layers.3": LycorisLayer(
            "loha", {"hada_t1": r(2, 2, 3, 3), "hada_w1_a": r(2, 64), "hada_w1_b": r(2, 64),
                     "hada_t2": r(2, 2, 3, 3), "hada_w2_a": r(2, 64), "hada_w2_b": r(2, 64)}, alpha=2.0),
        # output_blocks.2.0.out_layers.3: (64, 64, 3, 3), a Tucker LoKr (its w2 is a permuted einsum result)
        "unet.output_blocks.2.0.out_layers.3": LycorisLayer(
            "lokr", {"lokr_w1": r(4, 4), "lokr_t2": r(2, 2, 3, 3), "lokr_w2_a": r(2, 16), "lokr_w2_b": r(2, 16)},
            alpha=1.0),
        # output_blocks.2.0.in_layers.2: (64, 128, 3, 3)
        "unet.output_blocks.2.0.in_layers.2": LoRALayer(down=r(4, 128, 1, 1), up=r(64, 4, 1, 1), mid=r(4, 4, 3, 3),
                                                        alpha=2.0),
    }  # fmt: skip
    return LoRA(layers, family=family)


def check_baked(out: Path, base_path: Path, family: str, items, out_dtype: torch.dtype | None = None):
    base, got = load(base_path), load(out)
    expected = reference(base, family, items, out_dtype)
    assert set(got) == set(base)
    raw_in, raw_out = raw(base_path), raw(out)
    for name, t in got.items():
        if name in expected:
            assert_within_ulp(t, expected[name], name)
        elif out_dtype is None or not base[name].is_floating_point():
            assert raw_out[name] == raw_in[name], name  # untouched: byte-identical
        else:
            assert t.dtype == out_dtype and torch.equal(t, base[name].to(out_dtype)), name
    return expected


def no_temp_files(folder: Path) -> bool:
    return not any(p.name.startswith(".") and p.name.endswith((".tmp", ".old")) for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------- exactness


def test_bake_sd1_exact_and_untouched_bytes(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    items = [(sample_lora("sd1", seed=3), 0.8, 0.5), (lycoris_lora("sd1"), -1.3, 1.0)]
    report = bake(base, items, tmp_path / "out.safetensors")
    assert isinstance(report, BakeReport)
    expected = check_baked(tmp_path / "out.safetensors", base, "sd1", items)
    assert set(report.patched) == set(expected)
    assert report.layers == sum(len(lora.layers) for lora, _, _ in items)
    assert report.family == "sd1" and report.dtype == "keep" and not report.unmatched
    assert all(t.dtype == torch.float32 for t in load(tmp_path / "out.safetensors").values())
    assert "baked" in report.summary()


def test_bake_sdxl_fp16_fused_open_clip(tmp_path):
    base = write_checkpoint(tmp_path / "xl.safetensors", "sdxl", torch.float16)
    lora = sample_lora("sdxl", seed=5)
    assert any(k.startswith("te2.") and "q_proj" in k for k in lora.layers)
    assert "te2.text_projection" in lora.layers
    items = [(lora, 0.7, 1.1), (lycoris_lora("sdxl"), 0.5, 0.5)]
    bake(base, items, tmp_path / "out.safetensors")
    check_baked(tmp_path / "out.safetensors", base, "sdxl", items)
    got = load(tmp_path / "out.safetensors")
    assert all(t.dtype == torch.float16 for t in got.values() if t.is_floating_point())

    # End to end through diffusers' own converter: te2 weights are the pipeline's + s·ΔW, q/k/v and projection.
    te2 = pipeline("sdxl").text_encoder_2
    converted = sfu.convert_open_clip_checkpoint(te2, got, prefix=OPEN_CLIP_PREFIX)
    for name, w in te2.state_dict().items():
        key = "te2." + te_to_canonical_path(name).removesuffix(".weight")
        if key in lora.layers and name.endswith(".weight"):
            exp = (w.half().double() + 1.1 * lora.layers[key].delta(torch.float64)).half()
            assert_within_ulp(converted[te_to_canonical_path(name)], exp, key)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_output_dtype(tmp_path, dtype, torch_dtype):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1", torch.float16)
    items = [(sample_lora("sd1", seed=7, attention_only=True), 1.0, 1.0)]
    report = bake(base, items, tmp_path / "out.safetensors", dtype=dtype)
    assert report.dtype == dtype
    check_baked(tmp_path / "out.safetensors", base, "sd1", items, torch_dtype)


def test_header_is_valid_aligned_and_keeps_metadata(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1", torch.float16, note="kept")
    bake(base, [(sample_lora("sd1"), 1.0, 1.0)], tmp_path / "out.safetensors", dtype="fp32", metadata={"x": "1"})
    header, start = io.read_safetensors_header(tmp_path / "out.safetensors")  # every safetensors rule holds
    assert start % 8 == 0
    assert header["__metadata__"] == {"modelspec.title": "tiny", "note": "kept", "x": "1"}
    for name, info in header.items():
        if name != "__metadata__":
            size = io.SAFETENSORS_DTYPES[info["dtype"]][1] // 8
            assert info["data_offsets"][0] % size == 0, name  # aligned to its element size
    raw_header = (tmp_path / "out.safetensors").read_bytes()[8:start]
    assert raw_header.rstrip(b" ") == raw_header.strip() and json.loads(raw_header) == header


def test_zero_strength_changes_nothing(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    report = bake(base, [(sample_lora("sd1"), 0.0, 0.0)], tmp_path / "out.safetensors")
    assert report.patched == () and report.layers == 0
    assert raw(tmp_path / "out.safetensors") == raw(base)


def test_diffusers_folder(tmp_path):
    from diffusers import UNet2DConditionModel

    src = tmp_path / "pipe"
    pipeline("sdxl").save_pretrained(src, safe_serialization=True)
    (src / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"stale pickle")  # would hold the unbaked weights
    lora = sample_lora("sdxl", seed=9, attention_only=True)
    report = bake(src, [(lora, 0.9, 0.4)], tmp_path / "baked", progress=True)
    out = tmp_path / "baked"
    assert set(report.files) == {
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    }
    assert not (out / "unet" / "diffusion_pytorch_model.bin").exists()
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if path.is_file() and rel.parts[0] not in ("unet", "text_encoder", "text_encoder_2"):
            assert (out / rel).read_bytes() == path.read_bytes(), rel  # configs, tokenizers, VAE copied verbatim
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    base = pipeline("sdxl").unet
    key = "unet.input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    module = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    exp = (base.get_submodule(module).weight.double() + 0.9 * lora.layers[key].delta(torch.float64)).float()
    assert_within_ulp(unet.get_submodule(module).weight.detach(), exp, key)
    for part in ("text_encoder", "text_encoder_2"):
        stored = load(out / part / "model.safetensors")
        original = load(src / part / "model.safetensors")
        for k, slot in checkpoint_targets(stored, "sdxl", component=part).items():
            if k in lora.layers:
                exp = (original[slot.tensor].double() + 0.4 * lora.layers[k].delta(torch.float64)).float()
                assert_within_ulp(stored[slot.tensor], exp, k)
    assert no_temp_files(tmp_path)
    # overwrite=True replaces a whole existing folder
    bake(src, [(lora, 0.0, 0.0)], out, overwrite=True)
    assert load(out / "unet" / "diffusion_pytorch_model.safetensors").keys() == base.state_dict().keys()
    assert no_temp_files(tmp_path)


def exact_bake(w: torch.Tensor, layer: LoRALayer, strength: float = 1.0) -> list[list[Fraction]]:
    """W + strength · (alpha/r) · up · down in exact rational arithmetic (no rounding anywhere)."""
    up, down = layer.up.double().tolist(), layer.down.double().tolist()
    s = Fraction(strength) * Fraction(layer.scale)
    rows = w.double().tolist()
    return [[Fraction(rows[i][j]) + s * sum(Fraction(up[i][k]) * Fraction(down[k][j]) for k in range(layer.rank))
             for j in range(len(rows[0]))] for i in range(len(rows))]  # fmt: skip


def test_fp8_fp16_bf16_fp64_and_integer_tensors_round_once_from_the_exact_value(tmp_path):
    """Narrow dtypes: the stored result is the exact W + s·ΔW correctly rounded, bit for bit, on any CPU (the fp64
    accumulation is far inside half an ulp, and the fp64 → narrow step rounds once). fp64 weights: the result is
    within the fp64 accumulation's error bound of the exact value (there is nothing wider to round from)."""
    from test_rounding import correctly_rounded

    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 32, generator=g) * 0.1
    dtypes = {"proj_in": torch.float8_e4m3fn, "proj_out": torch.float64, "ff.net.2": torch.float16,
              "attn1.to_q": torch.bfloat16}  # fmt: skip
    prefix = "model.diffusion_model.input_blocks.1.1."
    module = {"proj_in": "proj_in", "proj_out": "proj_out", "ff.net.2": "transformer_blocks.0.ff.net.2",
              "attn1.to_q": "transformer_blocks.0.attn1.to_q"}  # fmt: skip
    shapes = {"proj_in": (64, 32), "proj_out": (64, 32), "ff.net.2": (64, 256), "attn1.to_q": (64, 64)}
    stored = {f"{prefix}{module[m]}.weight": (torch.randn(*shapes[m], generator=g) * 0.1).to(dt)
              for m, dt in dtypes.items()}  # fmt: skip
    stored[f"{prefix}proj_out.bias"] = w[0].half()
    stored["model.diffusion_model.steps"] = torch.arange(5)
    safetensors.torch.save_file(stored, str(tmp_path / "a.safetensors"))
    layers = {f"unet.input_blocks.1.1.{module[m]}": LoRALayer(torch.randn(2, shapes[m][1], generator=g) * 0.1,
                                                              torch.randn(64, 2, generator=g) * 0.1, alpha=1.0)
              for m in dtypes}  # fmt: skip
    lora = LoRA(layers)
    bake(tmp_path / "a.safetensors", [(lora, 0.7, 1.0)], tmp_path / "b.safetensors", family="sd1")
    got = load(tmp_path / "b.safetensors")
    for m, dt in dtypes.items():
        name = f"{prefix}{module[m]}.weight"
        layer = layers[f"unet.input_blocks.1.1.{module[m]}"]
        exact = exact_bake(stored[name], layer, 0.7)
        out = got[name].double().tolist()
        assert got[name].dtype == dt, name
        if dt == torch.float64:
            # |error| ≤ (r + 2)·eps·(|W| + |s|·Σ|up|·|down|): the classic bound for a dot product plus one add
            mag = stored[name].abs() + 0.7 * layer.scale * (layer.up.double().abs() @ layer.down.double().abs())
            bound = (layer.rank + 2) * torch.finfo(torch.float64).eps * mag
            err = torch.tensor([[abs(float(Fraction(o) - e)) for o, e in zip(ro, re)] for ro, re in zip(out, exact)],
                               dtype=torch.float64)  # fmt: skip
            assert (err <= bound).all(), f"{name}: error {err.max().item():.3g} above the fp64 bound"
        else:
            expected = [[correctly_rounded(e, dt) for e in row] for row in exact]
            wrong = sum(o != e for ro, re in zip(out, expected) for o, e in zip(ro, re))
            assert wrong == 0, f"{name}: {wrong} elements not the correctly rounded exact value"
    assert torch.equal(got["model.diffusion_model.steps"], stored["model.diffusion_model.steps"])
    bake(tmp_path / "a.safetensors", [(lora, 1.0, 1.0)], tmp_path / "c.safetensors", family="sd1", dtype="bf16")
    out_dtypes = {k: v.dtype for k, v in load(tmp_path / "c.safetensors").items()}
    assert out_dtypes == {**dict.fromkeys(stored, torch.bfloat16), "model.diffusion_model.steps": torch.int64}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bake_rounds_once_just_above_a_halfway_point(tmp_path, dtype):
    """W = 1 and ΔW = half an ulp + 2^-40: the exact sum lies just above the halfway point between 1 and the next
    value, so it rounds up. Rounding through fp32 first lands on the halfway point and then ties to even (1.0)."""
    half_ulp = torch.finfo(dtype).eps / 2
    name = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    stored = {name: torch.ones(8, 4, dtype=dtype)}
    safetensors.torch.save_file(stored, str(tmp_path / "a.safetensors"))
    signs = torch.tensor([1.0, -1.0] * 4)[:, None]
    up = torch.cat([signs, signs], dim=1)  # (8, 2): ΔW rows are ±(half_ulp + 2^-40)
    down = torch.tensor([[half_ulp] * 4, [2.0**-40] * 4])
    lora = LoRA({"unet.input_blocks.1.1.proj_in": LoRALayer(down, up, alpha=2.0)})
    bake(tmp_path / "a.safetensors", [(lora, 1.0, 1.0)], tmp_path / "b.safetensors", family="sd1")
    got = load(tmp_path / "b.safetensors")[name].double()
    up_value, down_value = 1 + 2 * half_ulp, 1 - half_ulp  # the neighbours of 1 above and below
    assert got[0::2].eq(up_value).all() and got[1::2].eq(down_value).all(), got[:2]


# ----------------------------------------------------------------------------------------------- refusals


def test_refuses_to_overwrite_the_input(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    before = base.read_bytes()
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.safetensors"
    link.symlink_to(base)
    hard = tmp_path / "hard.safetensors"
    os.link(base, hard)
    items = [(sample_lora("sd1"), 1.0, 1.0)]
    for out in (base, tmp_path / "sub" / ".." / "sd1.safetensors", link, hard, tmp_path):
        with pytest.raises(LoraFileError, match="refusing to overwrite"):
            bake(base, items, out, overwrite=True)
    with pytest.raises(LoraFileError, match="refusing to overwrite"):
        bake(link, items, base, overwrite=True)
    assert base.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_existing_output_needs_overwrite(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    items = [(sample_lora("sd1"), 1.0, 1.0)]
    with pytest.raises(LoraFileError, match="already exists"):
        bake(base, items, out)
    assert out.read_bytes() == b"old"
    bake(base, items, out, overwrite=True)
    assert set(load(out)) == set(load(base))


def test_nan_lora_refused_nothing_written(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    lora = sample_lora("sd1")
    key = next(iter(lora.layers))
    bad = lora.layers[key].with_tensors({"up": torch.full_like(lora.layers[key].up, float("nan"))})
    lora = lora.replace(layers={**lora.layers, key: bad})
    with pytest.raises(LoraValueError, match="NaN/Inf.*nothing was written"):
        bake(base, [(lora, 1.0, 1.0)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists() and no_temp_files(tmp_path)


def test_overflowing_result_refused_nothing_written(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1", torch.float16)
    (tmp_path / "out.safetensors").write_bytes(b"previous")
    with pytest.raises(LoraValueError, match="NaN/Inf into this tensor"):
        bake(base, [(sample_lora("sd1"), 1e6, 1.0)], tmp_path / "out.safetensors", overwrite=True)
    assert (tmp_path / "out.safetensors").read_bytes() == b"previous" and no_temp_files(tmp_path)


def test_unmatched_keys_refused_with_groups(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    lora = sample_lora("sd1")
    extra = {f"unet.foo_blocks.{i}.proj": LoRALayer(torch.ones(1, 4), torch.ones(4, 1)) for i in range(3)}
    extra["te2.text_model.encoder.layers.0.mlp.fc1"] = LoRALayer(torch.ones(1, 4), torch.ones(4, 1))
    lora = lora.replace(layers={**lora.layers, **extra})
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraValueError) as info:
        bake(base, [(lora, 1.0, 1.0)], out)
    message = str(info.value)
    assert "4 LoRA layers have no weight" in message
    assert "unet.foo_blocks.*: 3 layers" in message and "te2.text_model.encoder.layers.*: 1 layer" in message
    assert "strict=False" in message
    assert not out.exists() and no_temp_files(tmp_path)

    report = bake(base, [(lora, 1.0, 1.0)], out, strict=False)
    assert report.coverage.unmatched_count == 4 and "unet.foo_blocks.*" in report.unmatched
    assert report.layers == len(lora.layers) - 4


def test_other_refusals(tmp_path):
    base = write_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraValueError, match="wrong shape"):  # an SDXL LoRA on an SD1 checkpoint
        bake(base, [(sample_lora("sdxl", attention_only=True), 1.0, 1.0)], out, strict=False)
    lora = sample_lora("sd1")
    key = next(iter(lora.layers))
    dora = lora.layers[key].with_tensors({"dora_scale": torch.ones(lora.layers[key].up.shape[0], 1)})
    with pytest.raises(LoraValueError, match="DoRA"):
        bake(base, [(lora.replace(layers={**lora.layers, key: dora}), 1.0, 1.0)], out)
    with pytest.raises(LoraValueError, match="unknown output dtype"):
        bake(base, [(lora, 1.0, 1.0)], out, dtype="fp8")
    with pytest.raises(LoraFileError, match="not found"):
        bake(tmp_path / "missing.safetensors", [(lora, 1.0, 1.0)], out)
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    with pytest.raises(LoraFileError, match="pickle"):
        bake(pickle, [(lora, 1.0, 1.0)], out)
    with pytest.raises(LoraValueError, match="none of the LoRA layers"):
        bake(base, [(sample_lora("sdxl").replace(layers={"te2.x": lora.layers[key]}), 1.0, 1.0)], out, strict=False)
    scaled = tmp_path / "scaled.safetensors"
    safetensors.torch.save_file(
        {"model.diffusion_model.a.weight": torch.ones(4, 4), "model.diffusion_model.a.scale_weight": torch.ones(1)},
        str(scaled),
    )
    a_lora = LoRA({"unet.a": LoRALayer(torch.ones(1, 4), torch.ones(4, 1))})
    with pytest.raises(LoraValueError, match="scaled-fp8"):
        bake(scaled, [(a_lora, 1.0, 1.0)], out, family="sd1")
    vae_only = tmp_path / "vae.safetensors"
    safetensors.torch.save_file({"first_stage_model.x.weight": torch.ones(2, 2)}, str(vae_only))
    with pytest.raises(LoraValueError, match="model family"):
        bake(vae_only, [(lora, 1.0, 1.0)], out)
    assert not out.exists() and no_temp_files(tmp_path)


# ---------------------------------------------------------------------------------------------- peak memory

# Linux carries ru_maxrss across fork and exec (the child starts with the parent's high-water mark), so the
# measuring child is started from a small launcher process, not from pytest with its models in memory.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', *sys.argv[1:]]).returncode)"
CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from lora_ops.bake import bake
    from lora_ops.lora import LoRA, LoRALayer, nbytes
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    def hwm():  # the kernel's per-process peak (VmHWM), as a cross-check
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    src, out, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    g = torch.Generator().manual_seed(0)
    lora = LoRA({"unet." + n: LoRALayer(down=torch.randn(16, 4096, generator=g) * 0.01,
                                        up=torch.randn(4096, 16, generator=g) * 0.01, alpha=8.0) for n in names})
    report = bake(src, [(lora, 0.75, 1.0)], out, family="sd1")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "vm_hwm": hwm(), "lora_bytes": nbytes(lora),
                      "patched": len(report.patched)}))
    """
)


def test_peak_memory_is_one_tensor_not_the_model(tmp_path):
    """A 257 MB checkpoint (4 × 64 MB fp32 + small tensors) bakes in well under 1.5 × (largest tensor + LoRA)."""
    g = torch.Generator().manual_seed(0)
    names = [f"middle_block.1.transformer_blocks.0.attn1.to_{p}" for p in ("q", "k", "v")]
    names.append("middle_block.1.transformer_blocks.0.ff.net.2")
    tensors = {f"model.diffusion_model.{n}.weight": torch.randn(4096, 4096, generator=g) * 0.02 for n in names}
    tensors.update({f"model.diffusion_model.small.{i}.bias": torch.randn(1000, generator=g) for i in range(8)})
    src, out = tmp_path / "big.safetensors", tmp_path / "baked.safetensors"
    safetensors.torch.save_file(tensors, str(src))
    assert src.stat().st_size >= 256 * 2**20
    probe = {k: tensors[k][:64].clone() for k in list(tensors)[:1]}  # rows to spot-check after the bake
    del tensors
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, CHILD, str(src), str(out), json.dumps(names)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    growth, largest = stats["peak"] - stats["baseline"], 4096 * 4096 * 4
    budget = 1.5 * (largest + stats["lora_bytes"])
    print(f"peak RSS growth {growth / 2**20:.1f} MiB, budget {budget / 2**20:.1f} MiB, stats {stats}")
    assert stats["patched"] == 4
    assert growth <= budget
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        for name, rows in probe.items():
            assert not torch.equal(f.get_slice(name)[:64], rows)  # patched
    src.unlink()
    out.unlink()


def test_cli_bake_with_strengths(tmp_path, capsys):
    from lora_ops.cli import main, parse_weighted
    from lora_ops.files import save_lora

    assert parse_weighted("a.safetensors:0.5:0.25") == ("a.safetensors", 0.5, 0.25)
    assert parse_weighted("C:dir/a.safetensors:0.7") == ("C:dir/a.safetensors", 0.7, 0.7)
    assert parse_weighted("a.safetensors") == ("a.safetensors", 1.0, 1.0)
    base = write_checkpoint(tmp_path / "base.safetensors", "sd1")
    lora = sample_lora("sd1", attention_only=True)
    lora_path = save_lora(lora, tmp_path / "l.safetensors", "kohya")
    out = tmp_path / "baked.safetensors"
    assert main(["bake", str(base), f"{lora_path}:0.5:0.0", "-o", str(out), "-q"]) == 0
    assert "baked" in capsys.readouterr().out
    check_baked(out, base, "sd1", [(lora, 0.5, 0.0)])
    assert main(["bake", str(base), str(lora_path), "-o", str(base), "--overwrite", "-q"]) == 2
    assert "input" in capsys.readouterr().err
