"""Which registered SD-style UNet family a set of module paths (LDM or diffusers spelling) belongs to."""

from __future__ import annotations

from collections.abc import Iterable

from .sd_unet import is_unet_path


def unet_families() -> tuple[str, ...]:
    """The registered families with an SD-style UNet (the ones `lora_ops.keymap.sd_unet` can name)."""
    from ..families import REGISTRY  # the registry imports keymap: look it up at call time

    return tuple(f.id for f in REGISTRY.values() if f.unet_layout is not None)


def detect_unet_family(paths: Iterable[str]) -> str | None:
    """The family whose UNet has every module that tells the families apart, or None when undecidable.

    A path is evidence when it names a module of some families but not all: ``label_emb``/``add_embedding``,
    ``transformer_blocks.1`` and attentions at the lowest level say SDXL; attentions at the full-resolution
    level (``input_blocks.1.1``, ``down_blocks.0.attentions``) or a fourth level say SD 1.x. Works on partial
    key sets. Paths no family knows are ignored; no evidence, or evidence for two families, gives None.
    Paths may carry a ``unet.`` prefix.
    """
    families = set(unet_families())
    candidates = set(families)
    evidence = False
    for path in {p.removeprefix("unet.") for p in paths}:
        fits = {f for f in families if is_unet_path(path, f)}
        if fits and fits != families:
            evidence = True
            candidates &= fits
    if evidence and len(candidates) == 1:
        return candidates.pop()
    return None
