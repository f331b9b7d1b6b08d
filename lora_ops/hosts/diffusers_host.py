"""A diffusers Stable Diffusion / SDXL pipeline as a LoRA host: apply with forward hooks, merge reversibly.

Applying adds ``s·up(down(x))`` to the output of each targeted Linear/Conv2d through a forward hook, from the
factors (never the d×k ΔW of a classic LoRA layer); the weights are not touched, and removing the hooks restores
the model. Merging writes cast(W.float() + Σ s·ΔW) into the weights after checking every result is finite, with a
CPU backup of each original weight so that `unmerge` restores it bit-for-bit. Hooks rather than PEFT injection keep
the module tree (and therefore every canonical key and state-dict name) unchanged while a LoRA is applied.

DoRA layers are refused: their output depends on the norm of the patched weight, which the hooks do not model yet.
diffusers itself is not imported: the pipeline is duck-typed (``unet``, ``text_encoder``, ``text_encoder_2``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import keymap
from ..coverage import CoverageReport, combine_reports
from ..errors import LoraValueError
from ..lora import Layer, LoRALayer
from .base import ApplyItem, Shape, check_items, fit_delta, layer_delta, merged_weight, refuse_non_finite, strength_for

log = logging.getLogger(__name__)

TEXT_ENCODERS = (("te1", "text_encoder"), ("te2", "text_encoder_2"))


@dataclass(eq=False)
class _Term:
    """One LoRA layer on one module at one strength, with its factors cached in the module's dtype/device."""

    layer: Layer
    strength: float
    merged: bool = False
    kind: str = ""  # "linear" | "conv" | "tucker" | "dense"
    tensors: tuple[torch.Tensor, ...] = ()
    scale: float = 1.0

    def prepare(self, module: nn.Module) -> None:
        """Shape the factors for ``module`` and move them to its weight's device and dtype (once)."""
        weight = module.weight
        kind, tensors, scale = _factors(self.layer, module)
        self.kind, self.scale = kind, scale * self.strength
        self.tensors = tuple(t.detach().to(device=weight.device, dtype=weight.dtype) for t in tensors)

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


def _factors(layer: Layer, module: nn.Module) -> tuple[str, tuple[torch.Tensor, ...], float]:
    """(kind, tensors, scale) to compute ``layer``'s output on ``module``: factors when possible, else dense ΔW."""
    shape = tuple(module.weight.shape)
    is_conv = isinstance(module, nn.Conv2d)
    plain_conv = is_conv and module.groups == 1 and module.padding_mode == "zeros"
    if isinstance(layer, LoRALayer) and layer.mid is None and not is_conv:
        return "linear", (layer.down.flatten(1), layer.up.flatten(1)), layer.scale  # (r, in), (out, r)
    if isinstance(layer, LoRALayer) and plain_conv:
        r = layer.rank
        up = layer.up.reshape(shape[0], r, 1, 1)  # (out, r, 1, 1)
        if layer.mid is not None:
            down = layer.down.reshape(r, shape[1], 1, 1)  # (r, in, 1, 1)
            return "tucker", (down, layer.mid, up), layer.scale
        return "conv", (layer.down.reshape(r, *shape[1:]), up), layer.scale  # (r, in, kh, kw)
    dense = fit_delta(layer_delta(layer, module.weight.device), shape)  # LoHa/LoKr: ΔW is what they are
    return "dense", (dense,), 1.0


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
    """A `StableDiffusionPipeline` / `StableDiffusionXLPipeline` (UNet + text encoders) behind `LoraHost`."""

    def __init__(self, pipe: Any, family: str | None = None, *, min_fraction: float = 0.5) -> None:
        self.pipe = pipe
        self.min_fraction = min_fraction
        models = [("unet", pipe.unet)] + [(p, getattr(pipe, a, None)) for p, a in TEXT_ENCODERS]
        for _, model in models:
            if model is not None and any(hasattr(m, "base_layer") for m in model.modules()):
                raise LoraValueError(
                    "the pipeline already holds diffusers/PEFT LoRA layers",
                    hint="call pipe.unload_lora_weights() first, or start from a fresh pipeline",
                )
        self.family = _family(pipe.unet, family)
        self._modules: dict[str, nn.Module] = {}
        for key, path in keymap.unet_canonical_keys(pipe.unet, self.family).items():
            self._modules[key] = pipe.unet.get_submodule(path)
        for prefix, attr in TEXT_ENCODERS:
            te = getattr(pipe, attr, None)
            if te is not None:
                self._modules.update({k: te.get_submodule(p) for k, p in keymap.te_canonical_keys(te, prefix).items()})
        self._slots: dict[str, _Slot] = {}
        self.reports: list[CoverageReport] = []

    def targets(self) -> dict[str, Shape]:
        return {key: tuple(module.weight.shape) for key, module in self._modules.items()}

    def module(self, key: str) -> nn.Module:
        """The Linear/Conv2d behind a canonical key (for inspection; patch it through the host, not directly)."""
        return self._modules[key]

    @property
    def is_merged(self) -> bool:
        return any(slot.backup is not None for slot in self._slots.values())

    def apply(self, items: Sequence[ApplyItem]) -> CoverageReport:
        reports = check_items(items, self.targets(), family=self.family, min_fraction=self.min_fraction)
        new: list[tuple[str, _Term]] = []
        for (lora, sm, st), report in zip(items, reports):
            for key in report.matched:
                strength = strength_for(key, sm, st)
                if strength != 0:
                    term = _Term(lora.layers[key], float(strength))
                    term.prepare(self._modules[key])
                    new.append((key, term))
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
        results = {
            k: merged_weight(self._slots[k].module.weight, [(t.layer, t.strength) for t in terms])
            for k, terms in pending.items()
        }
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


def _family(unet: nn.Module, given: str | None) -> str:
    """The UNet's family from its module names; a given family is checked against them when they tell."""
    if given is not None:
        keymap.unet_layout(given)  # unknown families raise here, listing the known ones
    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    detected = keymap.detect_unet_family(names)
    if given is not None and detected is not None and given != detected:
        raise LoraValueError(f"family='{given}' was given, but the UNet's layout is '{detected}'")
    if given is None and detected is None:
        raise LoraValueError("cannot tell the UNet family from its module names", hint="pass family='sd1' or 'sdxl'")
    return given or detected
