"""Formats: exact round trips for every writer, detection, LyCORIS reading, and refusals that name the key."""

import pytest
import torch
from helpers import sample_lora

from lora_ops import LoraFormatError, io
from lora_ops import lora as L
from lora_ops.files import load_lora, save_lora
from lora_ops.formats import FORMATS, WRITABLE, detect_format, read_lora, write_lora
from lora_ops.lora import LoRA, LoRALayer, LycorisLayer

META = {"ss_network_dim": "4", "modelspec.trigger_phrase": "sks style", "ss_tag_frequency": '{"1_sks": {"sks": 3}}'}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "diffusers"])
def test_round_trip_is_bit_exact(family, fmt):
    lora = sample_lora(family, metadata=META, dtype=torch.float16)
    tensors, metadata = write_lora(lora, fmt)
    back, unused = read_lora(tensors, metadata)
    assert unused == []
    assert back.source_format == fmt
    assert back.family == family
    assert L.equal(back, lora), f"{fmt} round trip changed the LoRA"


def test_round_trip_keeps_alpha_none_and_mixed_ranks():
    base = sample_lora("sd1", alpha=None, attention_only=True)
    keys = sorted(base.layers)
    layers = dict(base.layers)
    first = layers[keys[0]]
    layers[keys[0]] = LoRALayer(down=first.down[:2], up=first.up[:, :2], alpha=None)  # rank 2 among rank 4
    lora = base.replace(layers=layers)
    for fmt in ("kohya", "comfyui", "diffusers"):
        back, _ = read_lora(*write_lora(lora, fmt))
        assert L.equal(back, lora), fmt


def test_peft_round_trip_per_component():
    lora = sample_lora("sd1", metadata=META)
    with pytest.raises(LoraFormatError, match="one model"):
        write_lora(lora, "peft")
    unet_only = L.filter_layers(lora, "unet.")
    tensors, metadata = write_lora(lora, "peft", component="unet")
    assert all(k.startswith("base_model.model.down_blocks") or k.startswith("base_model.model.") for k in tensors)
    back, unused = read_lora(tensors, metadata)
    assert unused == [] and back.source_format == "peft"
    assert L.equal(back, unet_only)


@pytest.mark.parametrize("src,dst", [("kohya", "diffusers"), ("diffusers", "comfyui"), ("comfyui", "kohya")])
def test_convert_through_files_preserves_tensors_and_metadata(tmp_path, src, dst):
    lora = sample_lora("sdxl", metadata=META)
    a = save_lora(lora, tmp_path / "a.safetensors", src)
    b = save_lora(load_lora(a), tmp_path / "b.safetensors", dst)
    c = save_lora(load_lora(b), tmp_path / "c.safetensors", src)
    ta, ma = io.load_state_dict(a)
    tc, mc = io.load_state_dict(c)
    assert ma == mc and ta.keys() == tc.keys()
    assert all(ta[k].dtype == tc[k].dtype and torch.equal(ta[k], tc[k]) for k in ta)
    assert L.equal(load_lora(c), lora)


def test_kohya_names_follow_the_trainers():
    sd1, _ = write_lora(sample_lora("sd1", attention_only=True), "kohya")
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in sd1)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd1)
    xl, _ = write_lora(sample_lora("sdxl", attention_only=True), "kohya")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in xl)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in xl)


def test_kohya_reads_both_unet_spellings_to_one_key():
    lora = sample_lora("sd1", attention_only=True)
    diff_style, meta = write_lora(lora, "kohya", unet_style="diffusers")
    ldm_style, _ = write_lora(lora, "kohya", unet_style="ldm")
    assert set(diff_style) != set(ldm_style)
    a, _ = read_lora(diff_style, meta, family="sd1")
    b, _ = read_lora(ldm_style, meta, family="sd1")
    assert L.equal(a, b)


def test_comfyui_names():
    sd, _ = write_lora(sample_lora("sdxl", attention_only=True), "comfyui")
    assert any(k.startswith("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_up") for k in sd)
    assert any(k.startswith("text_encoders.clip_g.transformer.text_model.encoder.layers.0.") for k in sd)


def test_detect_format_by_keys():
    lora = sample_lora("sd1", attention_only=True)
    for fmt in WRITABLE:
        opts = {"component": "unet"} if fmt == "peft" else {}
        tensors, metadata = write_lora(lora, fmt, **opts)
        assert detect_format(list(tensors), metadata) == fmt
    with pytest.raises(LoraFormatError, match="not a LoRA file"):
        detect_format(["model.diffusion_model.input_blocks.0.0.weight"])


def test_unknown_key_is_reported_not_dropped():
    tensors, metadata = write_lora(sample_lora("sd1", attention_only=True), "kohya")
    tensors["lora_unet_mystery_layer.lora_weird.weight"] = torch.zeros(2)
    with pytest.raises(LoraFormatError, match="lora_unet_mystery_layer.lora_weird.weight"):
        read_lora(tensors, metadata, file="x.safetensors")
    lora, unused = read_lora(tensors, metadata, strict=False)
    assert unused == ["lora_unet_mystery_layer.lora_weird.weight"]
    assert len(lora.layers) > 0


def test_mismatched_ranks_and_rank_zero_are_refused():
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    bad = {f"{key}.lora_down.weight": torch.zeros(4, 32), f"{key}.lora_up.weight": torch.zeros(32, 3)}
    with pytest.raises(LoraFormatError, match="mismatched ranks.*down has rank 4, up has rank 3") as err:
        read_lora(bad, file="bad.safetensors")
    assert "bad.safetensors" in str(err.value) and key in str(err.value)
    zero = {f"{key}.lora_down.weight": torch.zeros(0, 32), f"{key}.lora_up.weight": torch.zeros(32, 0)}
    with pytest.raises(LoraFormatError, match="rank 0"):
        read_lora(zero)
    lonely = {f"{key}.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(LoraFormatError, match="no up weight"):
        read_lora(lonely)


def test_lycoris_loha_and_lokr_read_and_delta():
    g = torch.Generator().manual_seed(1)
    loha_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lokr_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    w = {n: torch.randn(*s, generator=g) for n, s in
         {"hada_w1_a": (32, 4), "hada_w1_b": (4, 32), "hada_w2_a": (32, 4), "hada_w2_b": (4, 32)}.items()}
    sd = {f"{loha_key}.{n}": t for n, t in w.items()}
    sd[f"{loha_key}.alpha"] = torch.tensor(2.0)
    k1, k2a, k2b = torch.randn(4, 4, generator=g), torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g)
    sd.update({f"{lokr_key}.lokr_w1": k1, f"{lokr_key}.lokr_w2_a": k2a, f"{lokr_key}.lokr_w2_b": k2b,
               f"{lokr_key}.alpha": torch.tensor(1.0)})
    lora, unused = read_lora(sd, family="sd1")
    assert unused == [] and lora.source_format == "lycoris"
    loha = lora["unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
    lokr = lora["unet.input_blocks.1.1.transformer_blocks.0.attn1.to_k"]
    assert isinstance(loha, LycorisLayer) and loha.kind == "loha" and loha.rank == 4
    expected = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * (2.0 / 4)
    torch.testing.assert_close(L.delta(loha), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(L.delta(lokr), torch.kron(k1, k2a @ k2b) * (1.0 / 2), rtol=1e-6, atol=1e-6)
    assert FORMATS["lycoris"].write is None
    with pytest.raises(LoraFormatError, match="cannot be written"):
        write_lora(lora, "diffusers")


def test_delta_matches_full_matrix_reference_for_conv_and_tucker():
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(3, 8, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, 1, 1, generator=g,
                                                                                     dtype=torch.float64)
    layer = LoRALayer(down=down, up=up, alpha=1.5)
    ref = (up.flatten(1) @ down.flatten(1)).reshape(5, 8, 3, 3) * 0.5
    torch.testing.assert_close(layer.delta(torch.float64), ref)
    mid = torch.randn(3, 3, 3, 3, generator=g, dtype=torch.float64)
    tucker = LoRALayer(down=torch.randn(3, 8, 1, 1, generator=g, dtype=torch.float64), up=up, alpha=3.0, mid=mid)
    d = tucker.down.flatten(1)
    ref = torch.zeros(5, 8, 3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            ref[:, :, i, j] = up.flatten(1) @ mid[:, :, i, j] @ d
    torch.testing.assert_close(tucker.delta(torch.float64), ref)


def test_half_precision_files_load_and_delta_is_fp32(tmp_path):
    for dtype in (torch.float16, torch.bfloat16):
        lora = sample_lora("sd1", dtype=dtype, attention_only=True)
        back = load_lora(save_lora(lora, tmp_path / f"{dtype}.safetensors", "kohya"))
        assert L.dtypes(back) == {dtype}
        layer = next(iter(back.layers.values()))
        assert L.delta(layer).dtype == torch.float32


def test_value_ops_do_not_mutate():
    lora = sample_lora("sd1", attention_only=True)
    before = {k: v.up.clone() for k, v in lora.layers.items()}
    scaled = L.scale(lora, 0.5, 2.0)
    for key, layer in lora.layers.items():
        assert torch.equal(layer.up, before[key])
        w = 2.0 if L.is_text_encoder_key(key) else 0.5
        torch.testing.assert_close(L.delta(scaled[key]), L.delta(layer) * w)
    assert set(L.filter_layers(lora, "te1.").layers) == {k for k in lora.layers if k.startswith("te1.")}
    assert L.num_params(L.cast(lora, torch.float16)) == L.num_params(lora)
    assert L.nbytes(L.cast(lora, torch.float16)) * 2 == L.nbytes(lora)
    with pytest.raises(TypeError):
        lora.layers["x"] = None  # the mapping is read-only


def test_metadata_must_be_strings():
    with pytest.raises(LoraFormatError, match="str to str"):
        LoRA({}, {"a": 1})
