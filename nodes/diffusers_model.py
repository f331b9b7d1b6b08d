"""A diffusers pipeline as an immutable MODEL value, so that the Apply / Merge nodes run in CI without ComfyUI.

ComfyUI's MODEL is a ModelPatcher: a clone that shares the weights and carries its own patch list. `DiffusersModel`
is the same idea over a diffusers SD 1.x / SDXL pipeline: the pipeline (shared, never modified) plus the LoRAs to
apply as a tuple of (LoRA, strength_model, strength_text). Adding LoRAs returns a new value; the pipeline only
holds them while `activated()` is entered (forward hooks via `lora_ops.hosts.DiffusersHost`, removed on exit), so
any number of values can share one pipeline, one at a time. The pipeline holds the text encoders too, so for the
nodes one value stands for both MODEL and CLIP.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..lora_ops.coverage import CoverageReport, combine_reports
from ..lora_ops.errors import LoraValueError
from ..lora_ops.hosts import ApplyItem, DiffusersHost
from ..lora_ops.lora import LoRA

log = logging.getLogger(__name__)

_active: set[int] = set()  # id() of pipelines with a value activated on them right now


@dataclass(frozen=True, eq=False)
class DiffusersModel:
    """A diffusers pipeline plus the LoRAs applied to it, as a value: nothing here mutates ``pipe`` or ``items``.

    ``family`` is detected from the UNet on first use when not given. ``report`` is the coverage of the LoRAs the
    last `with_loras` call added (None on a base value). eq=False: values compare by identity (LoRAs hold tensors).
    """

    pipe: Any
    items: tuple[ApplyItem, ...] = ()
    family: str | None = None
    report: CoverageReport | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", tuple((lora, float(sm), float(st)) for lora, sm, st in self.items))
        if self.family is None:
            object.__setattr__(self, "family", DiffusersHost(self.pipe).family)

    def _host(self) -> DiffusersHost:
        return DiffusersHost(self.pipe, self.family)

    def check(self, items: Sequence[ApplyItem]) -> CoverageReport:
        """The coverage of ``items`` on this pipeline; raises (like the host would) on a wrong-family LoRA."""
        return combine_reports(self._host().check(items))

    def with_loras(self, items: Sequence[ApplyItem]) -> DiffusersModel:
        """A new value with ``items`` added after this one's; checked now so that a refusal surfaces at once."""
        report = self.check(items)
        return replace(self, items=self.items + tuple(items), report=report)

    def with_lora(self, lora: LoRA, strength_model: float = 1.0, strength_text: float = 1.0) -> DiffusersModel:
        return self.with_loras([(lora, strength_model, strength_text)])

    def same_pipeline_state(self, other: object) -> bool:
        """Whether ``other`` is this pipeline with the same LoRAs (identity of each LoRA, equal strengths)."""
        return (
            isinstance(other, DiffusersModel)
            and other.pipe is self.pipe
            and len(other.items) == len(self.items)
            and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(self.items, other.items))
        )

    @contextlib.contextmanager
    def activated(self) -> Iterator[Any]:
        """Yield the pipeline with this value's LoRAs installed (forward hooks); they are removed on exit.

        One value at a time per pipeline: activating a second value on the same pipeline inside the first raises.
        """
        if id(self.pipe) in _active:
            raise LoraValueError("this pipeline is already activated by another value", hint="leave that block first")
        host = self._host()
        _active.add(id(self.pipe))
        try:
            if self.items:
                host.apply(self.items)
            yield self.pipe
        finally:
            host.remove()
            _active.discard(id(self.pipe))

    def merge_and_unload(self) -> DiffusersModel:
        """A new value over a deep copy of the pipeline with every LoRA fused into its weights and no adapters.

        Memory: a full second copy of the pipeline (fine for the tiny test pipelines; for real models use
        `lora_ops.hosts.DiffusersHost.merge_and_unload` on a pipeline you own). The input value is untouched.
        """
        if not self.items:
            log.info("merge_and_unload: no LoRA to fuse")
            return self
        pipe = copy.deepcopy(self.pipe)
        host = DiffusersHost(pipe, self.family)
        host.apply(self.items)
        host.merge_and_unload()
        return DiffusersModel(pipe, (), self.family)
