"""Key maps: diffusers ↔ LDM UNet paths (checked against diffusers' own converter), kohya names, text encoders,
family detection, and the canonical keys of live models."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

from lora_ops import keymap
from lora_ops.errors import LoraFormatError, LoraValueError
from lora_ops.testing import tiny

FAMILIES = ("sd1", "sdxl")


@functools.cache
def unet(family: str):
    return tiny.tiny_unet(family)


@functools.cache
def text_encoder(kind: str):
    return tiny.tiny_text_encoder(kind)


def weighted_modules(model: torch.nn.Module) -> list[str]:
    """Every module that owns a parameter itself."""
    return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


# ---------------------------------------------------------------- UNet: diffusers ↔ LDM


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_map_matches_diffusers_single_file_converter(family):
    model = unet(family)
    original = model.state_dict()
    ldm = {}
    for key, tensor in original.items():
        module, _, leaf = key.rpartition(".")
        ldm[f"{LDM_UNET_KEY}{keymap.unet_diffusers_to_ldm(module, family)}.{leaf}"] = tensor
    assert len(ldm) == len(original)  # the map is injective
    converted = convert_ldm_unet_checkpoint(ldm, dict(model.config))
    assert set(converted) == set(original)
    for key, tensor in original.items():
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_map_round_trips_on_every_module(family):
    paths = weighted_modules(unet(family))
    assert len(paths) > 200
    for path in paths:
        ldm = keymap.unet_diffusers_to_ldm(path, family)
        assert keymap.unet_ldm_to_diffusers(ldm, family) == path
        assert keymap.unet_diffusers_to_ldm(keymap.unet_ldm_to_diffusers(ldm, family), family) == ldm


SD1_PAIRS = [
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("down_blocks.0.resnets.0.norm1", "input_blocks.1.0.in_layers.0"),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("down_blocks.1.resnets.0.norm2", "input_blocks.4.0.out_layers.0"),
    ("down_blocks.1.resnets.0.conv2", "input_blocks.4.0.out_layers.3"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_out", "input_blocks.8.1.proj_out"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
    ("down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3"),
    ("mid_block.resnets.0.conv1", "middle_block.0.in_layers.2"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("up_blocks.0.resnets.2.conv_shortcut", "output_blocks.2.0.skip_connection"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "output_blocks.3.1.transformer_blocks.0.attn2.to_k"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.upsamplers.0.conv", "output_blocks.8.2.conv"),
    ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
    (
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
    ),
    (
        "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0",
        "output_blocks.11.1.transformer_blocks.0.attn1.to_out.0",
    ),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
]

SDXL_PAIRS = [
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.attentions.0.proj_in", "input_blocks.4.1.proj_in"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k", "input_blocks.8.1.transformer_blocks.1.attn2.to_k"),
    # the real SDXL's depth-10 blocks, beyond the tiny model's depth
    ("down_blocks.2.attentions.0.transformer_blocks.9.attn2.to_v", "input_blocks.7.1.transformer_blocks.9.attn2.to_v"),
    ("mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1.transformer_blocks.9.ff.net.2"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.norm3", "output_blocks.0.1.transformer_blocks.0.norm3"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    ("conv_out", "out.2"),
]


@pytest.mark.parametrize(
    ("family", "diffusers", "ldm"), [("sd1", *p) for p in SD1_PAIRS] + [("sdxl", *p) for p in SDXL_PAIRS]
)
def test_unet_known_pairs(family, diffusers, ldm):
    assert keymap.unet_diffusers_to_ldm(diffusers, family) == ldm
    assert keymap.unet_ldm_to_diffusers(ldm, family) == diffusers


def test_unet_containers_map_too():
    assert keymap.unet_diffusers_to_ldm("down_blocks.1.attentions.0", "sd1") == "input_blocks.4.1"
    assert keymap.unet_ldm_to_diffusers("output_blocks.3.0", "sdxl") == "up_blocks.1.resnets.0"


@pytest.mark.parametrize(
    ("family", "path"),
    [
        ("sd1", "add_embedding.linear_1"),  # SDXL only
        ("sd1", "label_emb.0.0"),
        ("sd1", "up_blocks.0.attentions.0.proj_in"),  # SD1's lowest up block has no attention
        ("sd1", "down_blocks.3.attentions.0.proj_in"),
        ("sd1", "down_blocks.3.downsamplers.0.conv"),  # last level: no downsampler
        ("sd1", "up_blocks.3.upsamplers.0.conv"),
        ("sd1", "down_blocks.4.resnets.0.conv1"),
        ("sd1", "down_blocks.0.resnets.2.conv1"),  # 2 resnets per down block
        ("sd1", "up_blocks.1.resnets.3.conv1"),  # 3 per up block
        ("sd1", "down_blocks.0.resnets.0.conv3"),
        ("sd1", "down_blocks.01.resnets.0.conv1"),
        ("sd1", "down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q"),  # depth 1
        ("sd1", "down_blocks.0.attentions.0.conv"),
        ("sd1", "input_blocks.1.1.transformer_blocks.0.attn3.to_q"),
        ("sd1", "input_blocks.12.0.in_layers.0"),
        ("sd1", "input_blocks.3.1.proj_in"),  # downsampler slot
        ("sd1", "input_blocks.1.0.in_layers.1"),  # SiLU, no weights
        ("sd1", "output_blocks.2.2.conv"),  # SD1 up block 0 upsampler is at .1
        ("sd1", "output_blocks.0.1.proj_in"),
        ("sd1", "middle_block.3.in_layers.0"),
        ("sdxl", "down_blocks.0.attentions.0.proj_in"),
        ("sdxl", "input_blocks.1.1.proj_in"),
        ("sdxl", "up_blocks.2.attentions.0.proj_in"),
        ("sdxl", "output_blocks.2.1.conv"),  # SDXL up block 0 has attentions: upsampler at .2
        ("sdxl", "input_blocks.9.0.op"),
        ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.10.attn1.to_q"),
        ("sd1", "time_embedding"),
        ("sd1", "foo"),
        ("sd1", ""),
        ("sd1", "down_blocks"),
    ],
)
def test_unet_unknown_paths_raise(family, path):
    for fn in (keymap.unet_diffusers_to_ldm, keymap.unet_ldm_to_diffusers):
        with pytest.raises(LoraFormatError) as err:
            fn(path, family)
        assert err.value.key == path and path in str(err.value)
    assert not keymap.is_unet_path(path, family)


def test_unet_unknown_family_raises():
    with pytest.raises(LoraValueError, match="sdxl"):
        keymap.unet_diffusers_to_ldm("conv_in", "sd3")


def test_layout_table():
    assert keymap.unet_families() == ("sd1", "sdxl")  # the UNet families of the registry
    sd1, sdxl = keymap.unet_layout("sd1"), keymap.unet_layout("sdxl")
    assert (sd1.levels, sdxl.levels) == (4, 3)
    assert sdxl.text_time_embedding and not sd1.text_time_embedding


# ---------------------------------------------------------------- kohya names


def all_dotted_paths() -> list[str]:
    paths = []
    for family in FAMILIES:
        diffusers = weighted_modules(unet(family))
        paths += diffusers + [keymap.unet_diffusers_to_ldm(p, family) for p in diffusers]
    for kind in tiny.TEXT_ENCODER_KINDS:
        for path in weighted_modules(text_encoder(kind)):
            paths += [path, keymap.te_to_canonical_path(path)]
    return sorted(set(paths))


def test_kohya_round_trip_on_every_module_path():
    paths = all_dotted_paths()
    assert len(paths) > 800
    for path in paths:
        flat = keymap.dotted_to_kohya(path)
        assert "." not in flat
        assert keymap.kohya_to_dotted(flat) == path


@pytest.mark.parametrize(
    ("flat", "dotted"),
    [
        (
            "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        ("input_blocks_4_1_transformer_blocks_0_ff_net_0_proj", "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj"),
        (
            "input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0",
        ),
        ("text_model_encoder_layers_0_self_attn_q_proj", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("text_model_encoder_layers_11_mlp_fc1", "text_model.encoder.layers.11.mlp.fc1"),
        ("text_model_encoder_layers_3_self_attn_out_proj", "text_model.encoder.layers.3.self_attn.out_proj"),
        ("mid_block_attentions_0_proj_in", "mid_block.attentions.0.proj_in"),
        ("middle_block_1_proj_out", "middle_block.1.proj_out"),
        ("down_blocks_0_resnets_0_time_emb_proj", "down_blocks.0.resnets.0.time_emb_proj"),
        ("down_blocks_1_resnets_0_conv_shortcut", "down_blocks.1.resnets.0.conv_shortcut"),
        ("input_blocks_1_0_emb_layers_1", "input_blocks.1.0.emb_layers.1"),
        ("input_blocks_4_0_skip_connection", "input_blocks.4.0.skip_connection"),
        ("label_emb_0_0", "label_emb.0.0"),
        ("out_2", "out.2"),
        ("out_0", "out.0"),
        ("time_embedding_linear_1", "time_embedding.linear_1"),
        ("time_embed_2", "time_embed.2"),
        ("add_embedding_linear_2", "add_embedding.linear_2"),
        ("conv_norm_out", "conv_norm_out"),
        ("text_projection", "text_projection"),
    ],
)
def test_kohya_examples(flat, dotted):
    assert keymap.kohya_to_dotted(flat) == dotted
    assert keymap.dotted_to_kohya(dotted) == flat


def test_kohya_unknown_pieces_become_components_and_empty_pieces_raise():
    assert keymap.kohya_to_dotted("foo_bar_0") == "foo.bar.0"
    with pytest.raises(LoraFormatError):
        keymap.kohya_to_dotted("down_blocks__0")


def test_kohya_vocabulary_can_grow(monkeypatch):
    from lora_ops.keymap import kohya_names

    monkeypatch.setattr(kohya_names, "_COMPOUNDS", set(kohya_names._COMPOUNDS))  # leave the real table alone
    monkeypatch.setattr(kohya_names, "_MAX_PIECES", kohya_names._MAX_PIECES)
    assert keymap.kohya_to_dotted("outer_blocks_0_img_attn_test_only_qkv") == "outer.blocks.0.img_attn.test.only.qkv"
    keymap.register_compound_tokens(["img_attn_test_only"])
    assert keymap.kohya_to_dotted("outer_blocks_0_img_attn_test_only_qkv") == "outer.blocks.0.img_attn_test_only.qkv"
    assert "img_attn_test_only" in keymap.compound_tokens()
    with pytest.raises(LoraValueError):
        keymap.register_compound_tokens(["plain"])


# ---------------------------------------------------------------- family detection


def ldm_and_diffusers_paths(family: str) -> tuple[list[str], list[str]]:
    diffusers = weighted_modules(unet(family))
    return diffusers, [keymap.unet_diffusers_to_ldm(p, family) for p in diffusers]


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_full_unets(family):
    for paths in ldm_and_diffusers_paths(family):
        assert keymap.detect_unet_family(paths) == family
        assert keymap.detect_unet_family("unet." + p for p in paths) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_attention_only_loras(family):
    for paths in ldm_and_diffusers_paths(family):
        attn = [p for p in paths if ".attn1." in p or ".attn2." in p]
        assert keymap.detect_unet_family(attn) == family


def test_detect_partial_and_undecidable():
    assert keymap.detect_unet_family(["input_blocks.1.1.proj_in"]) == "sd1"
    assert keymap.detect_unet_family(["down_blocks.0.attentions.1.proj_out"]) == "sd1"
    assert keymap.detect_unet_family(["up_blocks.3.resnets.0.conv1"]) == "sd1"
    assert keymap.detect_unet_family(["label_emb.0.0"]) == "sdxl"
    assert keymap.detect_unet_family(["add_embedding.linear_1"]) == "sdxl"
    assert keymap.detect_unet_family(["input_blocks.4.1.transformer_blocks.1.attn1.to_q"]) == "sdxl"
    assert keymap.detect_unet_family(["output_blocks.0.1.proj_in"]) == "sdxl"
    # modules both layouts share, nothing, junk, or contradictory evidence: undecidable
    shared = ["input_blocks.4.1.transformer_blocks.0.attn1.to_q", "down_blocks.1.attentions.0.proj_in", "conv_in"]
    assert keymap.detect_unet_family(shared) is None
    assert keymap.detect_unet_family([]) is None
    assert keymap.detect_unet_family(["foo.bar"]) is None
    assert keymap.detect_unet_family(["input_blocks.1.1.proj_in", "label_emb.0.0"]) is None
    # junk next to evidence is ignored
    assert keymap.detect_unet_family(["foo.bar", "label_emb.0.0"]) == "sdxl"


# ---------------------------------------------------------------- text encoders


def test_te_to_canonical_path():
    assert keymap.te_to_canonical_path("encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert keymap.te_to_canonical_path("text_model.encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
    assert keymap.te_to_canonical_path("text_projection") == "text_projection"


def test_te_module_path_bridges_both_layouts():
    plain, with_proj = text_encoder("clip-l"), text_encoder("clip-g")
    assert not keymap.has_text_model(plain)  # transformers 5 CLIPTextModel
    assert keymap.has_text_model(with_proj)
    q = "text_model.encoder.layers.1.self_attn.q_proj"
    assert keymap.te_module_path(q, plain) == "encoder.layers.1.self_attn.q_proj"
    assert keymap.te_module_path(q, with_proj) == q
    assert keymap.te_module_path("encoder.layers.1.self_attn.q_proj", with_proj) == q
    assert keymap.te_module_path("text_projection", with_proj) == "text_projection"
    with pytest.raises(LoraFormatError, match="text_projection"):
        keymap.te_module_path("text_projection", plain)
    with pytest.raises(LoraFormatError, match="layers.7"):
        keymap.te_module_path("text_model.encoder.layers.7.mlp.fc1", plain)


@pytest.mark.parametrize(("kind", "prefix"), [("clip-l", "te1"), ("clip-g", "te2")])
def test_te_canonical_keys(kind, prefix):
    model = text_encoder(kind)
    keys = keymap.te_canonical_keys(model, prefix=prefix)
    layers = model.config.num_hidden_layers
    assert len(keys) == 6 * layers + (1 if kind == "clip-g" else 0)
    assert f"{prefix}.text_model.encoder.layers.0.self_attn.q_proj" in keys
    assert f"{prefix}.text_model.encoder.layers.{layers - 1}.mlp.fc2" in keys
    modules = dict(model.named_modules())
    for key, path in keys.items():
        assert isinstance(modules[path], torch.nn.Linear)
        assert keymap.te_module_path(key.removeprefix(f"{prefix}."), model) == path


# ---------------------------------------------------------------- canonical keys of a live UNet


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_canonical_keys(family):
    model = unet(family)
    keys = keymap.unet_canonical_keys(model, family)
    assert keymap.unet_canonical_keys(model) == keys  # family detected from the module names
    modules = dict(model.named_modules())
    layers = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert sorted(keys.values()) == sorted(layers)
    for key, path in keys.items():
        assert key.startswith("unet.")
        assert keymap.unet_ldm_to_diffusers(key.removeprefix("unet."), family) == path
    expected = {
        "sd1": [
            "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
            "unet.output_blocks.2.1.conv",
            "unet.middle_block.1.proj_in",
            "unet.input_blocks.1.0.in_layers.2",
            "unet.time_embed.0",
            "unet.out.2",
        ],
        "sdxl": [
            "unet.label_emb.0.0",
            "unet.label_emb.0.2",
            "unet.input_blocks.4.1.transformer_blocks.1.attn2.to_k",
            "unet.output_blocks.2.2.conv",
            "unet.middle_block.1.transformer_blocks.1.ff.net.2",
        ],
    }[family]
    assert set(expected) <= set(keys)
