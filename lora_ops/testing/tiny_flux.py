"""A tiny FLUX.1-shaped transformer: random weights, no network, real module names in both naming schemes.

`tiny_flux_transformer` builds a ``diffusers.FluxTransformer2DModel`` with the released model's block layout
(double-stream blocks, then single-stream blocks, guidance embedder, RMS q/k norms) and small widths.
`diffusers_to_bfl` renames (and fuses) its weights into the names of the original single-file FLUX.1 checkpoints
(``flux1-dev.safetensors``: ``double_blocks.N.img_attn.qkv`` …), which are also ComfyUI's internal names, and
`bfl_to_diffusers` goes back. `save_bfl_checkpoint` writes such a single-file checkpoint, top-level or under a
prefix such as ``model.diffusion_model.``.

The widths are chosen so that loaders which read the layout from the weights see a FLUX.1 model: one head of
width 128 (hidden 128; ComfyUI takes ``num_heads = hidden // sum(axes_dim)`` with ``axes_dim = (16, 56, 56)``),
64 input/output features per token (16 latent channels packed 2×2, as in FLUX.1, whose ComfyUI detection fixes
``out_channels = 16`` with patch size 2), and a guidance embedder (FLUX.1-dev, not schnell).

Requires diffusers (the ``hf`` extra); imported lazily so ``lora_ops`` itself does not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import families
from ..atomic import StrPath, atomic_write
from .random_weights import randomize, seeded

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel

TINY_FLUX_CONFIG: dict[str, Any] = dict(families.get("flux1").tiny_config)
"""``FluxTransformer2DModel`` config of the tiny model: ~1.86 M parameters, a forward pass in milliseconds."""

_NORM_SCALE = re.compile(r"\.norm_(added_)?[qk]\.weight$")  # the 1-D RMS-norm scales


def tiny_flux_transformer(
    seed: int = 0, config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> FluxTransformer2DModel:
    """A ``FluxTransformer2DModel`` (eval mode) with random weights that depend only on ``seed``.

    ``config`` entries override `TINY_FLUX_CONFIG`. Every parameter is drawn, in fp32, from N(0, 0.02²)
    (biases too, so no tensor is identically zero, unlike a fresh model's zero biases), except the RMS-norm
    scales (the 1-D ``norm_q``/``norm_k``/``norm_added_q``/``norm_added_k`` weights), which are 1 + the same
    noise so that attention logits keep their usual size; the model is then cast to ``dtype``. The caller's
    global RNG is left untouched.
    """
    from diffusers import FluxTransformer2DModel

    cfg = {**TINY_FLUX_CONFIG, **(config or {})}
    with seeded(seed):
        model = FluxTransformer2DModel(**cfg)
    return randomize(model, seed, _NORM_SCALE, dtype)


# One-to-one renames: diffusers name → BFL name. Per-block ones use "{}" for the block index.
_GLOBAL_RENAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",  # absent in FLUX.1-schnell
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_DOUBLE_RENAMES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_DOUBLE_NORMS = {  # RMS-norm scales: diffusers ".weight" → BFL ".scale"
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_DOUBLE_FUSED = {  # BFL fused projection ← diffusers parts, stacked along the output rows in this order
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_RENAMES = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_FINAL_MOD = ("norm_out.linear", "final_layer.adaLN_modulation.1")  # rows (scale, shift) ↔ (shift, scale)
_PARAMS = ("weight", "bias")


def _block_indices(keys: list[str], prefix: str) -> range:
    """0 … (largest N among keys ``prefix + "N."``); a missing block in between then fails as missing keys."""
    found = [int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return range(max(found) + 1 if found else 0)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two halves of ``t``'s rows swapped: (a, b) → (b, a). Its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class _Taker:
    """Pops tensors from a copy of a state dict; reports what was missing and what was never taken."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
        self.left = dict(state_dict)
        self.what = what
        self.missing: list[str] = []

    def take(self, key: str) -> torch.Tensor | None:
        """The tensor under ``key`` (removed from what is left), or None, recording it as missing."""
        if key not in self.left:
            self.missing.append(key)
            return None
        return self.left.pop(key)

    def has(self, key: str) -> bool:
        """Whether ``key`` is still there."""
        return key in self.left

    def check(self) -> None:
        """Raise ``ValueError`` naming missing keys and keys left over (not part of a FLUX transformer)."""
        problems = []
        if self.missing:
            problems.append(f"missing keys: {sorted(self.missing)}")
        if self.left:
            problems.append(f"keys not converted (not part of a FLUX.1 transformer): {sorted(self.left)}")
        if problems:
            raise ValueError(f"not a {self.what} FLUX.1 transformer state dict; " + "; ".join(problems))


def _convert(state_dict: Mapping[str, torch.Tensor], *, to_bfl: bool) -> dict[str, torch.Tensor]:
    """Both directions of the diffusers ↔ BFL mapping, driven by the tables above."""
    src = _Taker(state_dict, "diffusers" if to_bfl else "BFL")
    out: dict[str, torch.Tensor] = {}

    def rename(d_key: str, b_key: str) -> None:
        s_key, t_key = (d_key, b_key) if to_bfl else (b_key, d_key)
        if (t := src.take(s_key)) is not None:
            out[t_key] = t

    def fused(d_prefix: str, b_prefix: str, d_parts: tuple[str, ...], b_name: str, sizes: list[int]) -> None:
        """BFL ``b_prefix + b_name`` = rows of the diffusers parts stacked; ``sizes``: their row counts (to split)."""
        for p in _PARAMS:
            if to_bfl:
                parts = [src.take(f"{d_prefix}{d}.{p}") for d in d_parts]
                if all(t is not None for t in parts):
                    out[f"{b_prefix}{b_name}.{p}"] = torch.cat(parts, dim=0)
            elif (t := src.take(f"{b_prefix}{b_name}.{p}")) is not None:
                if t.shape[0] != sum(sizes):
                    raise ValueError(f"{b_prefix}{b_name}.{p} has {t.shape[0]} rows, expected {sum(sizes)}")
                for d, part in zip(d_parts, t.split(sizes, dim=0)):
                    out[f"{d_prefix}{d}.{p}"] = part.clone()

    def hidden_size() -> int:
        """The transformer width, read from the image embedding's output rows."""
        key = "x_embedder.weight" if to_bfl else "img_in.weight"
        if key not in src.left:
            raise ValueError(f"not a {src.what} FLUX.1 transformer state dict; missing key {key!r}")
        return int(src.left[key].shape[0])

    hidden = hidden_size()
    for d_key, b_key in _GLOBAL_RENAMES.items():
        if "guidance" in d_key and not src.has(f"{d_key if to_bfl else b_key}.weight"):
            continue  # no guidance embedder (schnell-like): neither key is expected
        for p in _PARAMS:
            rename(f"{d_key}.{p}", f"{b_key}.{p}")

    d_mod, b_mod = _FINAL_MOD
    for p in _PARAMS:
        if (t := src.take(f"{d_mod if to_bfl else b_mod}.{p}")) is not None:
            out[f"{b_mod if to_bfl else d_mod}.{p}"] = _swap_halves(t)

    keys = list(src.left)
    d_double, b_double = "transformer_blocks.", "double_blocks."
    for i in _block_indices(keys, d_double if to_bfl else b_double):
        dp, bp = f"{d_double}{i}.", f"{b_double}{i}."
        for d, b in _DOUBLE_RENAMES.items():
            for p in _PARAMS:
                rename(f"{dp}{d}.{p}", f"{bp}{b}.{p}")
        for d, b in _DOUBLE_NORMS.items():
            rename(dp + d, bp + b)
        for b, d_parts in _DOUBLE_FUSED.items():
            fused(dp, bp, d_parts, b, [hidden] * len(d_parts))

    d_single, b_single = "single_transformer_blocks.", "single_blocks."
    for i in _block_indices(keys, d_single if to_bfl else b_single):
        dp, bp = f"{d_single}{i}.", f"{b_single}{i}."
        sizes: list[int] = []  # only needed to split (BFL → diffusers)
        linear2 = None if to_bfl else src.left.get(f"{bp}linear2.weight")
        if linear2 is not None:
            # linear2 (= proj_out) reads [attention output (hidden), MLP activations (mlp_hidden)]
            sizes = [hidden, hidden, hidden, int(linear2.shape[1]) - hidden]
        for d, b in _SINGLE_RENAMES.items():
            for p in _PARAMS:
                rename(f"{dp}{d}.{p}", f"{bp}{b}.{p}")
        for d, b in _SINGLE_NORMS.items():
            rename(dp + d, bp + b)
        if to_bfl or linear2 is not None:  # else linear2 is reported missing and linear1 left over
            for b, d_parts in _SINGLE_FUSED.items():
                fused(dp, bp, d_parts, b, sizes)

    src.check()
    return out


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict under the original FLUX.1 (BFL / ComfyUI) names.

    q/k/v projections are fused into ``*.qkv`` (rows stacked q, k, v), a single block's q/k/v and ``proj_mlp``
    into ``linear1``, RMS-norm ``weight``\\s become ``scale``\\s, and the rows of ``norm_out.linear`` (diffusers:
    scale, shift) are swapped into ``final_layer.adaLN_modulation.1`` (BFL: shift, scale). Widths and block counts
    come from the tensors and keys; the guidance embedder is optional (FLUX.1-schnell has none). Renamed tensors
    are the input's own (not copies). Raises ``ValueError`` naming any key that is missing or left unconverted.
    """
    return _convert(state_dict, to_bfl=True)


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `diffusers_to_bfl`: BFL names (no ``model.diffusion_model.`` prefix) → diffusers names.

    The fused rows are split by sizes read from the tensors: hidden = ``img_in`` output rows, and a single block's
    MLP width = ``linear2`` input columns − hidden. Raises ``ValueError`` naming missing or unconverted keys.
    """
    return _convert(state_dict, to_bfl=False)


def tiny_flux_bfl_state_dict(
    seed: int = 0, config: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The BFL-named state dict of ``tiny_flux_transformer(seed, config, dtype)`` (see `diffusers_to_bfl`)."""
    return diffusers_to_bfl(tiny_flux_transformer(seed, config, dtype).state_dict())


def save_bfl_checkpoint(path: StrPath, state_dict: Mapping[str, torch.Tensor], *, prefix: str = "") -> None:
    """Write ``state_dict`` as a single-file safetensors checkpoint, each key as ``prefix + name``, atomically.

    ``prefix=""`` gives top-level keys like ``flux1-dev.safetensors``; ``"model.diffusion_model."`` the layout of
    merged all-in-one checkpoints. Tensors are written contiguous and unshared (safetensors refuses shared storage).
    """
    from safetensors.torch import save_file

    tensors = {prefix + name: t.detach().contiguous().clone() for name, t in state_dict.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp))

def tiny_flux_forward(m: FluxTransformer2DModel, seed: int = 0, h: int = 4, w: int = 4, txt: int = 8) -> torch.Tensor:
    """One forward pass on seeded random inputs: h × w packed latent tokens and ``txt`` text tokens, with the ids,
    pooled vector, timestep and guidance FluxPipeline passes (guidance only for a guidance-distilled model)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = m.config
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    with torch.no_grad():
        return m(
            hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=gen),
            encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, generator=gen),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
            timestep=torch.tensor([0.5]),
            img_ids=img_ids.reshape(-1, 3),
            txt_ids=torch.zeros(txt, 3),
            guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None,
        ).sample
