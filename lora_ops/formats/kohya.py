"""kohya sd-scripts format (also LyCORIS, which uses the same names): ``lora_unet_…`` / ``lora_te{,1,2,3}_…``.

Module paths are flattened with ``_`` (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``)
and carry ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (LoCon: ``.lora_mid.weight``; DoRA:
``.dora_scale``; LyCORIS: ``.hada_w1_a`` …). The denoiser comes in its original spelling (LDM for SDXL, BFL for
FLUX.1: ``lora_unet_double_blocks_0_img_attn_qkv``) or diffusers spelling (usual for SD 1.x); both are read.
Two trainer variants name a diffusers-spelled denoiser with other prefixes: OneTrainer's "mixture" files
(``lora_transformer_``) and SimpleTuner's LyCORIS files (``lycoris_``). Text-encoder prefixes depend on the
family (``lora_te2_`` is SDXL's CLIP-G but OneTrainer's FLUX.1 T5), so they are resolved after the family.

The writer emits what kohya's own trainers emit for the family (its ``kohya_style``), with fused weights whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from .. import families, fused, keymap, safe_json
from ..errors import LoraFormatError
from ..lora import LoRA
from . import names
from .layers import KOHYA_SUFFIXES, LYCORIS_PARTS, LayerTable, group_by_module, layer_tensors

DENOISER_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
# Without a family: the SD meaning of each text-encoder prefix (T5 paths are recognised by their names).
DEFAULT_TE_PARTS = {"lora_te_": "te1", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te3_": "te3"}


def detect(keys: list[str], metadata: Mapping[str, str]) -> bool:
    return any(k.startswith(DENOISER_PREFIXES + TE_PREFIXES) for k in keys)


def detect_lycoris(keys: list[str], metadata: Mapping[str, str]) -> bool:
    lyco = tuple(f".{p}" for parts in LYCORIS_PARTS.values() for p in parts)
    return detect(keys, metadata) and any(k.endswith(lyco) for k in keys)


def _prefix_of(module: str) -> str | None:
    return next((p for p in sorted(DENOISER_PREFIXES + TE_PREFIXES, key=len, reverse=True)
                 if module.startswith(p)), None)


def _te_part(prefix: str, path: str, family: str | None) -> str:
    if family is not None:
        for te in families.get(family).text_encoders:
            if prefix in te.kohya:
                return te.part
        raise LoraFormatError(f"{families.label(family)} has no text encoder written as '{prefix}'", key=prefix)
    part = DEFAULT_TE_PARTS[prefix]
    return "te3" if part == "te2" and names.te_kind("te2", path, None) == "t5" else part


def split_qkv(metadata: Mapping[str, str]) -> bool:
    """Whether sd-scripts' ``ss_network_args`` say the file was trained with ``split_qkv``."""
    raw = metadata.get("ss_network_args") or ""
    if "split_qkv" not in raw:
        return False
    try:
        args = safe_json.loads_object(raw, file=None, key="ss_network_args")
    except LoraFormatError:
        return False  # informational metadata: a broken value is inspect's to report, not a reason to refuse
    return str(args.get("split_qkv", "")).lower() == "true"


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    modules, unused = group_by_module(tensors, KOHYA_SUFFIXES, file=file)
    located: dict[str, tuple[str, str]] = {}  # flat module → (prefix, dotted path)
    for module in list(modules):
        prefix = _prefix_of(module)
        if prefix is None:
            unused.extend(modules.pop(module).values())
            continue
        try:
            # Wan-Fun writes lora_unet__blocks_0_… (ComfyUI's convert_lora_wan_fun drops the extra "_" too)
            located[module] = (prefix, keymap.kohya_to_dotted(module[len(prefix) :].lstrip("_")))
        except LoraFormatError as err:
            raise LoraFormatError(err.reason, file=file, key=module, hint=err.hint) from None
    unet_paths = [p for prefix, p in located.values() if prefix in DENOISER_PREFIXES]
    te_parts = {DEFAULT_TE_PARTS[prefix] for prefix, _ in located.values() if prefix in TE_PREFIXES}
    fam = names.guess_family(unet_paths, te_parts, family, file=file, metadata=metadata)
    table = LayerTable(tensors, file=file)
    for module, roles in modules.items():
        prefix, path = located[module]
        if prefix in DENOISER_PREFIXES:
            names.add_denoiser_layer(table, path, fam, module, roles)
        else:
            try:
                key = names.te_key(_te_part(prefix, path, fam), path, fam)
            except LoraFormatError as err:
                raise LoraFormatError(err.reason, file=file, key=module, hint=err.hint) from None
            table.add(key, module, roles)
    fmt = "lycoris" if any(layer.kind != "lora" for layer in table.layers.values()) else "kohya"
    lora = LoRA(table.layers, dict(metadata), family=fam, source_format=fmt)
    return (fused.scale_split_qkv(lora) if split_qkv(metadata) else lora), unused


def write(lora: LoRA, *, unet_style: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    lora = fused.fuse(lora)
    fam = families.get(lora.family) if lora.family is not None else None
    style = unet_style or (fam.kohya_style if fam is not None else "original")
    style = {"ldm": "original"}.get(style, style)
    parts = {names.split_canonical(k)[0] for k in lora.layers}
    out: dict[str, torch.Tensor] = {}
    for key, layer in lora.layers.items():
        part, path = names.split_canonical(key)
        if part == "unet":
            module = "lora_unet_" + keymap.dotted_to_kohya(names.unet_path(key, lora.family, style))
        else:
            module = _te_prefix(part, fam, parts) + keymap.dotted_to_kohya(path)
        for suffix, t in layer_tensors(layer, "kohya").items():
            out[module + suffix] = t
    metadata = dict(lora.metadata)
    if split_qkv(metadata):  # alphas were rescaled on read; what we write reads correctly without the flag
        args = json.loads(metadata["ss_network_args"])
        args.pop("split_qkv", None)
        metadata["ss_network_args"] = json.dumps(args)
    return out, metadata


def _te_prefix(part: str, fam: families.Family | None, parts: set[str]) -> str:
    te = fam.text_encoder(part) if fam is not None else None
    if te is not None:
        return te.kohya[0]
    if part == "te1":
        return "lora_te1_" if "te2" in parts else "lora_te_"
    return {"te2": "lora_te2_", "te3": "lora_te3_"}.get(part) or _no_prefix(part)


def _no_prefix(part: str) -> str:
    raise LoraFormatError(f"model part '{part}' has no kohya prefix")
