"""Canonical keys ↔ checkpoint tensors, checked against diffusers' own single-file converters as ground truth.

The tiny pipelines are written out as single-file checkpoints (UNet in LDM names via the keymap, CLIP-L in
transformers names under the single-file prefixes, OpenCLIP-G built here in its fused layout); diffusers'
``convert_ldm_unet_checkpoint`` / ``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint`` must recover
the pipeline's weights from them (so the naming is right), and every canonical key of the tiny models must map to
a slot that reads back exactly its module's weight.
"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from helpers import canonical_shapes

from lora_ops import keymap
from lora_ops.errors import LoraFormatError, LoraValueError
from lora_ops.keymap import WeightSlot, checkpoint_family, checkpoint_targets
from lora_ops.testing import tiny

UNET = "model.diffusion_model."
CLIP_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


# ------------------------------------------------------------------------------ single-file checkpoint builders


def unet_ldm_state(unet: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The UNet's state dict in single-file names (``model.diffusion_model.<LDM path>.<param>``)."""
    out = {}
    for name, t in unet.state_dict().items():
        path, param = name.rsplit(".", 1)
        out[f"{UNET}{keymap.unet_diffusers_to_ldm(path, family)}.{param}"] = t
    return out


def clip_state(te: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in single-file names (``<prefix>text_model.<…>``)."""
    return {prefix + keymap.te_to_canonical_path(name): t for name, t in te.state_dict().items()}


def open_clip_state(te: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's layout: fused q/k/v, c_fc/c_proj, transposed proj."""
    sd = {keymap.te_to_canonical_path(k): v for k, v in te.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].T.contiguous(),  # OpenCLIP: (width, proj)
    }
    for n in range(te.config.num_hidden_layers):
        hf, oc = f"text_model.encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for param in ("weight", "bias"):
            qkv = [sd[f"{hf}self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"{oc}attn.in_proj_{param}"] = torch.cat(qkv)  # rows [q; k; v]
            out[f"{oc}attn.out_proj.{param}"] = sd[f"{hf}self_attn.out_proj.{param}"]
            out[f"{oc}ln_1.{param}"] = sd[f"{hf}layer_norm1.{param}"]
            out[f"{oc}ln_2.{param}"] = sd[f"{hf}layer_norm2.{param}"]
            out[f"{oc}mlp.c_fc.{param}"] = sd[f"{hf}mlp.fc1.{param}"]
            out[f"{oc}mlp.c_proj.{param}"] = sd[f"{hf}mlp.fc2.{param}"]
    return out


def vae_state(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """VAE tensors under their single-file prefix (never patched; the names need not be LDM-exact)."""
    return {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}


@functools.cache
def pipeline(family: str):
    return tiny.tiny_sd1_pipeline() if family == "sd1" else tiny.tiny_sdxl_pipeline()


def single_file_state(family: str) -> dict[str, torch.Tensor]:
    """The tiny pipeline of ``family`` as one single-file checkpoint state dict (fp32, contiguous copies)."""
    pipe = pipeline(family)
    sd = {**unet_ldm_state(pipe.unet, family), **clip_state(pipe.text_encoder, CLIP_PREFIX[family])}
    if family == "sdxl":
        sd.update(open_clip_state(pipe.text_encoder_2, OPEN_CLIP_PREFIX))
    sd.update(vae_state(pipe.vae))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def module_weights(family: str) -> dict[str, torch.Tensor]:
    """Canonical key → the live module's weight, for every LoRA-targetable layer of the tiny pipeline."""
    pipe = pipeline(family)
    parts = [(pipe.unet, keymap.unet_canonical_keys(pipe.unet, family))]
    parts.append((pipe.text_encoder, keymap.te_canonical_keys(pipe.text_encoder, "te1")))
    if family == "sdxl":
        parts.append((pipe.text_encoder_2, keymap.te_canonical_keys(pipe.text_encoder_2, "te2")))
    return {key: model.get_submodule(path).weight.detach() for model, names in parts for key, path in names.items()}


# ----------------------------------------------------------------------------------- ground truth: diffusers


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_converters_recover_the_pipeline(family):
    pipe, ckpt = pipeline(family), single_file_state(family)
    unet = sfu.convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config))
    expected = pipe.unet.state_dict()
    assert set(unet) == set(expected)
    assert all(torch.equal(unet[k], expected[k]) for k in expected)

    clip = sfu.convert_ldm_clip_checkpoint({k: v for k, v in ckpt.items() if k.startswith(CLIP_PREFIX[family])})
    expected = {keymap.te_to_canonical_path(k): v for k, v in pipe.text_encoder.state_dict().items()}
    assert set(clip) == set(expected)
    assert all(torch.equal(clip[k], expected[k]) for k in expected)

    if family == "sdxl":
        te2 = pipe.text_encoder_2
        converted = sfu.convert_open_clip_checkpoint(te2, ckpt, prefix=OPEN_CLIP_PREFIX)
        expected = {keymap.te_to_canonical_path(k): v for k, v in te2.state_dict().items()}
        assert set(converted) == set(expected)
        assert all(torch.equal(converted[k], expected[k]) for k in expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_canonical_key_maps_to_its_weight(family):
    ckpt = single_file_state(family)
    targets = checkpoint_targets(ckpt, family)
    weights, shapes = module_weights(family), canonical_shapes(family)
    assert set(shapes) <= set(targets)
    for key, shape in shapes.items():
        slot = targets[key]
        assert slot.shape(tuple(ckpt[slot.tensor].shape)) == shape, key
        assert torch.equal(slot.read(ckpt[slot.tensor]), weights[key]), key
    assert not any(slot.tensor.startswith("first_stage_model.") for slot in targets.values())


def test_open_clip_slots():
    targets = checkpoint_targets(single_file_state("sdxl"), "sdxl")
    fused = f"{OPEN_CLIP_PREFIX}transformer.resblocks.1.attn.in_proj_weight"
    base = "te2.text_model.encoder.layers.1."
    assert targets[base + "self_attn.q_proj"] == WeightSlot(fused, chunk=(0, 3))
    assert targets[base + "self_attn.k_proj"] == WeightSlot(fused, chunk=(1, 3))
    assert targets[base + "self_attn.v_proj"] == WeightSlot(fused, chunk=(2, 3))
    assert targets[base + "mlp.fc1"].tensor == f"{OPEN_CLIP_PREFIX}transformer.resblocks.1.mlp.c_fc.weight"
    assert targets[base + "mlp.fc2"].tensor == f"{OPEN_CLIP_PREFIX}transformer.resblocks.1.mlp.c_proj.weight"
    assert targets["te2.text_projection"] == WeightSlot(f"{OPEN_CLIP_PREFIX}text_projection", transpose=True)
    assert WeightSlot(fused, chunk=(1, 3)).row_slice((96, 32)) == slice(32, 64)
    assert WeightSlot(fused, chunk=(1, 3)).shape((96, 32)) == (32, 32)
    assert WeightSlot("p", transpose=True).shape((32, 16)) == (16, 32)
    with pytest.raises(LoraFormatError, match="3 equal row blocks"):
        WeightSlot(fused, chunk=(0, 3)).row_slice((97, 32))


def test_single_file_name_variants():
    """SD 1.x text encoders saved without ``text_model.`` (old transformers), SD 2.x OpenCLIP-H, biases ignored."""
    keys = [
        "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.bias",
        "cond_stage_model.transformer.embeddings.position_ids",
        f"{UNET}input_blocks.1.1.proj_in.weight",
        f"{UNET}input_blocks.1.1.proj_in.bias",
    ]
    targets = checkpoint_targets(keys, "sd1")
    assert targets == {
        "te1.text_model.encoder.layers.0.self_attn.q_proj": WeightSlot(keys[0]),
        "unet.input_blocks.1.1.proj_in": WeightSlot(keys[3]),
    }
    sd2 = checkpoint_targets(["cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight"], "sd1")
    assert sd2["te1.text_model.encoder.layers.3.self_attn.v_proj"].chunk == (2, 3)


def test_two_namings_of_one_weight_are_refused():
    keys = [
        "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    ]
    with pytest.raises(LoraFormatError, match="two tensors hold the same weight"):
        checkpoint_targets(keys, "sd1")


def test_unknown_family_and_component():
    with pytest.raises(LoraValueError, match="unknown UNet family"):
        checkpoint_targets([], "flux")
    with pytest.raises(LoraFormatError, match="unknown diffusers component"):
        checkpoint_targets([], "sd1", component="vae")


def test_checkpoint_family():
    for family in ("sd1", "sdxl"):
        ckpt = single_file_state(family)
        assert checkpoint_family(ckpt) == family
        assert checkpoint_family(k for k in ckpt if k.startswith(UNET)) == family  # UNet-only file
        assert checkpoint_family(pipeline(family).unet.state_dict()) == family  # diffusers unet/ file
    assert checkpoint_family(["first_stage_model.decoder.conv_in.weight"]) is None


# ----------------------------------------------------------------------------------------- diffusers folders


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_folder_components(family, tmp_path):
    from safetensors import safe_open

    pipeline(family).save_pretrained(tmp_path, safe_serialization=True)
    weights, shapes = module_weights(family), canonical_shapes(family)
    files = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
        "text_encoder_2": "text_encoder_2/model.safetensors",
    }
    found = {}
    for component, rel in files.items():
        if not (tmp_path / rel).exists():
            assert family == "sd1" and component == "text_encoder_2"
            continue
        with safe_open(str(tmp_path / rel), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
        for key, slot in checkpoint_targets(stored, family, component=component).items():
            assert key not in found
            found[key] = slot.read(stored[slot.tensor])
    assert set(shapes) <= set(found)
    for key in shapes:
        assert torch.equal(found[key], weights[key]), key


def test_component_names_with_and_without_text_model():
    with_tm = checkpoint_targets(["text_model.encoder.layers.0.mlp.fc1.weight"], "sdxl", component="text_encoder_2")
    without = checkpoint_targets(["encoder.layers.0.mlp.fc1.weight"], "sdxl", component="text_encoder_2")
    assert set(with_tm) == set(without) == {"te2.text_model.encoder.layers.0.mlp.fc1"}
    proj = checkpoint_targets(["text_projection.weight"], "sdxl", component="text_encoder_2")
    assert proj == {"te2.text_projection": WeightSlot("text_projection.weight")}  # transformers: not transposed
    unet = checkpoint_targets(["down_blocks.1.attentions.0.proj_in.weight", "bogus.weight"], "sd1", component="unet")
    assert unet == {"unet.input_blocks.4.1.proj_in": WeightSlot("down_blocks.1.attentions.0.proj_in.weight")}
