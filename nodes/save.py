"""LoraOpsSave: LORA → a file under ComfyUI's output folder (never outside it), in the chosen format."""

from __future__ import annotations

import json
import os
import re

from ..lora_ops import safe_json
from ..lora_ops.errors import LoraFileError, LoraFormatError, LoraValueError
from ..lora_ops.files import save_lora
from ..lora_ops.formats import WRITABLE
from ..lora_ops.io import safe_join
from . import comfy_env
from .types import CATEGORY, LORA

COUNTER_SUFFIX = "_00000_.safetensors"
"""What `next_path` appends to the prefix's last part (the counter may grow past 5 digits; checked as written)."""


def parse_metadata(text: str) -> dict[str, str]:
    """Metadata from a JSON object or ``key=value`` lines (str → str, as safetensors stores it).

    JSON goes through `lora_ops.safe_json` (no NaN/Infinity, no huge integers, bounded nesting, no duplicate
    keys, an object at the top); every refusal is a `LoraValueError` naming the ``metadata`` input.
    """
    if not isinstance(text, str):
        raise LoraValueError(f"metadata must be text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = safe_json.loads_object(text)
        except LoraFormatError as err:
            raise LoraValueError(f"metadata: {err.reason}",
                                 hint='a JSON object of strings, e.g. {"modelspec.title": "Mine"}') from None
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise LoraValueError(f"metadata line {n} is not key=value: {line!r}")
            out[key.strip()] = value.strip()
    return out


def _name_max(root) -> int:
    """The longest file name (bytes) the output folder's file system takes; 255 where it cannot say."""
    try:
        return int(os.pathconf(root, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf on Windows; NTFS and ext4 both allow 255
        return 255


def check_prefix(prefix: str, root, stem: str) -> None:
    """Refuse a ``filename_prefix`` whose file or folder names would be longer than the file system allows."""
    limit = _name_max(root)
    shown = prefix if len(prefix) <= 60 else f"{prefix[:57]}… ({len(prefix)} characters)"
    *folders, _ = prefix.replace("\\", "/").split("/")
    names = [(part, "folder name") for part in folders if part] + [(stem + COUNTER_SUFFIX, "file name")]
    for name, what in names:
        size = len(name.encode("utf-8", "surrogatepass"))
        if size > limit:
            room = limit - len(COUNTER_SUFFIX) if what == "file name" else limit
            raise LoraFileError(f"filename_prefix is too long: it makes a {what} of {size} bytes, the file system's "
                                f"limit is {limit}", file=shown,
                                hint=f"shorten filename_prefix; each part can be at most {room} bytes"
                                     + (" (the counter and .safetensors take the rest)" if what == "file name" else ""))


def next_path(folder, stem: str):
    """``<stem>_00001_.safetensors`` with the next free counter, like ComfyUI's own save nodes."""
    pattern = re.compile(re.escape(stem) + r"_(\d{5})_\.safetensors$")
    used = [int(m.group(1)) for p in folder.glob("*.safetensors") if (m := pattern.match(p.name))]
    return folder / f"{stem}_{max(used, default=0) + 1:05d}_.safetensors"


class LoraOpsSave:
    CATEGORY = CATEGORY
    DESCRIPTION = "Save a LORA under the output folder (output/loras/… shows up in the loader after a refresh)."
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written, relative to the output folder.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": (LORA, {"tooltip": "The LoRA to write."}),
                "filename_prefix": ("STRING", {"default": "loras/LoRA-Ops",
                                               "tooltip": "Folder/name inside the output folder; a counter is added."}),
                "format": (list(WRITABLE), {"default": "kohya",
                                            "tooltip": "kohya/comfyui load everywhere; diffusers for diffusers "
                                                       "pipelines; peft writes the UNet only."}),
            },
            "optional": {
                "metadata": ("STRING", {"default": "", "multiline": True,
                                        "tooltip": "Extra metadata: a JSON object or key=value lines "
                                                   "(e.g. modelspec.trigger_phrase=sks style)."}),
            },
        }

    def save(self, lora, filename_prefix, format, metadata=""):
        root = comfy_env.output_dir()
        target = safe_join(root, filename_prefix + "_")  # refuses ../ and absolute prefixes before any write
        folder, stem = target.parent, target.name[:-1] or "LoRA-Ops"
        check_prefix(filename_prefix, root, stem)
        extra = parse_metadata(metadata)
        if extra:
            lora = lora.replace(metadata={**lora.metadata, **extra})
        options = {"component": "unet"} if format == "peft" else {}
        try:
            path = save_lora(lora, next_path(folder, stem), format, root=root, **options)
        except OSError as err:  # what the checks above cannot foresee (a full path too long, a read-only folder)
            raise LoraFileError(f"cannot save ({err.strerror or err})", file=filename_prefix[:80],
                                hint="check filename_prefix and the output folder") from None
        rel = str(path.relative_to(root.resolve()))
        return {"ui": {"text": [rel]}, "result": (rel,)}
