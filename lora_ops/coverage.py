"""How well a LoRA fits a model: which layers match a weight, which do not, and why — never a silent no-op.

Host-agnostic: a host describes its model as ``targets`` (canonical key → weight shape) and `check_coverage`
compares the LoRA's layers against it. Unmatched keys are grouped by part and block
(``unet.output_blocks.*: 12 layers``) so a node can show one short paragraph instead of a wall of keys. A LoRA
that mostly misses the model, or whose layers have the wrong shapes, is refused with the likely cause (most often:
a LoRA made for another model family), because applying it would silently do little or nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from . import families, fused
from .errors import LoraFormatError, LoraValueError
from .lora import LoRA, part_of

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

MAX_GROUPS_SHOWN = 4


def family_label(family: str | None) -> str:
    """The family as users know it ("SD1.x", "FLUX.1"); unknown families keep their name."""
    return families.label(family)


def with_article(label: str) -> str:
    """ "an SDXL", "an SD1.x", "a FLUX.1", "an unknown-family": capitals without a vowel are letter names
    ("ess-dee"), anything else is read as a word."""
    head = label.split(".", 1)[0].rstrip("0123456789")
    if head.isupper() and not set(head) & set("AEIOU"):
        return ("an " if head[0] in "AEFHILMNORSX" else "a ") + label
    return ("an " if label[:1].lower() in "aeiou" else "a ") + label


@dataclass(frozen=True)
class CoverageReport:
    """Which LoRA layers found a weight to patch.

    ``matched``: keys whose ΔW fits the weight. ``unmatched``: group (``unet.output_blocks.*``) → keys with no such
    weight in the model. ``mismatched``: key → (ΔW shape, weight shape) for keys found with an incompatible shape.
    ``fraction``: matched / all layers. ``items``: the per-LoRA reports when several LoRAs were applied at once.
    """

    matched: tuple[str, ...]
    unmatched: Mapping[str, tuple[str, ...]]
    mismatched: Mapping[str, tuple[Shape, Shape]]
    fraction: float
    lora_family: str | None = None
    model_family: str | None = None
    items: tuple[CoverageReport, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "unmatched", MappingProxyType(dict(self.unmatched)))
        object.__setattr__(self, "mismatched", MappingProxyType(dict(self.mismatched)))

    @property
    def total(self) -> int:
        return len(self.matched) + self.unmatched_count + len(self.mismatched)

    @property
    def unmatched_count(self) -> int:
        return sum(len(keys) for keys in self.unmatched.values())

    @property
    def unmatched_keys(self) -> tuple[str, ...]:
        return tuple(k for keys in self.unmatched.values() for k in keys)

    def summary(self) -> str:
        """One short paragraph for a node's string output or a log line."""
        if len(self.items) > 1:
            return " ".join(f"LoRA {i + 1}: {item.summary()}" for i, item in enumerate(self.items))
        text = (
            f"{len(self.matched)} of {self.total} LoRA layers matched ({self.fraction:.0%}); "
            f"{family_label(self.lora_family)} LoRA on {with_article(family_label(self.model_family))} model."
        )
        if self.unmatched:
            groups = sorted(self.unmatched.items(), key=lambda kv: (-len(kv[1]), kv[0]))
            shown = ", ".join(
                f"{g}: {len(keys)} layer{'s' * (len(keys) != 1)}" for g, keys in groups[:MAX_GROUPS_SHOWN]
            )
            more = f" and {len(groups) - MAX_GROUPS_SHOWN} more groups" if len(groups) > MAX_GROUPS_SHOWN else ""
            text += f" Not in the model: {shown}{more}."
        if self.mismatched:
            key, (dshape, wshape) = next(iter(sorted(self.mismatched.items())))
            text += (
                f" Wrong shape: {len(self.mismatched)} layer{'s' * (len(self.mismatched) != 1)}"
                f" (e.g. {key}: ΔW {dshape} vs weight {wshape})."
            )
        return text


def group_of(key: str) -> str:
    """``unet.output_blocks.3.1.…`` → ``unet.output_blocks.*``: the path up to its first block index (4 names at
    most), so that a node can list a few groups instead of every key."""
    parts = key.split(".")
    cut = next((i for i, token in enumerate(parts) if i and token.isdigit()), len(parts))
    cut = min(cut, 4)
    return ".".join(parts[:cut]) + (".*" if cut < len(parts) else "")


def shapes_fit(delta: Shape, weight: Shape) -> bool:
    """Whether a ΔW of shape ``delta`` can be added to ``weight``: equal, or the same outputs and the same numel
    with one side flat (a LyCORIS 2-D ΔW on a conv, a linear LoRA on a 1×1 conv)."""
    if tuple(delta) == tuple(weight):
        return True
    flat = len(delta) == 2 or len(weight) == 2
    return flat and delta[0] == weight[0] and math.prod(delta) == math.prod(weight)


def target_shape(key: str, family: str | None, targets: Mapping[str, Shape]) -> Shape | None:
    """The shape a layer must fit: its weight's, or for a part key (``…linear1[mlp]``) the part's rows of it.

    The part's rows come from the weight's own row count and the family's `FusedWeight` (no widths assumed);
    a weight whose rows do not split into the parts is reported as a shape mismatch by the caller.
    """
    module, part = fused.parse_key(key)
    if module not in targets:
        return None
    shape = tuple(targets[module])
    if part is None:
        return shape
    try:
        _, length = fused.part_rows(family, key, shape[0]) if shape else (0, 0)
    except LoraFormatError:
        length = 0  # cannot place it: a mismatch, named with the weight's shape
    return (length, *shape[1:])


def _lora_family(lora: LoRA) -> str | None:
    """The family the LoRA says it is for, else the one its UNet keys give away."""
    if lora.family is not None:
        return lora.family
    return families.detect(fused.parse_key(k)[0] for k in lora.layers if part_of(k) == "unet")


def _hint(report: CoverageReport, lora: LoRA, targets: Mapping[str, Shape]) -> str:
    lora_fam, model_fam = report.lora_family, report.model_family
    if lora_fam is not None and model_fam is not None and lora_fam != model_fam:
        return f"this looks like {with_article(family_label(lora_fam))} LoRA, the model is {family_label(model_fam)}"
    model_parts = sorted({part_of(k) for k in targets})
    lora_parts = sorted({part_of(k) for k in lora.layers})
    if not set(lora_parts) & set(model_parts):
        if not set(lora_parts) & {"unet", "te1", "te2", "te3"}:
            return "the keys are not canonical module names; read the file with lora_ops.files.load_lora"
        return f"the LoRA patches {', '.join(lora_parts)}, the model has {', '.join(model_parts)}"
    if report.mismatched:
        return (
            "the layer names fit but the widths do not: the LoRA was made for another model with the same layout "
            "(e.g. SD2.x vs SD1.x, or a different text encoder)"
        )
    return "most of its layers do not exist in this model: it was probably made for a different model"


def _group(keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(group_of(key), []).append(key)
    return {g: tuple(v) for g, v in groups.items()}


def check_coverage(
    lora: LoRA,
    targets: Mapping[str, Shape],
    *,
    model_family: str | None,
    min_fraction: float = 0.5,
) -> CoverageReport:
    """Compare ``lora``'s layers with the model's weights (canonical key → shape).

    Raises `LoraValueError` with the likely cause when fewer than ``min_fraction`` of the layers match, or when any
    layer has the wrong shape for its weight (adding it is impossible); a partial match is returned with a warning
    logged, so that nothing is ever dropped silently.
    """
    if not lora.layers:
        raise LoraValueError("the LoRA has no layers", hint="nothing to apply")
    matched, unmatched, mismatched = [], [], {}
    for key, layer in lora.layers.items():
        wshape = target_shape(key, lora.family, targets)
        if wshape is None:
            unmatched.append(key)
            continue
        dshape = layer.delta_shape
        if shapes_fit(dshape, wshape):
            matched.append(key)
        else:
            mismatched[key] = (dshape, wshape)
    report = CoverageReport(
        matched=tuple(matched),
        unmatched=_group(unmatched),
        mismatched=mismatched,
        fraction=len(matched) / len(lora.layers),
        lora_family=_lora_family(lora),
        model_family=model_family,
    )
    if report.fraction < min_fraction or mismatched:
        reason = (
            f"{len(mismatched)} LoRA layers have the wrong shape for the model"
            if mismatched
            else f"only {len(matched)} of {len(lora.layers)} LoRA layers match the model "
            f"({report.fraction:.1%}, at least {min_fraction:.0%} needed)"
        )
        raise LoraValueError(reason, hint=_hint(report, lora, targets))
    if unmatched:
        log.warning("partial LoRA match: %s", report.summary())
    fams = (report.lora_family, model_family)
    if None not in fams and fams[0] != fams[1]:
        log.warning("%s; its layers that fit were kept", _hint(report, lora, targets))
    return report


def combine_reports(reports: Iterable[CoverageReport]) -> CoverageReport:
    """One report for several LoRAs applied together: counts add up, ``items`` keeps each LoRA's own report."""
    reports = tuple(reports)
    if len(reports) == 1:
        return reports[0]
    unmatched: dict[str, tuple[str, ...]] = {}
    mismatched: dict[str, tuple[Shape, Shape]] = {}
    for r in reports:
        for group, keys in r.unmatched.items():
            unmatched[group] = unmatched.get(group, ()) + keys
        mismatched.update(r.mismatched)
    matched = tuple(k for r in reports for k in r.matched)
    total = sum(r.total for r in reports)
    families = {r.lora_family for r in reports}
    return CoverageReport(
        matched=matched,
        unmatched=unmatched,
        mismatched=mismatched,
        fraction=len(matched) / total if total else 1.0,
        lora_family=families.pop() if len(families) == 1 else None,
        model_family=reports[0].model_family if reports else None,
        items=reports,
    )
