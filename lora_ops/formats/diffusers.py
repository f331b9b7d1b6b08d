"""diffusers format (``unet.…lora_A.weight``, ``text_encoder.…``, ``text_encoder_2.…``) and PEFT format.

diffusers files carry no alpha tensors; alphas and per-layer ranks travel in the safetensors metadata key
``lora_adapter_metadata`` (a JSON `LoraConfig` per component, keys prefixed ``unet.``/``text_encoder.``), which
`load_lora_weights` turns into the PEFT config. We write it whenever a layer has an alpha, with ``rank_pattern`` /
``alpha_pattern`` for layers that differ from the common value, so the file loads exactly.

PEFT files (``base_model.model.<module>.lora_A.weight``) hold one model; their config (``adapter_config.json`` in
a PEFT folder) is stored in the metadata key ``adapter_config`` when we write a single file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import replace

import torch

from ..errors import LoraFormatError
from ..lora import LoRA
from . import names
from .layers import PEFT_SUFFIXES, build_layer, group_by_module, layer_tensors

COMPONENTS = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
PARTS = {v: k for k, v in COMPONENTS.items()}
ADAPTER_METADATA = "lora_adapter_metadata"
PEFT_CONFIG = "adapter_config"
PEFT_PREFIX = "base_model.model."
META_KEYS = (ADAPTER_METADATA, "format")


def detect(keys: list[str], metadata: Mapping[str, str]) -> bool:
    prefixes = tuple(f"{c}." for c in COMPONENTS)
    return any(k.startswith(prefixes) and names_has_suffix(k) for k in keys)


def detect_peft(keys: list[str], metadata: Mapping[str, str]) -> bool:
    return any(k.startswith(PEFT_PREFIX) for k in keys)


def names_has_suffix(key: str) -> bool:
    return any(key.endswith(s) for s in PEFT_SUFFIXES)


def _json_metadata(metadata: Mapping[str, str], key: str, file: str | None) -> dict:
    raw = metadata.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"metadata '{key}' is not valid JSON ({err.msg})", file=file) from None
    if not isinstance(value, dict):
        raise LoraFormatError(f"metadata '{key}' must be a JSON object", file=file)
    return value


def _alpha_for(path: str, config: Mapping) -> float | None:
    """PEFT semantics: an ``alpha_pattern`` entry matching the module (full name or dotted suffix) wins."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern):
            return float(alpha)
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def _component_paths(component: str, path: str, family: str | None, *, file: str | None) -> str:
    part = COMPONENTS[component]
    return names.unet_key(path, family, file=file) if part == "unet" else names.te_key(part, path)


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    config = _json_metadata(metadata, ADAPTER_METADATA, file)
    modules, unused = group_by_module(tensors, PEFT_SUFFIXES)
    located: dict[str, tuple[str, str]] = {}
    for module in list(modules):
        component, _, path = module.partition(".")
        if component not in COMPONENTS or not path:
            unused.extend(modules.pop(module).values())
            continue
        located[module] = (component, path.removeprefix("processor."))
    fam = names.guess_family(
        [p for c, p in located.values() if c == "unet"], (COMPONENTS[c] for c, _ in located.values()), family
    )
    layers = {}
    for module, roles in modules.items():
        component, path = located[module]
        role_tensors = {r: tensors[k] for r, k in roles.items()}
        layer = build_layer(role_tensors, file=file, module=module)
        if layer.alpha is None and config:
            sub = {k.removeprefix(component + "."): v for k, v in config.items() if k.startswith(component + ".")}
            layer = replace(layer, alpha=_alpha_for(path, sub))
        layers[_component_paths(component, path, fam, file=file)] = layer
    user_meta = {k: v for k, v in metadata.items() if k not in META_KEYS}
    return LoRA(layers, user_meta, family=fam, source_format="diffusers"), unused


def _peft_config(paths_layers: list[tuple[str, object]]) -> dict:
    """A LoraConfig dict: the most common rank/alpha plus patterns for the layers that differ."""
    ranks = Counter(layer.rank for _, layer in paths_layers)
    r = ranks.most_common(1)[0][0]
    alphas = Counter(layer.alpha if layer.alpha is not None else layer.rank for _, layer in paths_layers)
    alpha = alphas.most_common(1)[0][0]
    rank_pattern = {p: layer.rank for p, layer in paths_layers if layer.rank != r}
    alpha_pattern = {
        p: (layer.alpha if layer.alpha is not None else layer.rank)
        for p, layer in paths_layers
        if (layer.alpha if layer.alpha is not None else layer.rank) != alpha
    }
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(p for p, _ in paths_layers),
        "use_dora": False,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "bias": "none",
    }


def _model_path(key: str, family: str | None) -> tuple[str, str]:
    part, path = names.split_canonical(key)
    if part not in PARTS:
        raise LoraFormatError(f"part '{part}' has no diffusers name", key=key)
    if part == "unet":
        return PARTS[part], names.unet_path(key, family, "diffusers")
    return PARTS[part], path


def write(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out: dict[str, torch.Tensor] = {}
    by_component: dict[str, list] = {}
    for key, layer in lora.layers.items():
        component, path = _model_path(key, lora.family)
        for suffix, t in layer_tensors(layer, "peft").items():
            out[f"{component}.{path}{suffix}"] = t
        # Config patterns match module names by suffix; without `text_model.` they match CLIP models of
        # transformers 5 (flattened) and older releases alike. diffusers strips it from the keys itself.
        by_component.setdefault(component, []).append((path.removeprefix("text_model."), layer))
    metadata = dict(lora.metadata)
    metadata["format"] = "pt"
    if any(layer.alpha is not None for layer in lora.layers.values()):
        packed = {}
        for component, items in by_component.items():
            packed.update({f"{component}.{k}": v for k, v in _peft_config(items).items()})
        metadata[ADAPTER_METADATA] = json.dumps(packed, indent=2, sort_keys=True)
    return out, metadata


def read_peft(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    config = _json_metadata(metadata, PEFT_CONFIG, file)
    component = metadata.get("lora_ops.component") or ""
    modules, unused = group_by_module(tensors, PEFT_SUFFIXES, prefix=PEFT_PREFIX)
    if not component:
        is_te = any(m.startswith(("text_model.", "encoder.layers.")) for m in modules)
        component = "text_encoder" if is_te else "unet"
    if component not in COMPONENTS:
        raise LoraFormatError(f"unknown component '{component}' in metadata 'lora_ops.component'", file=file)
    fam = names.guess_family(list(modules) if component == "unet" else [], [COMPONENTS[component]], family)
    layers = {}
    for module, roles in modules.items():
        layer = build_layer({r: tensors[k] for r, k in roles.items()}, file=file, module=module)
        if layer.alpha is None and config:
            layer = replace(layer, alpha=_alpha_for(module, config))
        layers[_component_paths(component, module, fam, file=file)] = layer
    user_meta = {k: v for k, v in metadata.items() if k not in (PEFT_CONFIG, "lora_ops.component", "format")}
    return LoRA(layers, user_meta, family=fam, source_format="peft"), unused


def write_peft(lora: LoRA, *, component: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One model's layers with ``base_model.model.`` keys (PEFT's own naming); ``component`` picks the model."""
    comps = {_model_path(k, lora.family)[0] for k in lora.layers}
    if component is None:
        if len(comps) > 1:
            raise LoraFormatError(
                f"a PEFT file holds one model, this LoRA has {sorted(comps)}",
                hint="pick one with component=… / --component, or write diffusers format",
            )
        component = next(iter(comps), "unet")
    out: dict[str, torch.Tensor] = {}
    items = []
    for key, layer in lora.layers.items():
        comp, path = _model_path(key, lora.family)
        if comp != component:
            continue
        for suffix, t in layer_tensors(layer, "peft").items():
            out[f"{PEFT_PREFIX}{path}{suffix}"] = t
        items.append((path, layer))
    metadata = dict(lora.metadata)
    metadata["lora_ops.component"] = component
    if items:
        metadata[PEFT_CONFIG] = json.dumps(_peft_config(items), sort_keys=True)
    return out, metadata
