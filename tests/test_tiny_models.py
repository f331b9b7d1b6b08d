"""Tiny SD 1.5 / SDXL models: real module names, deterministic weights, working pipelines, shipped tokenizer."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lora_ops.errors import LoraValueError
from lora_ops.testing import tiny

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a photo of sks dog"


@functools.cache
def pipeline(family: str):
    return tiny.tiny_sd1_pipeline() if family == "sd1" else tiny.tiny_sdxl_pipeline()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_pipeline_runs_two_steps(family):
    pipe = pipeline(family)
    out = pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()
    again = pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert torch.equal(out, again)


SD15_NAMES = [
    "conv_in",
    "time_embedding.linear_1",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.proj_in",
    "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.2.downsamplers.0.conv",
    "down_blocks.3.resnets.1.conv2",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "up_blocks.0.resnets.2.conv1",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.3.attentions.2.proj_out",
    "up_blocks.3.attentions.2.transformer_blocks.0.norm3",
    "conv_norm_out",
    "conv_out",
]
SDXL_NAMES = [
    "add_embedding.linear_1",
    "add_embedding.linear_2",
    "down_blocks.0.resnets.1.conv1",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_v",
    "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.1.ff.net.2",
    "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_q",
    "up_blocks.1.upsamplers.0.conv",
    "up_blocks.2.resnets.2.conv_shortcut",
]


def module_names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules()}


def test_sd1_unet_has_sd15_names_and_layout():
    unet = pipeline("sd1").unet
    names = module_names(unet)
    assert set(SD15_NAMES) <= names
    assert not any(n.startswith(("add_embedding", "down_blocks.3.attentions", "up_blocks.0.attentions")) for n in names)
    assert not any(n.startswith("down_blocks.4") for n in names)
    assert isinstance(unet.get_submodule("down_blocks.0.attentions.0.proj_in"), torch.nn.Conv2d)  # SD 1.5: conv


def test_sdxl_unet_has_sdxl_names_and_layout():
    unet = pipeline("sdxl").unet
    names = module_names(unet)
    assert set(SDXL_NAMES) <= names
    assert not any(n.startswith(("down_blocks.0.attentions", "up_blocks.2.attentions", "down_blocks.3")) for n in names)
    assert isinstance(unet.get_submodule("down_blocks.1.attentions.0.proj_in"), torch.nn.Linear)  # SDXL: linear


def test_sdxl_dimensions_are_consistent():
    pipe = pipeline("sdxl")
    te1, te2, unet = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert pipe.unet.add_embedding.linear_1.in_features == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_vae_downsamples_8x():
    vae = tiny.tiny_vae()
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latent.shape == (1, 4, 8, 8)


def test_text_encoder_layout():
    te = tiny.tiny_text_encoder("clip-l")
    assert {"encoder.layers.1.self_attn.q_proj", "encoder.layers.0.mlp.fc1"} <= module_names(te)
    g = tiny.tiny_text_encoder("clip-g")
    assert {"text_model.encoder.layers.1.self_attn.out_proj", "text_projection"} <= module_names(g)
    with pytest.raises(LoraValueError):
        tiny.tiny_text_encoder("t5")
    with pytest.raises(LoraValueError):
        tiny.tiny_unet("flux")


def test_tokenizer_is_deterministic_and_fits_the_text_encoders():
    tok = tiny.tiny_tokenizer()
    ids = tok(PROMPT).input_ids
    assert ids == tiny.tiny_tokenizer()(PROMPT).input_ids
    assert 2 < len(ids) <= 77
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.model_max_length == 77
    padded = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(padded) == 77
    long = tok(" ".join(["dog"] * 200), truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long) == 77
    for kind in tiny.TEXT_ENCODER_KINDS:
        config = tiny.tiny_text_encoder(kind).config
        assert len(tok) <= config.vocab_size
        assert (config.bos_token_id, config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def test_shipped_tokenizer_files_match_the_generator():
    spec = importlib.util.spec_from_file_location("make_tokenizer", REPO / "scripts" / "make_tokenizer.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    vocab, merges = gen.build()
    shipped = tiny.TOKENIZER_DIR
    assert json.loads((shipped / "vocab.json").read_text(encoding="utf-8")) == vocab
    lines = (shipped / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and lines[1:] == merges
    assert {"<|startoftext|>", "<|endoftext|>", "a</w>", "!"} <= set(vocab)
    assert len(vocab) == 256 * 2 + len(merges) + 2


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "build",
    [
        lambda s: tiny.tiny_unet("sd1", seed=s),
        lambda s: tiny.tiny_unet("sdxl", seed=s),
        lambda s: tiny.tiny_text_encoder("clip-l", seed=s),
        lambda s: tiny.tiny_text_encoder("clip-g", seed=s),
        lambda s: tiny.tiny_vae(seed=s),
    ],
    ids=["unet-sd1", "unet-sdxl", "clip-l", "clip-g", "vae"],
)
def test_same_seed_same_weights_and_caller_rng_untouched(build):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build(0)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is unchanged
    assert state_dicts_equal(a, build(0))
    assert not state_dicts_equal(a, build(1))


def test_models_are_fp32_and_in_eval_mode():
    for family in ("sd1", "sdxl"):
        pipe = pipeline(family)
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            assert not model.training
            assert {p.dtype for p in model.parameters()} == {torch.float32}
