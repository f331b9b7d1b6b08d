"""Canonical key ↔ the module names formats use, for the UNet and the text encoders.

Canonical keys: ``unet.<LDM path>``, ``te1.text_model.…``, ``te2.text_model.…`` (see `lora_ops.lora`).
Formats spell the UNet either in diffusers names (``down_blocks.0.attentions.0…``) or LDM names
(``input_blocks.1.1…``); both are accepted on read, and writers pick the one their consumers expect.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import keymap
from ..errors import LoraFormatError
from ..keymap.text_encoders import OUTSIDE_TEXT_MODEL, TEXT_MODEL

DIFFUSERS_UNET_ROOTS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
)


def is_diffusers_unet_path(path: str) -> bool:
    return path.split(".", 1)[0] in DIFFUSERS_UNET_ROOTS


def unet_key(path: str, family: str | None, *, file: str | None = None) -> str:
    """Canonical key of a UNet module given in either spelling, checked against ``family``'s UNet when known.

    An LDM-spelled path is checked too (not only converted ones): a module the family's UNet does not have — an
    SDXL block in a file read as SD 1.x — would otherwise load, apply to nothing, and fail only later when a
    writer needs its diffusers name, with no file to name.
    """
    try:
        if not is_diffusers_unet_path(path):
            if family is not None:
                keymap.unet_ldm_to_diffusers(path, family)
            return f"unet.{path}"
        return "unet." + keymap.unet_diffusers_to_ldm(path, family or "sd1")
    except LoraFormatError as err:
        raise LoraFormatError(err.reason, file=file, key=path, hint=err.hint) from None


def unet_path(key: str, family: str | None, style: str) -> str:
    """The UNet module path of a canonical key in ``style`` "ldm" or "diffusers"."""
    path = key.removeprefix("unet.")
    if style == "ldm":
        return path
    return keymap.unet_ldm_to_diffusers(path, family or "sd1")


def te_key(part: str, path: str) -> str:
    """Canonical key of a text-encoder module (``part`` is te1/te2); adds ``text_model.`` when missing.

    A module that lives beside ``text_model`` (``text_projection``) but is spelled inside it reads as itself, so
    that both spellings land on one key (and a file holding both is refused, not loaded as two layers).
    """
    rest = path.removeprefix(TEXT_MODEL)
    if rest != path and rest.split(".", 1)[0] in OUTSIDE_TEXT_MODEL:
        path = rest
    return f"{part}.{keymap.te_to_canonical_path(path)}"


def split_canonical(key: str) -> tuple[str, str]:
    """``"te1.text_model.x"`` → ``("te1", "text_model.x")``."""
    part, _, path = key.partition(".")
    return part, path


def guess_family(unet_paths: Iterable[str], parts: Iterable[str], hint: str | None = None) -> str | None:
    """The model family from the parts present (te2 → SDXL) and the UNet module names; ``hint`` wins."""
    if hint:
        return hint
    if "te2" in set(parts):
        return "sdxl"
    return keymap.detect_unet_family(list(unet_paths))
