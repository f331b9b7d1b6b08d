"""A diffusers pipeline (SD UNet, FLUX.1 / Z-Image transformer) as a LoRA host: apply with hooks, merge reversibly.

Applying adds ``s·up(down(x))`` to the output of each targeted Linear/Conv2d through a forward hook, from the
factors (never the d×k ΔW of a classic LoRA layer); the weights are not touched, and removing the hooks restores
the model. Merging writes cast(W.float() + Σ s·ΔW) into the weights after checking every result is finite, with a
CPU backup of each original weight so that `unmerge` restores it bit-for-bit. Hooks rather than PEFT injection keep
the module tree (and therefore every canonical key and state-dict name) unchanged while a LoRA is applied.

The denoiser's family comes from its module names (`lora_ops.families.detect`). Its modules are keyed by
`lora_ops.keymap.model_keys.denoiser_canonical_keys`: a module holding part of a fused original weight (FLUX.1's
``to_q`` = rows of ``double_blocks.N.img_attn.qkv``) has a part key, and `targets` lists the whole weights (a fused
one with the rows of all its parts; Z-Image's ``to_q``/``to_k``/``to_v`` are the parts of ``layers.N.attention.qkv``,
and the names its two spellings share, ``feed_forward.w1`` …, are whole keys). Each LoRA is first brought into the
model's layout (`lora_ops.formats.diffusers.diffusers_layers`: layers on fused weights split into their parts,
exactly, and the final modulation's output halves swapped), so every layer lands on one module. A layer that cannot
be split or swapped as factors (a LyCORIS LoHa/LoKr on a fused weight) is applied as the rows of its ΔW instead.

A LoRA whose denoiser layers are for another family (a FLUX.1 LoRA on an SD UNet, or the reverse) is refused,
naming both. DoRA layers are refused: their output depends on the norm of the patched weight, which the hooks do
not model yet. diffusers itself is not imported: the pipeline is duck-typed (``unet`` or ``transformer``, plus the
family's text encoders ``text_encoder`` / ``text_encoder_2``); a bare denoiser model is accepted too.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import families, fused
from ..coverage import CoverageReport, combine_reports, family_label, with_article
from ..errors import LoraFormatError, LoraValueError
from ..formats.diffusers import diffusers_layers
from ..keymap import unet_layout
from ..keymap.model_keys import denoiser_canonical_keys, denoiser_family, te_canonical_keys
from ..lora import Layer, LoRA, LoRALayer, part_of
from .base import ApplyItem, Shape, check_items, fit_delta, is_item, layer_delta, refuse_non_finite, strength_for

log = logging.getLogger(__name__)

Spans = tuple[tuple[int, int], ...]
"""Row ranges (start, stop) of a layer's ΔW that, stacked in order, make the ΔW of the module it patches."""


def _rows(t: torch.Tensor, spans: Spans | None) -> torch.Tensor:
    return t if spans is None else torch.cat([t[a:b] for a, b in spans])


@dataclass(eq=False)
class _Term:
    """One LoRA layer on one module at one strength, with its factors cached in the module's dtype/device.

    ``spans`` None: the layer's ΔW is the module's. Else the module gets those rows of it (a part of a fused
    weight, or swapped halves), for layers the conversion to the model's layout could not split as factors.
    """

    layer: Layer
    strength: float
    spans: Spans | None = None
    merged: bool = False
    kind: str = ""  # "linear" | "conv" | "tucker" | "dense"
    tensors: tuple[torch.Tensor, ...] = ()
    scale: float = 1.0

    def prepare(self, module: nn.Module) -> None:
        """Shape the factors for ``module`` and move them to its weight's device and dtype (once)."""
        weight = module.weight
        kind, tensors, scale = _factors(self.layer, module, self.spans)
        self.kind, self.scale = kind, scale * self.strength
        self.tensors = tuple(t.detach().to(device=weight.device, dtype=weight.dtype) for t in tensors)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 ΔW (strength not included) this term adds to ``weight``, in its shape."""
        return fit_delta(_rows(layer_delta(self.layer, weight.device), self.spans), tuple(weight.shape))

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.tensors[0].device != x.device:  # the pipeline moved since apply: re-cache once
            self.prepare(module)
        x = x.to(self.tensors[0].dtype)
        t = self.tensors
        if self.kind == "linear":
            y = F.linear(F.linear(x, t[0]), t[1])  # (…, r) → (…, out)
        elif self.kind == "conv":
            y = F.conv2d(F.conv2d(x, t[0], None, module.stride, module.padding, module.dilation), t[1])
        elif self.kind == "tucker":
            h = F.conv2d(x, t[0])  # 1×1: (B, r, H, W)
            h = F.conv2d(h, t[1], None, module.stride, module.padding, module.dilation)
            y = F.conv2d(h, t[2])  # 1×1: (B, out, H', W')
        elif isinstance(module, nn.Linear):
            y = F.linear(x, t[0])
        else:
            y = module._conv_forward(x, t[0], None)  # the module's own stride/padding/groups/padding_mode
        return y * self.scale


def _factors(layer: Layer, module: nn.Module, spans: Spans | None) -> tuple[str, tuple[torch.Tensor, ...], float]:
    """(kind, tensors, scale) to compute ``layer``'s output on ``module``: factors when possible, else dense ΔW."""
    shape = tuple(module.weight.shape)
    is_conv = isinstance(module, nn.Conv2d)
    plain_conv = is_conv and module.groups == 1 and module.padding_mode == "zeros"
    if isinstance(layer, LoRALayer) and layer.mid is None and not is_conv:
        up = _rows(layer.up.flatten(1), spans)  # rows of ΔW = rows of up: still exact as factors
        return "linear", (layer.down.flatten(1), up), layer.scale  # (r, in), (out, r)
    if isinstance(layer, LoRALayer) and plain_conv and spans is None:
        r = layer.rank
        up = layer.up.reshape(shape[0], r, 1, 1)  # (out, r, 1, 1)
        if layer.mid is not None:
            down = layer.down.reshape(r, shape[1], 1, 1)  # (r, in, 1, 1)
            return "tucker", (down, layer.mid, up), layer.scale
        return "conv", (layer.down.reshape(r, *shape[1:]), up), layer.scale  # (r, in, kh, kw)
    # LoHa/LoKr: ΔW is what they are (and its rows, on part of a fused weight)
    dense = fit_delta(_rows(layer_delta(layer, module.weight.device), spans), shape)
    return "dense", (dense,), 1.0


def _merged_weight(weight: torch.Tensor, terms: Sequence[_Term]) -> torch.Tensor:
    """cast(W.float() + Σ s·ΔW) in the weight's dtype, computed in fp32 (as `base.merged_weight`, rows included)."""
    acc = weight.detach().to(torch.float32, copy=True)
    for term in terms:
        acc += term.strength * term.delta(weight)
    return acc.to(weight.dtype)


@dataclass(eq=False)
class _Slot:
    """A patched module: its terms, its hook and, while merged, the backup of its original weight."""

    module: nn.Module
    terms: list[_Term] = field(default_factory=list)
    handle: Any = None
    backup: torch.Tensor | None = None


def _hook(slot: _Slot, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
    active = [t for t in slot.terms if not t.merged]
    if not active:
        return None
    x = args[0] if args else kwargs["input"]
    for term in active:
        output = output + term(module, x).to(output.dtype)
    return output


class DiffusersHost:
    """A diffusers pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``FluxPipeline``,
    ``ZImagePipeline`` …) or a bare denoiser (``UNet2DConditionModel``, ``FluxTransformer2DModel``,
    ``ZImageTransformer2DModel``) behind `LoraHost`.

    ``family`` None detects it from the denoiser's module names; a given family is checked against them.
    """

    def __init__(self, pipe: Any, family: str | None = None, *, min_fraction: float = 0.5) -> None:
        self.pipe = pipe
        self.min_fraction = min_fraction
        denoiser = _denoiser(pipe)
        self.denoiser = denoiser
        for model in [denoiser, *_candidate_encoders(pipe, denoiser)]:
            if any(hasattr(m, "base_layer") for m in model.modules()):
                raise LoraValueError(
                    "the pipeline already holds diffusers/PEFT LoRA layers",
                    hint="call pipe.unload_lora_weights() first, or start from a fresh pipeline",
                )
        self.family = _family(denoiser, family)
        fam = families.get(self.family)
        self._modules: dict[str, nn.Module] = {
            key: denoiser.get_submodule(path) for key, path in denoiser_canonical_keys(denoiser, self.family).items()
        }
        if pipe is not denoiser:
            for te in fam.text_encoders:
                model = getattr(pipe, te.diffusers, None)
                if isinstance(model, nn.Module):
                    keys = te_canonical_keys(model, te.part, te.kind)
                    self._modules.update({k: model.get_submodule(p) for k, p in keys.items()})
        self._targets = _whole_targets(self._modules, fam)
        self._slots: dict[str, _Slot] = {}
        self.reports: list[CoverageReport] = []

    def targets(self) -> dict[str, Shape]:
        """Canonical WHOLE-weight key → shape; a fused weight the model holds as parts has all their rows."""
        return dict(self._targets)

    def module(self, key: str) -> nn.Module:
        """The Linear/Conv2d behind a canonical key (a part key for a module holding part of a fused weight)."""
        return self._modules[key]

    def module_keys(self) -> tuple[str, ...]:
        """The canonical key of every module a LoRA may patch (part keys for the parts of fused weights)."""
        return tuple(self._modules)

    @property
    def is_merged(self) -> bool:
        return any(slot.backup is not None for slot in self._slots.values())

    def model_layout(self, lora: LoRA) -> LoRA:
        """``lora`` as this model holds its weights: fused layers split into parts, swapped halves swapped.

        A layer that cannot be converted as factors (LyCORIS on a fused/swapped weight, DoRA) is kept as it is,
        under its whole key; `apply` then places the rows of its ΔW (DoRA is refused there). A LoRA without a
        family is read as this model's family when the model has fused weights (a wrong-family LoRA is refused
        before: `check`).
        """
        return self._layout(lora)[0]

    def _layout(self, lora: LoRA) -> tuple[LoRA, frozenset[str]]:
        """(`model_layout`, the keys of the layers kept unconverted)."""
        fam = families.get(self.family)
        if not (fam.fused or fam.swap_halves) or not any(part_of(k) == "unet" for k in lora.layers):
            return lora, frozenset()  # nothing to convert (SD UNets hold every weight as the original does)
        if lora.family is None:
            lora = lora.replace(family=self.family)
        if lora.family != self.family:
            return lora, frozenset()
        layers: dict[str, Layer] = {}
        kept: set[str] = set()
        for key, layer in lora.layers.items():
            if not self._held_differently(key):
                layers[key] = layer
                continue
            try:  # each layer converted once; one that cannot be is kept whole (its ΔW rows are placed)
                parts = diffusers_layers(lora.replace(layers={key: layer})).layers
            except LoraFormatError:
                layers[key] = layer
                kept.add(key)
                continue
            clash = next((k for k in parts if k != key and k in lora.layers), None)
            if clash is not None:
                raise LoraFormatError(f"holds both the fused layer and its part '{clash}'", key=key,
                                      hint="fuse the LoRA first")
            layers.update(parts)
        return lora.replace(layers=layers), frozenset(kept)

    def check(self, items: Sequence[ApplyItem]) -> list[CoverageReport]:
        """Validate ``items`` as `apply` does (family, layout, coverage, DoRA) without changing anything."""
        return self._checked(items)[2]

    def apply(self, items: Sequence[ApplyItem]) -> CoverageReport:
        converted, kept, reports = self._checked(items)
        new: list[tuple[str, _Term]] = []
        for (lora, sm, st), whole, report in zip(converted, kept, reports):
            for key in report.matched:
                strength = strength_for(key, sm, st)
                if strength == 0:
                    continue
                layer = lora.layers[key]
                for module_key, spans in self._placements(key, layer, key in whole):
                    term = _Term(layer, float(strength), spans)
                    term.prepare(self._modules[module_key])
                    new.append((module_key, term))
        for key, term in new:  # everything prepared: now install (nothing above changed the model)
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(self._modules[key])
                slot.handle = slot.module.register_forward_hook(functools.partial(_hook, slot), with_kwargs=True)
            slot.terms.append(term)
        report = combine_reports(reports)
        self.reports.append(report)
        log.info("applied %d LoRA(s) on %d modules: %s", len(items), len(new), report.summary())
        return report

    def merge(self) -> None:
        pending = {k: [t for t in s.terms if not t.merged] for k, s in self._slots.items()}
        pending = {k: terms for k, terms in pending.items() if terms}
        if not pending:
            log.warning("merge: no applied LoRA left to merge")
            return
        results = {k: _merged_weight(self._slots[k].module.weight, terms) for k, terms in pending.items()}
        refuse_non_finite(results)
        with torch.no_grad():
            for key, new in results.items():
                slot = self._slots[key]
                if slot.backup is None:
                    slot.backup = slot.module.weight.detach().to("cpu", copy=True)
                slot.module.weight.copy_(new)
        for terms in pending.values():
            for term in terms:
                term.merged = True

    def unmerge(self) -> None:
        merged = {k: s for k, s in self._slots.items() if s.backup is not None}
        changed = [k for k, s in merged.items() if s.backup.dtype != s.module.weight.dtype]
        if changed:
            raise LoraValueError("the model's dtype changed since the merge; cannot restore it exactly", key=changed[0])
        with torch.no_grad():
            for slot in merged.values():
                slot.module.weight.copy_(slot.backup)
                slot.backup = None
        for slot in self._slots.values():
            for term in slot.terms:
                term.merged = False

    def remove(self) -> None:
        self.unmerge()
        self._unload()

    def merge_and_unload(self) -> None:
        self.merge()
        self._unload()

    def _unload(self) -> None:
        for slot in self._slots.values():
            slot.handle.remove()
        self._slots.clear()
        self.reports.clear()

    # ------------------------------------------------------------------ checks and placement

    def _checked(
        self, items: Sequence[ApplyItem]
    ) -> tuple[list[ApplyItem], list[frozenset[str]], list[CoverageReport]]:
        """Every item's LoRA checked for its family and brought into the model's layout, then coverage-checked:
        (converted items, keys kept unconverted per item, reports)."""
        converted: list[Any] = []
        kept: list[frozenset[str]] = []
        for i, item in enumerate(items):
            whole: frozenset[str] = frozenset()
            if is_item(item):
                lora, sm, st = item
                self._check_family(lora, i)
                lora, whole = self._layout(lora)
                item = (lora, sm, st)
            converted.append(item)  # malformed items are refused by check_items, with their index
            kept.append(whole)
        reports = check_items(converted, self._targets, family=self.family, min_fraction=self.min_fraction)
        return converted, kept, reports

    def _check_family(self, lora: LoRA, index: int) -> None:
        """Refuse a LoRA whose denoiser layers are for another family (its own, or what its keys say)."""
        modules = [fused.parse_key(k)[0] for k in lora.layers if part_of(k) == "unet"]
        if not modules:
            return  # text encoders only: coverage says whether they fit
        lora_family = lora.family if lora.family is not None else families.detect(modules)
        if lora_family is None or lora_family == self.family:
            return
        raise LoraValueError(
            f"this looks like {with_article(family_label(lora_family))} LoRA, the model is {family_label(self.family)}",
            hint=f"LoRA {index + 1}: its {len(modules)} denoiser layers are for another model family",
        )

    def _held_differently(self, key: str) -> bool:
        """Whether the model holds the weight of whole key ``key`` as parts, or with its output halves swapped."""
        module, part = fused.parse_key(key)
        if part is not None or not module.startswith("unet."):
            return False
        fam = families.get(self.family)
        path = module.removeprefix("unet.")
        return fam.fused_weight(path) is not None or path in fam.swap_halves

    def _placements(self, key: str, layer: Layer, kept: bool) -> list[tuple[str, Spans | None]]:
        """(module key, rows of the layer's ΔW or None for all of it) for each module a matched layer patches.

        Converted layers land on one module each. A layer ``kept`` unconverted on a weight the model holds
        differently gets its rows placed instead: each part's rows on a fused weight's part modules, or its two
        output halves exchanged.
        """
        if not kept:
            return [(key, None)]
        fam = families.get(self.family)
        path = key.removeprefix("unet.")
        rows = int(layer.delta_shape[0])
        spec = fam.fused_weight(path)
        if spec is None:  # swapped output halves (coverage checked the row count against the weight)
            half = rows // 2
            return [(key, ((half, rows), (0, half)))]
        unit = spec.unit_of_weight(rows, key=key)
        out = []
        for p in spec.parts:
            start, length = spec.rows(p.name, unit)
            out.append((fused.part_key(key, p.name), ((start, start + length),)))
        return out


def _denoiser(pipe: Any) -> nn.Module:
    """The pipeline's denoiser (its family's diffusers component: ``unet``, ``transformer``), or ``pipe`` itself."""
    for attr in dict.fromkeys(f.diffusers_component for f in families.REGISTRY.values()):
        model = getattr(pipe, attr, None)
        if isinstance(model, nn.Module):
            return model
    if isinstance(pipe, nn.Module):
        return pipe
    raise LoraValueError(
        f"{type(pipe).__name__} is neither a diffusers pipeline nor a denoiser model",
        hint="pass a pipeline with a unet/transformer, or the UNet2DConditionModel/FluxTransformer2DModel itself",
    )


def _candidate_encoders(pipe: Any, denoiser: nn.Module) -> list[nn.Module]:
    """Every text encoder any family could use on ``pipe`` (checked for injected adapters before detection)."""
    if pipe is denoiser:
        return []
    attrs = dict.fromkeys(te.diffusers for f in families.REGISTRY.values() for te in f.text_encoders)
    return [m for a in attrs if isinstance(m := getattr(pipe, a, None), nn.Module)]


def _whole_targets(modules: dict[str, nn.Module], fam: families.Family) -> dict[str, Shape]:
    """Whole-weight key → shape; a fused weight held as part modules gets Σ their rows (all parts required)."""
    targets: dict[str, Shape] = {}
    parts: dict[str, dict[str, Shape]] = defaultdict(dict)
    for key, module in modules.items():
        name, part = fused.parse_key(key)
        shape = tuple(module.weight.shape)
        if part is None:
            targets[key] = shape
        else:
            parts[name][part] = shape
    for name, shapes in parts.items():
        spec = fam.fused_weight(name.removeprefix("unet."))  # part keys come from fused weights only
        targets[name] = fused.stacked_shape(spec, name, {p: [s] for p, s in shapes.items()}, where="the model",
                                            error=LoraValueError)
    return targets


def _family(denoiser: nn.Module, given: str | None) -> str:
    """The denoiser's family from its module names; a given family is checked against them when they tell."""
    detected = denoiser_family(denoiser)
    what = "UNet" if detected is not None and families.get(detected).unet_layout is not None else "model"
    if given is not None and given not in families.IDS:
        if what == "UNet":
            unet_layout(given)  # raises "unknown UNet family …", listing the UNet families
        families.get(given)  # raises "unknown model family …", listing every family
    if given is not None and detected is not None and given != detected:
        raise LoraValueError(
            f"family='{given}' was given, but the {what}'s layout is '{detected}' ({family_label(detected)})"
        )
    if given is None and detected is None:
        raise LoraValueError(
            f"cannot tell the model family of {type(denoiser).__name__} from its module names",
            hint=f"pass family= (known families: {', '.join(families.IDS)})",
        )
    return given or detected
