"""Canonical key ↔ the module names formats use, for the UNet and the text encoders.

Canonical keys: ``unet.<LDM path>``, ``te1.text_model.…``, ``te2.text_model.…`` (see `lora_ops.lora`).
Formats spell the UNet either in diffusers names (``down_blocks.0.attentions.0…``) or LDM names
(``input_blocks.1.1…``); both are accepted on read, and writers pick the one their consumers expect.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import keymap
from ..errors import LoraFormatError

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
    """Canonical key of a UNet module given in either spelling."""
    if not is_diffusers_unet_path(path):
        return f"unet.{path}"
    try:
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
    """Canonical key of a text-encoder module (``part`` is te1/te2); adds ``text_model.`` when missing."""
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
