"""LoraOpsSave: LORA → a file under ComfyUI's output folder (never outside it), in the chosen format."""

from __future__ import annotations

import json
import re

from ..lora_ops.errors import LoraValueError
from ..lora_ops.files import save_lora
from ..lora_ops.formats import WRITABLE
from ..lora_ops.io import safe_join
from . import comfy_env
from .types import CATEGORY, LORA


def parse_metadata(text: str) -> dict[str, str]:
    """Metadata from a JSON object or ``key=value`` lines (str → str, as safetensors stores it)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LoraValueError(f"metadata is not valid JSON ({err.msg} at line {err.lineno})") from None
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise LoraValueError(f"metadata line {n} is not key=value: {line!r}")
            out[key.strip()] = value.strip()
    return out


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
        extra = parse_metadata(metadata)
        if extra:
            lora = lora.replace(metadata={**lora.metadata, **extra})
        options = {"component": "unet"} if format == "peft" else {}
        path = save_lora(lora, next_path(folder, stem), format, root=root, **options)
        rel = str(path.relative_to(root.resolve()))
        return {"ui": {"text": [rel]}, "result": (rel,)}
