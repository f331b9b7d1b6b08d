"""Canonical key ↔ the module names formats use, for the denoiser and the text encoders, through the families.

Canonical keys: ``unet.<original path>[<part>]``, ``te1.text_model.…`` (CLIP), ``te3.encoder.…`` (T5) — see
`lora_ops.families`. Formats spell the denoiser in its original names (LDM for SD UNets, BFL for FLUX.1) or in
diffusers names; both are read, and writers pick the one their consumers expect. With no family known, a name
is translated only when every family that has the module agrees on the translation: nothing falls back to a
default family.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from .. import families
from ..errors import LoraFormatError
from ..fused import parse_key, part_key, swap_output_halves
from ..keymap.text_encoders import OUTSIDE_TEXT_MODEL, TEXT_MODEL, te_to_canonical_path
from .layers import LayerTable


def _agreed(path: str, family: str | None, fn: Callable[[families.Family], str], what: str, *,
            file: str | None) -> str:
    """``fn(family)`` for the given family, or the one answer every family that knows ``path`` gives."""
    if family is not None:
        try:
            return fn(families.get(family))
        except LoraFormatError as err:
            raise LoraFormatError(err.reason, file=file, key=err.key or path, hint=err.hint) from None
    answers = {}
    for fam_id in sorted(families.candidates(path)):
        try:
            answers[fam_id] = fn(families.get(fam_id))
        except LoraFormatError:
            continue
    if len(set(answers.values())) == 1:
        return next(iter(answers.values()))
    if not answers:
        raise LoraFormatError(f"{what}: matches no known model family", file=file, key=path,
                              hint=f"known families: {', '.join(families.IDS)}")
    raise LoraFormatError(f"{what}: names different modules in {', '.join(families.label(f) for f in answers)}",
                          file=file, key=path, hint="pass family=")


def unet_key(path: str, family: str | None, *, file: str | None = None) -> str:
    """Canonical key of a denoiser module given in either spelling, checked against ``family``'s model.

    An original-spelled path is checked too (not only converted ones): a module the family's model does not
    have — an SDXL block in a file read as SD 1.x — would otherwise load, apply to nothing, and fail only later
    when a writer needs its diffusers name, with no file to name.
    """

    def canonical(fam: families.Family) -> str:
        module, part = fam.denoiser_path(path)
        return part_key(f"unet.{module}", part)

    return _agreed(path, family, canonical, "denoiser module", file=file)


def swaps_halves(path: str, family: str | None) -> bool:
    """Whether diffusers-spelled ``path`` stores its output halves swapped against the canonical module."""
    if family is None:
        return False
    fam = families.get(family)
    return fam.is_diffusers_path(path) and fam.from_diffusers(path)[0] in fam.swap_halves


def add_denoiser_layer(table: LayerTable, path: str, family: str | None, module: str, roles: Mapping[str, str],
                       *, alpha: float | None = None) -> str:
    """Add a denoiser layer spelled ``path`` (either spelling) under its canonical key; returns the key.

    A diffusers-spelled module whose output halves are stored swapped (FLUX.1 ``norm_out.linear``) gets its
    ``up`` rows swapped back, exactly, so the canonical layer updates the original module.
    """
    key = unet_key(path, family, file=table.file)
    layer = table.add(key, module, roles, alpha=alpha)
    if swaps_halves(path, family):
        table.layers[key] = swap_output_halves(layer, key=module)
    return key


def unet_path(key: str, family: str | None, style: str) -> str:
    """The denoiser module path of a canonical key in ``style`` "original" or "diffusers".

    A part key has no original name of its own (the original model is fused): fuse the LoRA before writing
    original names.
    """
    module, part = parse_key(key)
    path = module.removeprefix("unet.")
    if style == "original":
        if part is not None:
            raise LoraFormatError("a layer on part of a fused weight has no original (fused) name", key=key,
                                  hint="fuse the LoRA first (lora_ops.fused.fuse)")
        return path
    return _agreed(path, family, lambda fam: fam.to_diffusers(path, part), "denoiser module", file=None)


def is_diffusers_unet_path(path: str) -> bool:
    """Whether some family spells ``path`` the diffusers way (by its first component)."""
    return any(fam.is_diffusers_path(path) for fam in families.REGISTRY.values())


def text_encoder(part: str, family: str | None) -> families.TextEncoder | None:
    """The text encoder of ``family`` at canonical ``part``; with no family, the one every family agrees on."""
    if family is not None:
        return families.get(family).text_encoder(part)
    found = {fam.text_encoder(part) for fam in families.REGISTRY.values()} - {None}
    kinds = {te.kind for te in found}
    return next(iter(found)) if len(kinds) == 1 else None


def te_kind(part: str, path: str, family: str | None) -> str:
    """"clip" or "t5": from the family's text encoder when known, else from the path itself."""
    te = text_encoder(part, family)
    if te is not None:
        return te.kind
    return "t5" if path.startswith(("encoder.block.", "shared")) else "clip"


def te_key(part: str, path: str, family: str | None = None) -> str:
    """Canonical key of a text-encoder module (``part`` is te1/te2/te3); CLIP paths gain ``text_model.``.

    A CLIP module that lives beside ``text_model`` (``text_projection``) but is spelled inside it reads as
    itself, so that both spellings land on one key (and a file holding both is refused, not loaded as two layers).
    """
    if te_kind(part, path, family) == "t5":
        return f"{part}.{path}"
    rest = path.removeprefix(TEXT_MODEL)
    if rest != path and rest.split(".", 1)[0] in OUTSIDE_TEXT_MODEL:
        path = rest
    return f"{part}.{te_to_canonical_path(path)}"


def split_canonical(key: str) -> tuple[str, str]:
    """``"te1.text_model.x"`` → ``("te1", "text_model.x")``."""
    part, _, path = key.partition(".")
    return part, path


def guess_family(unet_paths: Iterable[str], parts: Iterable[str], hint: str | None = None, *,
                 file: str | None = None, metadata: Mapping[str, str] | None = None) -> str | None:
    """The family of a LoRA: its denoiser paths decide (`families.require`: unknown paths are an error); when
    they fit several families, the file's metadata may name one of those (`families.from_metadata`), else its text
    encoders (a CLIP-G ``te2`` says SDXL); ``hint`` wins and is checked."""
    unet_paths = list(unet_paths)
    fam = families.require(unet_paths, hint, file=file)
    if fam is not None:
        return fam
    if unet_paths and metadata:
        fam = families.from_metadata(metadata, among=families.fitting(p.removeprefix("unet.") for p in unet_paths))
        if fam is not None:
            return fam
    parts = {p for p in parts if p.startswith("te")}
    owners = [f.id for f in families.REGISTRY.values() if parts and parts <= {te.part for te in f.text_encoders}]
    unet = set(unet_paths)
    owners = [f for f in owners if all(families.get(f).knows(p.removeprefix("unet.")) for p in unet)]
    if "te2" in parts and owners == ["sdxl"]:
        return "sdxl"
    if "te3" in parts and len(owners) == 1:
        return owners[0]
    return None
