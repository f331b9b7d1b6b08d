"""What a model family declares, as data: names, fused weights, text encoders, detection evidence, blocks.

A family module (`sd1`, `sdxl`, `flux1` …) builds one `Family`; `lora_ops.families` registers it. Everything
else in LoRA Ops asks the registry instead of knowing a family: readers and writers translate names through
``original_path`` / ``from_diffusers`` / ``to_diffusers``, `lora_ops.fused` splits and fuses layers on the fused
weights declared in ``fused``, and detection counts the module paths each family ``knows``.

Canonical keys (see `lora_ops.lora`): ``unet.<original module path>`` for the denoiser — the single-file /
ComfyUI-internal names (LDM paths for SD UNets, BFL names for FLUX.1) — and ``te1.`` / ``te2.`` / ``te3.`` +
the text encoder's transformers path. A layer that updates only rows of a fused weight is keyed
``unet.<module>[<part>]`` (``unet.single_blocks.0.linear1[mlp]``); the part's rows come from the family's
`FusedWeight`, sized from the tensors, never from hard-coded widths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..errors import LoraFormatError


@dataclass(frozen=True)
class Part:
    """One named row block of a fused weight; ``size`` is relative (in units of the fused weight's unit)."""

    name: str
    size: int = 1


@dataclass(frozen=True)
class FusedWeight:
    """A weight whose rows stack several logical projections (FLUX.1 ``img_attn.qkv`` = [q; k; v]).

    ``pattern`` matches canonical module paths (without ``unet.``). Part sizes are multiples of one unit, which
    is read from the tensors: the fused weight's rows / Σ sizes, or a part layer's rows / its size. FLUX.1's
    ``linear1`` is [q; k; v; mlp] with sizes (1, 1, 1, 4): the unit is the hidden width whatever it is.
    """

    pattern: str
    parts: tuple[Part, ...]

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None

    @property
    def total(self) -> int:
        return sum(p.size for p in self.parts)

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise LoraFormatError(f"fused weight has no part '{name}'",
                              hint="parts: " + ", ".join(p.name for p in self.parts))

    def rows(self, name: str, unit: int) -> tuple[int, int]:
        """``(start, length)`` of part ``name`` when the unit is ``unit`` rows."""
        start = 0
        for p in self.parts:
            if p.name == name:
                return start * unit, p.size * unit
            start += p.size
        self.part(name)  # raises with the list of parts
        raise AssertionError("unreachable")

    def unit_of_part(self, name: str, part_rows: int, *, key: str | None = None) -> int:
        size = self.part(name).size
        if part_rows % size:
            raise LoraFormatError(f"part '{name}' has {part_rows} rows, not a multiple of its relative size {size}",
                                  key=key)
        return part_rows // size

    def unit_of_weight(self, rows: int, *, key: str | None = None) -> int:
        if rows % self.total:
            raise LoraFormatError(f"fused weight has {rows} rows, which do not split into parts "
                                  + "/".join(f"{p.name}×{p.size}" for p in self.parts), key=key)
        return rows // self.total


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family and how each format prefixes its LoRA modules.

    ``part`` is the canonical key part (te1 = CLIP-L or the SD 2.x OpenCLIP, te2 = CLIP-G, te3 = T5-XXL).
    ``kind`` "clip" paths are rooted at ``text_model.``; "t5" paths at ``encoder.``. ``kohya`` lists the kohya
    prefixes read (the first is written); ``comfyui`` is the ``text_encoders.<name>.transformer.`` prefix.
    """

    part: str
    kind: str
    kohya: tuple[str, ...]
    comfyui: str
    diffusers: str


@dataclass(frozen=True)
class Family:
    """A model family: everything LoRA Ops needs to know about it, in one value.

    Callables translate denoiser module paths (no ``unet.`` prefix, no ``.weight``); each raises
    `LoraFormatError` for a path the family's model does not have:

    - ``original_path(path)``: a path in the original spelling → the canonical path (checked);
    - ``from_diffusers(path)``: a diffusers path → (canonical path, part or None);
    - ``to_diffusers(path, part)``: the inverse;
    - ``is_diffusers_path(path)``: whether a path is spelled the diffusers way (cheap, by its root);
    - ``knows(path)``: whether the family's model has the module (either spelling) — detection evidence;
    - ``block_of(path)``: the block a canonical path belongs to (``"double_blocks.3"``), None outside blocks.

    ``swap_halves``: canonical paths whose output rows are stored as two swapped halves in diffusers (FLUX.1's
    final ``adaLN_modulation.1``: BFL (shift, scale), diffusers (scale, shift)); converters swap ``up``'s rows.
    ``kohya_style``: "original" or "diffusers", the denoiser spelling kohya-format writers use.
    """

    id: str
    label: str
    diffusers_component: str
    text_encoders: tuple[TextEncoder, ...]
    original_path: Callable[[str], str]
    from_diffusers: Callable[[str], tuple[str, str | None]]
    to_diffusers: Callable[[str, str | None], str]
    is_diffusers_path: Callable[[str], bool]
    knows: Callable[[str], bool]
    block_of: Callable[[str], str | None]
    fused: tuple[FusedWeight, ...] = ()
    swap_halves: frozenset[str] = frozenset()
    kohya_style: str = "original"
    compound_tokens: tuple[str, ...] = ()
    tiny_config: Mapping[str, object] = field(default_factory=dict)
    ss_base_model_version: str = ""  # kohya's ss_base_model_version value for LoRAs trained on this family
    modelspec_architecture: str = ""  # SAI model spec "modelspec.architecture" of a LoRA for this family
    unet_layout: object | None = None  # SD-style UNets: the `UnetLayout` their name maps derive from

    def fused_weight(self, path: str) -> FusedWeight | None:
        """The fused-weight declaration of a canonical denoiser path, None for ordinary weights."""
        return next((f for f in self.fused if f.matches(path)), None)

    def text_encoder(self, part: str) -> TextEncoder | None:
        return next((te for te in self.text_encoders if te.part == part), None)

    def denoiser_path(self, path: str) -> tuple[str, str | None]:
        """A denoiser path in either spelling → (canonical path, part or None), checked against the model."""
        if self.is_diffusers_path(path):
            return self.from_diffusers(path)
        return self.original_path(path), None
