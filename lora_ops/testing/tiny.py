"""Tiny SD 1.5- and SDXL-shaped models from configs: random weights, no network, real module names.

The block layout (block types, layers per block, transformer depth > 1 for SDXL, text-time embedding,
linear vs conv projections) is that of the released models, so every module path — and therefore every real
LoRA key name — exists here too; only the widths are small. Everything is fp32 and deterministic by ``seed``,
and the caller's global RNG is left untouched (weights are drawn inside ``torch.random.fork_rng``).

Requires the ``hf`` extra (diffusers, transformers); imported lazily so ``lora_ops`` itself does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import families
from ..errors import LoraValueError
from .random_weights import seeded

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
MAX_LENGTH = 77
TEXT_HIDDEN = 32  # both tiny text encoders
TE2_PROJECTION = 32  # text_encoder_2.config.projection_dim
SDXL_TIME_EMBED = 8  # addition_time_embed_dim; SDXL passes 6 micro-conditioning numbers

# UNet configs: the real models' layouts with small widths, declared by each family (`lora_ops.families`).
UNET_CONFIGS: dict[str, dict[str, Any]] = {f: dict(families.get(f).tiny_config) for f in ("sd1", "sdxl")}

TEXT_ENCODER_KINDS = ("clip-l", "clip-g")


def tiny_unet(family: str, seed: int = 0) -> UNet2DConditionModel:
    """A UNet2DConditionModel with the SD 1.5 ("sd1") or SDXL ("sdxl") block layout and tiny widths."""
    from diffusers import UNet2DConditionModel

    if family not in UNET_CONFIGS:
        raise LoraValueError(f"unknown model family '{family}'", hint=f"use one of {sorted(UNET_CONFIGS)}")
    with seeded(seed):
        return UNet2DConditionModel(**UNET_CONFIGS[family]).eval()


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer from the small vocab.json/merges.txt shipped in ``lora_ops/testing/tokenizer``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=str(TOKENIZER_DIR / "vocab.json"),
        merges=str(TOKENIZER_DIR / "merges.txt"),
        model_max_length=MAX_LENGTH,
    )


def _vocab_ids() -> tuple[int, int, int]:
    """(vocab size, bos id, eos id) of the shipped tokenizer (ids read from vocab.json)."""
    import json

    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    return len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def tiny_text_encoder(kind: str = "clip-l", seed: int = 0) -> CLIPTextModel:
    """CLIP-L-shaped ``CLIPTextModel`` ("clip-l") or OpenCLIP-G-shaped ``CLIPTextModelWithProjection`` ("clip-g").

    Hidden size 32, 2 layers, 2 heads; the vocabulary covers `tiny_tokenizer`, whose eos id is the pooling token.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if kind not in TEXT_ENCODER_KINDS:
        raise LoraValueError(f"unknown text encoder kind '{kind}'", hint=f"use one of {list(TEXT_ENCODER_KINDS)}")
    vocab_size, bos, eos = _vocab_ids()
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu" if kind == "clip-l" else "gelu",
        projection_dim=TE2_PROJECTION,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    cls = CLIPTextModel if kind == "clip-l" else CLIPTextModelWithProjection
    with seeded(seed):
        return cls(config).eval()


def tiny_vae(seed: int = 0, *, scaling_factor: float = 0.18215) -> AutoencoderKL:
    """AutoencoderKL with 4 blocks (8x downsampling, 4 latent channels) and tiny widths."""
    from diffusers import AutoencoderKL

    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=scaling_factor,
        )
    return vae.eval()


def tiny_sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline (SD 1.5 layout, DDIM scheduler, no safety checker) on tiny random models."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder("clip-l", seed),
        tokenizer=tiny_tokenizer(),
        unet=tiny_unet("sd1", seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline (SDXL layout, Euler scheduler, no watermarker) on tiny random models."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed, scaling_factor=0.13025),
        text_encoder=tiny_text_encoder("clip-l", seed),
        text_encoder_2=tiny_text_encoder("clip-g", seed + 1),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_unet("sdxl", seed),
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
