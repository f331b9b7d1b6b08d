"""Canonical LoRA keys ↔ the tensors of full model checkpoints (single files and diffusers folders).

Baking a LoRA into a checkpoint file means finding, for each canonical key, the tensor that holds its weight.
Single-file checkpoints (what ComfyUI's CheckpointSave, A1111 and the model hubs use) keep the original names:

    SD 1.x/2.x   model.diffusion_model.<LDM path>.weight
                 cond_stage_model.transformer[.text_model].<transformers path>.weight     (CLIP-L, SD 1.x)
                 cond_stage_model.model.transformer.resblocks.N…                          (OpenCLIP-H, SD 2.x)
    SDXL         model.diffusion_model.<LDM path>.weight
                 conditioner.embedders.0.transformer.text_model.<transformers path>.weight (CLIP-L, te1)
                 conditioner.embedders.1.model.transformer.resblocks.N…                   (OpenCLIP-G, te2)

The UNet needs no translation at all: canonical UNet keys *are* the LDM paths, so ``unet.X`` ↔
``model.diffusion_model.X.weight`` for every family with an LDM-named UNet (that is why no UNet path is validated
here; a key no LoRA names is simply never asked for). OpenCLIP is the one layout that is not a rename:

    resblocks.N.attn.in_proj_weight   q, k, v FUSED along rows: [0:d] = q_proj, [d:2d] = k_proj, [2d:3d] = v_proj
    resblocks.N.attn.out_proj.weight  self_attn.out_proj        resblocks.N.mlp.c_fc.weight    mlp.fc1
    resblocks.N.mlp.c_proj.weight     mlp.fc2                   resblocks.N.ln_1 / ln_2        layer_norm1 / 2
    token_embedding.weight / positional_embedding / ln_final    embeddings / final_layer_norm
    text_projection                   text_projection.weight TRANSPOSED (OpenCLIP stores (width, proj))

(the conventions of diffusers' ``convert_open_clip_checkpoint``, which the tests use as ground truth). A slot
therefore says which tensor, which third of its rows, and whether it is stored transposed; it is resolved against
the stored shape, so no shapes are needed to build the map.

Diffusers folders hold one file per component with the names the libraries use: ``unet/`` diffusers UNet paths,
``text_encoder/`` and ``text_encoder_2/`` transformers paths (with or without ``text_model.``). Pass the
component to `checkpoint_targets`.

DiT families without a UNet layout (FLUX.1) are read from their single files in the original (BFL) names, at the
top level (``flux1-dev.safetensors``: ``double_blocks.0.img_attn.qkv.weight``) or under ``model.diffusion_model.``
(all-in-one files): ``unet.<BFL path>`` ↔ ``[model.diffusion_model.]<BFL path>.weight`` for every module the family
declares (all Linear layers: norm scales, biases and text encoders are not targets). A fused weight
(``img_attn.qkv``, ``linear1``) is one whole target; a LoRA layer on one of its parts (``unet.X[q]``) gets its rows
through the family's `FusedWeight` (`lora_ops.coverage.target_shape`, `lora_ops.bake`).

A DiT family whose diffusers names are renames and row splits of the original weights (Z-Image: no swapped halves)
is also read from single files in diffusers names, as its official release stores it
(``layers.0.attention.to_q.weight``; either prefix). A tensor holding PART of a fused original weight gets that
part's key (``unet.layers.0.attention.qkv[q]``): the whole weight is then the stack of its part tensors, and a
LoRA layer on it patches each of them with its rows (`lora_ops.bake`; `lora_ops.extract` reads them stacked).
Names both spellings share (Z-Image ``feed_forward.w1``) are one key; a file holding one weight in both spellings
(``qkv`` and ``to_q``) is refused, as two copies. FLUX.1 is read in BFL names only (its diffusers files store the
final modulation's halves swapped).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .. import families
from ..errors import LoraFormatError, LoraValueError
from ..families.unet_layout import unet_layout
from ..part_keys import parse_key, part_key
from .sd_unet import unet_diffusers_to_ldm
from .text_encoders import te_to_canonical_path

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

UNET_PREFIX = "model.diffusion_model."
# Where a DiT family's denoiser sits in its single files: under the all-in-one prefix, or at the top level.
DIT_PREFIXES = (UNET_PREFIX, "")
# Per family: key prefix → text-encoder part, for the two text-encoder layouts found in single files.
CLIP_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"cond_stage_model.transformer.": "te1"},
    "sdxl": {"conditioner.embedders.0.transformer.": "te1"},
}
OPEN_CLIP_PREFIXES: dict[str, dict[str, str]] = {
    "sd1": {"cond_stage_model.model.": "te1"},  # SD 2.x: OpenCLIP-H as the only text encoder
    "sdxl": {"conditioner.embedders.1.model.": "te2"},
}
# Diffusers folder: component sub-folder → part of the canonical key.
COMPONENTS: dict[str, str] = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}

_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
# OpenCLIP leaf inside a resblock → transformers module inside the layer (in_proj_weight is handled apart).
_OPEN_CLIP_LEAVES: dict[str, str] = {
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
    "ln_1.weight": "layer_norm1",
    "ln_2.weight": "layer_norm2",
}
_FUSED_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_OPEN_CLIP_TOP: dict[str, tuple[str, bool]] = {
    "token_embedding.weight": ("text_model.embeddings.token_embedding", False),
    "positional_embedding": ("text_model.embeddings.position_embedding", False),
    "ln_final.weight": ("text_model.final_layer_norm", False),
    "text_projection": ("text_projection", True),
}


@dataclass(frozen=True)
class WeightSlot:
    """Where a canonical key's weight lives in a checkpoint.

    ``tensor``: the tensor's name in its file. ``chunk``: ``(i, n)`` when the weight is the i-th of n equal row
    blocks of a fused tensor (OpenCLIP q/k/v: ``(0, 3)`` = q), else None; `row_slice` turns it into rows of the
    stored shape. ``transpose``: the tensor holds the weight transposed (OpenCLIP ``text_projection``).
    """

    tensor: str
    chunk: tuple[int, int] | None = None
    transpose: bool = False

    def row_slice(self, stored: Shape) -> slice | None:
        """The rows of the stored tensor that hold the weight; None when it is the whole tensor."""
        if self.chunk is None:
            return None
        i, n = self.chunk
        if not stored or stored[0] % n:
            raise LoraFormatError(
                f"fused tensor of shape {tuple(stored)} does not split into {n} equal row blocks", key=self.tensor
            )
        size = stored[0] // n
        return slice(i * size, (i + 1) * size)

    def shape(self, stored: Shape) -> Shape:
        """The canonical weight's shape, given the stored tensor's shape."""
        stored = tuple(stored)
        rows = self.row_slice(stored)
        if rows is not None:
            stored = (rows.stop - rows.start, *stored[1:])
        if self.transpose:
            if len(stored) != 2:
                raise LoraFormatError(f"cannot transpose a {len(stored)}-D tensor", key=self.tensor)
            stored = (stored[1], stored[0])
        return stored

    def read(self, stored_tensor: torch.Tensor) -> torch.Tensor:
        """The canonical weight as a view of the stored tensor (rows taken, then transposed)."""
        rows = self.row_slice(tuple(stored_tensor.shape))
        t = stored_tensor if rows is None else stored_tensor[rows]
        return t.T if self.transpose else t


def _add(
    out: dict[str, WeightSlot],
    key: str,
    slot: WeightSlot,
    hint: str = "the checkpoint mixes two namings of one text encoder; remove one copy",
) -> None:
    if key in out:
        raise LoraFormatError(
            f"two tensors hold the same weight: '{out[key].tensor}' and '{slot.tensor}'", key=key, hint=hint
        )
    out[key] = slot


def _open_clip(rest: str, tensor: str, part: str, out: dict[str, WeightSlot]) -> None:
    """Map one OpenCLIP tensor (name after the ``…model.`` prefix) to its canonical slot(s)."""
    if rest in _OPEN_CLIP_TOP:
        path, transpose = _OPEN_CLIP_TOP[rest]
        _add(out, f"{part}.{path}", WeightSlot(tensor, transpose=transpose))
        return
    m = _RESBLOCK.fullmatch(rest)
    if m is None:
        return
    layer, leaf = m.group(1), m.group(2)
    base = f"{part}.text_model.encoder.layers.{layer}."
    if leaf == "attn.in_proj_weight":
        for i, module in enumerate(_FUSED_QKV):
            _add(out, base + module, WeightSlot(tensor, chunk=(i, len(_FUSED_QKV))))
    elif leaf in _OPEN_CLIP_LEAVES:
        _add(out, base + _OPEN_CLIP_LEAVES[leaf], WeightSlot(tensor))


def _module_of(key: str, prefix: str) -> str | None:
    """``<prefix><module>.weight`` → ``<module>``; None for biases, buffers and other prefixes."""
    if key.startswith(prefix) and key.endswith(".weight") and len(key) > len(prefix) + len(".weight"):
        return key[len(prefix) : -len(".weight")]
    return None


def _single_file(keys: Iterable[str], family: str) -> dict[str, WeightSlot]:
    clip, open_clip = CLIP_PREFIXES.get(family, {}), OPEN_CLIP_PREFIXES.get(family, {})
    out: dict[str, WeightSlot] = {}
    for key in keys:
        module = _module_of(key, UNET_PREFIX)
        if module is not None:
            _add(out, f"unet.{module}", WeightSlot(key))
            continue
        for prefix, part in clip.items():
            module = _module_of(key, prefix)
            if module is not None:
                _add(out, f"{part}.{te_to_canonical_path(module)}", WeightSlot(key))
        for prefix, part in open_clip.items():
            if key.startswith(prefix):
                _open_clip(key[len(prefix) :], key, part, out)
    return out


def _dit_single_file(keys: Iterable[str], family: families.Family) -> dict[str, WeightSlot]:
    """``unet.<original path>`` → slot for every Linear weight of a DiT family's single file (either prefix).

    Families without swapped halves are read in diffusers names too: a tensor holding part of a fused weight gets
    the part key ``unet.<original path>[<part>]``.
    """
    diffusers_names = not family.swap_halves
    twice = (f"the file holds the {family.label} transformer twice (top level and under '{UNET_PREFIX}', or in both "
             "its original and diffusers names); remove one copy")
    out: dict[str, WeightSlot] = {}
    for key in keys:
        if not key.endswith(".weight"):
            continue
        prefix = UNET_PREFIX if key.startswith(UNET_PREFIX) else ""
        module = _module_of(key, prefix)
        if module is None:
            continue
        try:
            path, part = family.denoiser_path(module) if diffusers_names else (family.original_path(module), None)
        except LoraFormatError:
            continue  # norm scales, text encoders, VAE, (FLUX.1) diffusers spellings: no LoRA target
        _add(out, part_key(f"unet.{path}", part), WeightSlot(key), hint=twice)
    for key, slot in out.items():
        module, part = parse_key(key)
        if part is not None and module in out:
            raise LoraFormatError(f"two tensors hold the same weight: '{out[module].tensor}' and '{slot.tensor}' "
                                  f"(its part '{part}')", key=module, hint=twice)
    return out


def _component(keys: Iterable[str], family: str, component: str) -> dict[str, WeightSlot]:
    if component not in COMPONENTS:
        raise LoraFormatError(f"unknown diffusers component '{component}'", hint=f"use one of {sorted(COMPONENTS)}")
    part = COMPONENTS[component]
    out: dict[str, WeightSlot] = {}
    for key in keys:
        module = _module_of(key, "")
        if module is None:
            continue
        if part == "unet":
            try:
                canonical = unet_diffusers_to_ldm(module, family)
            except LoraFormatError:
                log.debug("no canonical name for UNet tensor %s", key)
                continue
        else:
            canonical = te_to_canonical_path(module)
        _add(out, f"{part}.{canonical}", WeightSlot(key))
    return out


def checkpoint_targets(keys: Iterable[str], family: str, *, component: str | None = None) -> dict[str, WeightSlot]:
    """Canonical key → `WeightSlot` for every weight of a checkpoint, from its tensor names alone.

    ``component`` None: a single-file checkpoint (original names). ``"unet"``, ``"text_encoder"``,
    ``"text_encoder_2"``: one file of that diffusers-folder component (SD families only). Tensors with no
    canonical name (VAE, biases, norm scales, buffers, EMA copies) are left out; a key that two tensors claim
    raises `LoraFormatError`. FLUX.1 single files map their BFL-named Linear weights, top level or under
    ``model.diffusion_model.``; their text encoders are not mapped. Z-Image single files map either naming
    (ComfyUI's fused ``attention.qkv`` or the official split ``attention.to_q``: part keys ``unet.X[q]``).
    """
    dit = families.REGISTRY.get(family)
    if dit is not None and dit.unet_layout is None:
        if component is not None:
            raise LoraValueError(
                f"{dit.label} diffusers-folder components are not supported",
                hint=f"use the single-file {dit.label} checkpoint (original names)",
            )
        return _dit_single_file(keys, dit)
    unet_layout(family)  # unknown families raise with the list of known ones
    if component is None:
        return _single_file(keys, family)
    return _component(keys, family, component)


def _unet_path(key: str) -> str:
    """A UNet tensor name → its module path in either spelling (prefix and parameter name dropped)."""
    return key.removeprefix(UNET_PREFIX).rsplit(".", 1)[0]


def checkpoint_family(keys: Iterable[str]) -> str | None:
    """The model family of a checkpoint (single file, or a diffusers UNet file) from its tensor names.

    SDXL is the only family with ``conditioner.embedders`` (its two text encoders) and with the text-time
    embedding (``label_emb`` / ``add_embedding``); SD 1.x/2.x single files have ``cond_stage_model``. Otherwise the
    module paths (``model.diffusion_model.`` and the parameter name dropped) go to `lora_ops.families.detect`:
    the block layout tells SD 1.x from SDXL, BFL names (``double_blocks.0.img_attn.qkv``, top level or
    prefixed) say FLUX.1, and Z-Image's names (``layers.0.attention.qkv`` or ``…to_q``, ``cap_embedder.1``) say
    Z-Image. None when nothing tells: never a default family.
    """
    keys = list(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd1"
    unet = [k for k in keys if k.startswith(UNET_PREFIX) or not k.startswith(("first_stage_model.", "model_ema."))]
    if any(_unet_path(k).startswith(("label_emb.", "add_embedding.")) for k in unet):
        return "sdxl"
    return families.detect(_unet_path(k) for k in unet if "." in k)
