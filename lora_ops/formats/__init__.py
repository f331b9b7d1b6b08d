"""The format registry: one (detect, read, write) triple per file format.

Readers turn a flat state dict into a `LoRA` in the canonical key space and return the source keys they could
not place; `read_lora` refuses a file with leftovers unless told otherwise, so no key is ever silently dropped.
Detection looks at the keys, never at the file name. Order matters: the most specific signature comes first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .. import families
from ..errors import LoraFormatError
from ..fused import parse_key
from ..lora import LoRA
from . import bare, comfyui, diffusers, kohya, xlabs
from .layers import why_unused

log = logging.getLogger(__name__)

Reader = Callable[..., tuple[LoRA, list[str]]]
Writer = Callable[..., tuple[dict[str, torch.Tensor], dict[str, str]]]


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[list[str], Mapping[str, str]], bool]
    read: Reader
    write: Writer | None
    why_unused: Callable[[list[str]], str | None] | None = None  # a format-specific reason for leftover keys


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("peft", "PEFT: base_model.model.<module>.lora_A/B", diffusers.detect_peft, diffusers.read_peft,
               diffusers.write_peft),
        Format("lycoris", "LyCORIS LoHa/LoKr (kohya names, hada_*/lokr_*), read-only", kohya.detect_lycoris,
               kohya.read, None),
        Format("xlabs", "XLabs FLUX.1: <block>.processor.qkv_lora1.down.weight, read-only", xlabs.detect, xlabs.read,
               None),
        Format("kohya", "kohya sd-scripts: lora_unet_/lora_te_ + lora_down/lora_up/alpha (also OneTrainer's "
               "lora_transformer_, SimpleTuner's lycoris_)", kohya.detect, kohya.read, kohya.write, why_unused),
        Format("comfyui", "ComfyUI: diffusion_model./text_encoders. + lora_up/lora_down", comfyui.detect,
               comfyui.read, comfyui.write, why_unused),
        Format("diffusers", "diffusers: unet./transformer./text_encoder./text_encoder_2. + lora_A/lora_B",
               diffusers.detect, diffusers.read, diffusers.write),
        Format("bare", "bare model names (DiffSynth, BFL control LoRAs), read-only", bare.detect, bare.read, None,
               bare.why_unused),
    )
}
WRITABLE = tuple(name for name, f in FORMATS.items() if f.write is not None)


def detect_format(keys: list[str], metadata: Mapping[str, str] | None = None, *, file: str | None = None) -> str:
    for fmt in FORMATS.values():
        if fmt.detect(keys, metadata or {}):
            return fmt.name
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise LoraFormatError(
        f"not a LoRA file in any known format (first keys: {sample})",
        file=file,
        hint=f"known formats: {', '.join(FORMATS)}",
    )


def read_lora(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    family: str | None = None,
    file: str | None = None,
    strict: bool = True,
) -> tuple[LoRA, list[str]]:
    """Read a state dict in any known format; returns the LoRA and the keys no layer used.

    ``strict`` (default) raises when any key is left over; otherwise the leftovers are logged and returned.
    """
    metadata = dict(metadata or {})
    name = detect_format(list(tensors), metadata, file=file)
    lora, unused = FORMATS[name].read(tensors, metadata, family=family, file=file)
    if unused:
        shown = ", ".join(sorted(unused)[:5]) + (f" … (+{len(unused) - 5} more)" if len(unused) > 5 else "")
        why = FORMATS[name].why_unused(unused) if FORMATS[name].why_unused else None
        if strict:
            raise LoraFormatError(
                why or f"{len(unused)} key(s) not understood as {name} LoRA weights: {shown}",
                file=file,
                hint=("ComfyUI's own LoraLoader applies them; " if why else "")
                + "pass strict=False to load the rest and list these",
            )
        log.warning("%s: %d key(s) not used: %s", file or "<state dict>", len(unused), shown)
    if not lora.layers:
        raise LoraFormatError(f"no LoRA layers found ({name} format)", file=file)
    return lora, unused


def write_lora(lora: LoRA, fmt: str, **options: object) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The flat state dict and metadata of ``lora`` in format ``fmt``, keys sorted so file bytes are deterministic."""
    spec = FORMATS.get(fmt)
    if spec is None or spec.write is None:
        raise LoraFormatError(f"cannot write format '{fmt}'", hint=f"writable formats: {', '.join(WRITABLE)}")
    tensors, metadata = spec.write(lora, **options)
    return dict(sorted(tensors.items())), dict(sorted(_say_family(lora, metadata).items()))


def _say_family(lora: LoRA, metadata: dict[str, str]) -> dict[str, str]:
    """The metadata, plus ``modelspec.architecture`` when the LoRA's family is known but its module names alone
    would not tell it on reading (a Qwen-Image LoRA of attention layers only is also FLUX.1-named): the file then
    reads back as what it is. Files whose names tell, or that already name a model, are left as they are."""
    if lora.family is None or "modelspec.architecture" in metadata or "ss_base_model_version" in metadata:
        return metadata
    fam = families.get(lora.family)
    paths = [parse_key(k)[0].removeprefix("unet.") for k in lora.layers if k.startswith("unet.")]
    if not paths or not fam.modelspec_architecture or families.detect(paths) == lora.family:
        return metadata
    return {**metadata, "modelspec.architecture": fam.modelspec_architecture}
