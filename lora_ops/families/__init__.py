"""The model-family registry: one module per family, registered here, and the questions asked of them.

Adding a family = one module that builds a `Family` (see `base` and `flux1` for a DiT with fused weights,
`sd1`/`sdxl` for SD-style UNets) + its line in `REGISTRY` + tests. Nothing else in LoRA Ops names a family.
Detection never guesses: `detect` returns a family only when the paths say so, and `require` turns "no
family knows these paths" into an error naming them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..errors import LoraFormatError, LoraValueError
from ..keymap.kohya_names import register_compound_tokens
from . import flux1, qwen_image, sd1, sdxl, wan, zimage
from .base import Family, FusedWeight, Part, TextEncoder

REGISTRY: dict[str, Family] = {
    f.id: f for f in (sd1.FAMILY, sdxl.FAMILY, flux1.FAMILY, zimage.FAMILY, qwen_image.FAMILY, wan.FAMILY)
}
IDS: tuple[str, ...] = tuple(REGISTRY)

for _family in REGISTRY.values():
    register_compound_tokens(_family.compound_tokens)


def get(family_id: str) -> Family:
    """The family ``family_id``; an unknown id raises `LoraValueError` listing the known ones."""
    try:
        return REGISTRY[family_id]
    except KeyError:
        raise LoraValueError(f"unknown model family '{family_id}'", hint=f"known families: {', '.join(IDS)}") from None


def label(family_id: str | None) -> str:
    """The family as users know it ("SD1.x", "FLUX.1"); None is "unknown-family", unregistered ids stay."""
    if family_id is None:
        return "unknown-family"
    fam = REGISTRY.get(family_id)
    return fam.label if fam is not None else family_id


def candidates(path: str) -> set[str]:
    """The families whose denoiser has module ``path`` (either spelling; a ``unet.`` prefix is ignored)."""
    path = path.removeprefix("unet.")
    return {f.id for f in REGISTRY.values() if f.knows(path)}


def detect(paths: Iterable[str]) -> str | None:
    """The one family every telling path fits, or None (no evidence, or evidence for two families).

    A path is evidence when some families have it and others do not; paths no family knows are ignored here
    (`require` reports them). Works on partial key sets: an SD LoRA of attention layers shared by SD 1.x and
    SDXL gives None, not a guess.
    """
    every = set(REGISTRY)
    found = set(every)
    evidence = False
    for path in set(paths):
        fits = candidates(path)
        if fits and fits != every:
            evidence = True
            found &= fits
    return found.pop() if evidence and len(found) == 1 else None


def from_metadata(metadata: Mapping[str, str], among: Iterable[str] | None = None) -> str | None:
    """The family a file's own metadata names (kohya's ``ss_base_model_version``, the model spec's
    ``modelspec.architecture``), restricted to ``among``; None when it names none, or several."""
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    named = {f.id for f in REGISTRY.values()
             if (f.ss_base_model_version and version == f.ss_base_model_version)
             or (f.modelspec_architecture and arch == f.modelspec_architecture)}
    if among is not None:
        named &= set(among)
    return named.pop() if len(named) == 1 else None


def fitting(paths: Iterable[str]) -> set[str]:
    """The families whose denoiser has every one of ``paths``."""
    found = set(REGISTRY)
    for path in paths:
        found &= candidates(path)
    return found


def require(paths: Iterable[str], hint: str | None = None, *, file: str | None = None) -> str | None:
    """The family of a LoRA's denoiser paths: ``hint`` when given (and checked), else `detect`.

    Raises `LoraFormatError` naming the paths that no family knows (an unknown model, or a typo), and the
    paths that do not fit ``hint`` when one is forced. None means: every path is known, but they fit several
    families equally (writers then need the names to agree, or a forced family).
    """
    paths = sorted({p.removeprefix("unet.") for p in paths})
    if hint is not None:
        fam = get(hint)
        wrong = [p for p in paths if not fam.knows(p)]
        if wrong:
            others = sorted(set().union(*(candidates(p) for p in wrong)))
            seems = f"; they look like {', '.join(label(o) for o in others)}" if others else ""
            raise LoraFormatError(
                f"{len(wrong)} module(s) are not in the {fam.label} model{seems}: " + ", ".join(wrong[:3]),
                file=file, key=wrong[0],
                hint="check the family you passed (pass family=), or that the LoRA is for this model",
            )
        return hint
    fits = {p: candidates(p) for p in paths}
    unknown = [p for p, fams in fits.items() if not fams]
    if unknown:
        raise LoraFormatError(
            f"{len(unknown)} module(s) match no known model family: " + ", ".join(unknown[:3]),
            file=file, key=unknown[0], hint=f"known families: {', '.join(IDS)}; force one: pass family=",
        )
    common = set(REGISTRY).intersection(*fits.values())
    if paths and not common:  # e.g. SDXL blocks and FLUX.1 blocks in one file
        first = paths[0]
        other = next(p for p in paths if not fits[p] & fits[first])
        raise LoraFormatError(
            f"mixes modules of different model families: {first} ({', '.join(label(f) for f in sorted(fits[first]))})"
            f" and {other} ({', '.join(label(f) for f in sorted(fits[other]))})",
            file=file, key=other, hint="a LoRA is for one model; split the file, or check how it was made",
        )
    return detect(paths)


__all__ = ["IDS", "REGISTRY", "Family", "FusedWeight", "Part", "TextEncoder", "candidates", "detect", "fitting",
           "from_metadata", "get", "label", "require"]
