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
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import families, fused, safe_json
from ..errors import LoraFormatError
from ..lora import LoRA
from . import names
from .layers import PEFT_SUFFIXES, LayerTable, group_by_module, layer_tensors

# diffusers component → canonical part when no family says otherwise (FLUX.1's text_encoder_2 is T5: te3).
COMPONENTS = {"unet": "unet", "transformer": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
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
    """Metadata ``key`` parsed as a JSON object by `safe_json` (every refusal names the file and the key)."""
    raw = metadata.get(key)
    if not raw:
        return {}
    return safe_json.loads_object(raw, file=file, key=key)


@dataclass(frozen=True)
class PeftAlphas:
    """The fields of a PEFT ``LoraConfig`` that set a layer's alpha, validated once per config."""

    lora_alpha: float | None = None
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def alpha_for(self, path: str) -> float | None:
        """PEFT semantics: the first ``alpha_pattern`` entry matching the module (full name or dotted suffix; a
        ``^``-anchored entry, as diffusers and our writer use for names that end other names, the full name only)."""
        for pattern, alpha in self.alpha_pattern.items():
            name = pattern.removeprefix("^")
            if path == name or (name == pattern and path.endswith("." + name)):
                return alpha
        return self.lora_alpha

    def layer_alpha(self, path: str, roles: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> float | None:
        """The alpha that gives this layer PEFT's scale in our ΔW = (alpha / r)·B·A.

        rsLoRA (``use_rslora``) scales by alpha / √r instead of alpha / r; the same ΔW in our convention is
        alpha' = alpha·√r. Ignoring the flag would load such a file √r times too weak (4× at rank 16).
        """
        alpha = self.alpha_for(path)
        down = tensors.get(roles.get("down", ""))
        if not self.use_rslora or down is None or down.ndim == 0:
            return alpha  # a missing or malformed factor is reported by build_layer
        rank = int(down.shape[0])
        return (rank if alpha is None else alpha) * math.sqrt(rank)


def peft_alphas(config: Mapping, *, file: str | Path | None, key: str | None, prefix: str = "") -> PeftAlphas:
    """Validate the rank and alpha fields of a LoraConfig dict (named ``prefix`` + field) and return its alphas.

    ``r`` and ``rank_pattern`` values must be integers ≥ 1, ``lora_alpha`` and ``alpha_pattern`` values finite
    numbers (``bool`` is not a number; null means "not set"). Fields we do not read are left alone. ``r`` and
    ``rank_pattern`` are only checked: a layer's rank is its tensors' shape.
    """
    where = {"file": file, "key": key}
    r = config.get(prefix + "r")
    if r is not None:
        safe_json.positive_int(r, field=prefix + "r", **where)
    safe_json.positive_int_map(config.get(prefix + "rank_pattern"), field=prefix + "rank_pattern", **where)
    alpha = config.get(prefix + "lora_alpha")
    rslora = config.get(prefix + "use_rslora", False)
    if not isinstance(rslora, bool):
        raise LoraFormatError(f"'{prefix}use_rslora' must be true or false, got {rslora!r}", **where)
    return PeftAlphas(
        lora_alpha=None if alpha is None else safe_json.finite_number(alpha, field=prefix + "lora_alpha", **where),
        alpha_pattern=safe_json.number_map(config.get(prefix + "alpha_pattern"), field=prefix + "alpha_pattern",
                                           **where),
        use_rslora=rslora,
    )


def _te_part(component: str, path: str, family: str | None) -> str:
    """The canonical part of a text-encoder component: the family's, else the SD meaning (T5 names say te3)."""
    if family is not None:
        for te in families.get(family).text_encoders:
            if te.diffusers == component:
                return te.part
        raise LoraFormatError(f"{families.label(family)} has no text encoder '{component}'", key=component)
    part = COMPONENTS[component]
    return "te3" if part == "te2" and names.te_kind(part, path, None) == "t5" else part


def _add_layer(table: LayerTable, component: str, path: str, family: str | None, module: str,
               roles: Mapping[str, str], alpha: float | None) -> None:
    if COMPONENTS[component] == "unet":
        names.add_denoiser_layer(table, path, family, module, roles, alpha=alpha)
    else:
        try:
            key = names.te_key(_te_part(component, path, family), path, family)
        except LoraFormatError as err:
            raise LoraFormatError(err.reason, file=table.file, key=module, hint=err.hint) from None
        table.add(key, module, roles, alpha=alpha)


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    config = _json_metadata(metadata, ADAPTER_METADATA, file)
    alphas = {c: peft_alphas(config, file=file, key=ADAPTER_METADATA, prefix=c + ".") for c in COMPONENTS}
    modules, unused = group_by_module(tensors, PEFT_SUFFIXES, file=file)
    located: dict[str, tuple[str, str]] = {}
    for module in list(modules):
        component, _, path = module.partition(".")
        if component not in COMPONENTS or not path:
            unused.extend(modules.pop(module).values())
            continue
        located[module] = (component, path.removeprefix("processor."))
    fam = names.guess_family(
        [p for c, p in located.values() if COMPONENTS[c] == "unet"],
        (COMPONENTS[c] for c, _ in located.values()), family, file=file, metadata=metadata,
    )
    table = LayerTable(tensors, file=file)
    for module, roles in modules.items():
        component, path = located[module]
        _add_layer(table, component, path, fam, module, roles, alphas[component].layer_alpha(path, roles, tensors))
    user_meta = {k: v for k, v in metadata.items() if k not in META_KEYS}
    return LoRA(table.layers, user_meta, family=fam, source_format="diffusers"), unused


def _peft_config(paths_layers: list[tuple[str, object]]) -> dict:
    """A LoraConfig dict: the most common rank/alpha plus patterns for the layers that differ."""
    ranks = Counter(layer.rank for _, layer in paths_layers)
    r = ranks.most_common(1)[0][0]
    alphas = Counter(layer.alpha if layer.alpha is not None else layer.rank for _, layer in paths_layers)
    alpha = alphas.most_common(1)[0][0]
    # PEFT matches a pattern as a dotted suffix, first entry first: FLUX.1's top-level ``proj_out`` would also
    # match ``single_transformer_blocks.N.proj_out``. A name that ends another is anchored (``^proj_out``).
    paths = [p for p, _ in paths_layers]
    tails = {p.split(".", i)[i] for p in paths for i in range(1, p.count(".") + 1)}  # every proper dotted suffix
    pattern = {p: "^" + p if p in tails else p for p in paths}
    rank_pattern = {pattern[p]: layer.rank for p, layer in paths_layers if layer.rank != r}
    alpha_pattern = {
        pattern[p]: (layer.alpha if layer.alpha is not None else layer.rank)
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
    """(diffusers component, module path) of a canonical key."""
    part, path = names.split_canonical(key)
    fam = families.get(family) if family is not None else None
    if part == "unet":
        return (fam.diffusers_component if fam else "unet"), names.unet_path(key, family, "diffusers")
    te = names.text_encoder(part, family)
    if te is None:
        raise LoraFormatError(f"model part '{part}' has no diffusers component", key=key, hint="pass family=")
    return te.diffusers, path


def component_of(key: str, family: str | None) -> str:
    """The diffusers component (``unet``, ``transformer``, ``text_encoder`` …) a canonical key belongs to."""
    return _model_path(key, family)[0]


def diffusers_layers(lora: LoRA) -> LoRA:
    """The LoRA as diffusers models hold it: fused weights split into their parts, swapped halves swapped."""
    lora = fused.split(lora)
    fam = families.get(lora.family) if lora.family is not None else None
    if fam is None or not fam.swap_halves:
        return lora
    return lora.map_layers(lambda k, layer: fused.swap_output_halves(layer, key=k)
                           if k.removeprefix("unet.") in fam.swap_halves else layer)


def write(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    lora = diffusers_layers(lora)
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
    alphas = peft_alphas(config, file=file, key=PEFT_CONFIG)
    component = metadata.get("lora_ops.component") or ""
    modules, unused = group_by_module(tensors, PEFT_SUFFIXES, prefix=PEFT_PREFIX, file=file)
    if not component:
        is_te = any(m.startswith(("text_model.", "encoder.layers.")) for m in modules)
        component = "text_encoder" if is_te else "unet"
    if component not in COMPONENTS:
        raise LoraFormatError(f"unknown component '{component}' in metadata 'lora_ops.component'", file=file)
    denoiser = COMPONENTS[component] == "unet"
    fam = names.guess_family(list(modules) if denoiser else [], [COMPONENTS[component]], family, file=file,
                             metadata=metadata)
    table = LayerTable(tensors, file=file)
    for module, roles in modules.items():
        _add_layer(table, component, module, fam, module, roles, alphas.layer_alpha(module, roles, tensors))
    user_meta = {k: v for k, v in metadata.items() if k not in (PEFT_CONFIG, "lora_ops.component", "format")}
    return LoRA(table.layers, user_meta, family=fam, source_format="peft"), unused


def write_peft(lora: LoRA, *, component: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One model's layers with ``base_model.model.`` keys (PEFT's own naming); ``component`` picks the model."""
    lora = diffusers_layers(lora)
    comps = {_model_path(k, lora.family)[0] for k in lora.layers}
    if component is None:
        if len(comps) > 1:
            raise LoraFormatError(
                f"a PEFT file holds one model, this LoRA has {sorted(comps)}",
                hint="pick one with component=…, or write diffusers format",
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
