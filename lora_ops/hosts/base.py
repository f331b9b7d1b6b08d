"""The small interface every host implements, plus the host-agnostic pieces they share.

A host is the model a LoRA is applied to: a diffusers pipeline here, ComfyUI's MODEL/CLIP in ``nodes/`` later.
Operations see only canonical keys, weight shapes and LoRA values, so the interface carries no diffusers or
ComfyUI types. The shared pieces (checking the items before touching anything, the fp32 merge with its NaN/Inf
refusal) live here so that every host refuses the same things with the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from ..coverage import CoverageReport, check_coverage
from ..errors import LoraValueError
from ..lora import Layer, LoRA, LoRALayer, is_text_encoder_key

Shape = tuple[int, ...]
# (LoRA, strength_model, strength_text): text-encoder layers use strength_text, the rest strength_model.
ApplyItem = tuple[LoRA, float, float]


@runtime_checkable
class LoraHost(Protocol):
    """A model that LoRAs can be applied to (non-destructively), merged into (reversibly) and removed from."""

    family: str

    def targets(self) -> dict[str, Shape]:
        """Canonical key → weight shape of every layer a LoRA may patch."""
        ...

    def apply(self, items: Sequence[ApplyItem]) -> CoverageReport:
        """Add the LoRAs without touching any weight; several calls stack. All items are checked before any is
        applied, so a refused item leaves the model as it was."""
        ...

    def remove(self) -> None:
        """Drop every applied LoRA (unmerging first if merged): the model is the base model again."""
        ...

    def merge(self) -> None:
        """Fuse the applied LoRAs into the weights (fp32 add, cast back), keeping backups for `unmerge`; refuses
        with nothing changed if any weight would become NaN/Inf."""
        ...

    def unmerge(self) -> None:
        """Restore every merged weight bit-for-bit; the LoRAs stay applied."""
        ...

    def merge_and_unload(self) -> None:
        """Fuse, then drop the adapters and backups: plain weights, zero inference overhead, no way back."""
        ...


def strength_for(key: str, strength_model: float, strength_text: float) -> float:
    """Which of the two strengths a canonical key gets."""
    return strength_text if is_text_encoder_key(key) else strength_model


def is_item(item: object) -> bool:
    """Whether ``item`` has the (LoRA, strength_model, strength_text) shape (`check_items` says what is wrong)."""
    return isinstance(item, tuple | list) and len(item) == 3 and isinstance(item[0], LoRA)


def check_items(
    items: Sequence[ApplyItem],
    targets: Mapping[str, Shape],
    *,
    family: str | None,
    min_fraction: float = 0.5,
    allow_dora: bool = False,
) -> list[CoverageReport]:
    """Validate every (LoRA, strength_model, strength_text) before a host changes anything; one report each."""
    if not items:
        raise LoraValueError("no LoRA to apply", hint="pass a list of (lora, strength_model, strength_text)")
    reports = []
    for i, item in enumerate(items):
        if len(item) != 3 or not isinstance(item[0], LoRA):
            raise LoraValueError(f"item {i} is not (LoRA, strength_model, strength_text)")
        lora, sm, st = item
        if not (math.isfinite(sm) and math.isfinite(st)):
            raise LoraValueError(f"item {i}: strengths must be finite, got {sm} and {st}")
        report = check_coverage(lora, targets, model_family=family, min_fraction=min_fraction)
        dora = [
            k for k in report.matched if isinstance(lora.layers[k], LoRALayer) and lora.layers[k].dora_scale is not None
        ]
        if dora and not allow_dora:
            raise LoraValueError(
                "DoRA not supported by this host yet", key=dora[0], hint=f"{len(dora)} DoRA layers in LoRA {i + 1}"
            )
        reports.append(report)
    return reports


def fit_delta(delta: torch.Tensor, shape: Shape) -> torch.Tensor:
    """ΔW in the weight's shape (a LyCORIS 2-D ΔW on a conv, a linear LoRA on a 1×1 conv); coverage checked it fits."""
    return delta if tuple(delta.shape) == tuple(shape) else delta.reshape(shape)


def layer_delta(layer: Layer, device: torch.device | str) -> torch.Tensor:
    """The layer's full ΔW in fp32 on ``device`` (factors moved first, so a GPU does the product)."""
    moved = layer.with_tensors({n: t.to(device=device, dtype=torch.float32) for n, t in layer.tensors().items()})
    return moved.delta(torch.float32)


def merged_weight(weight: torch.Tensor, terms: Sequence[tuple[Layer, float]]) -> torch.Tensor:
    """cast(W.float() + Σ s·ΔW) in the weight's dtype, computed in fp32; ``weight`` itself is not touched."""
    acc = weight.detach().to(torch.float32, copy=True)
    for layer, strength in terms:
        acc += strength * fit_delta(layer_delta(layer, weight.device), acc.shape)
    return acc.to(weight.dtype)


def refuse_non_finite(results: Mapping[str, torch.Tensor]) -> None:
    """Raise (naming the layers) if any merged weight holds NaN/Inf: a merge must never poison the model."""
    bad = [key for key, tensor in results.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise LoraValueError(
            f"merging would put NaN/Inf into {len(bad)} weights; nothing was changed",
            key=bad[0],
            hint="the LoRA holds NaN/Inf or is too strong for the weight's dtype",
        )
