"""LoraOpsLoad: a file from the `loras` folder → LORA value + a one-paragraph info string."""

from __future__ import annotations

from ..lora_ops import families
from ..lora_ops.errors import LoraFileError, reword
from ..lora_ops.files import load_lora
from ..lora_ops.inspect import format_report, inspect_lora
from ..lora_ops.io import file_sha256
from . import comfy_env
from .types import CATEGORY, LORA, NODE_WORDING

_hash_cache: dict[tuple[str, int, int], str] = {}


def content_hash(path) -> str:
    """sha256 of the file, cached by (path, size, mtime) so a re-saved file is re-read but an unchanged one is cheap."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = file_sha256(path)
    return _hash_cache[key]


def resolve_lora(name: str):
    path = comfy_env.lora_path(name)
    if path is None:
        raise LoraFileError("not found in the loras folders", file=name,
                            hint="put the file in models/loras and refresh the page")
    return path


class LoraOpsLoad:
    CATEGORY = CATEGORY
    DESCRIPTION = "Load a LoRA file in any common format (kohya, diffusers, PEFT, ComfyUI, LyCORIS) as a LORA value."
    RETURN_TYPES = (LORA, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_TOOLTIPS = ("The LoRA, in LoRA Ops' canonical form: feed Apply, Stack, Resize, Combine, Save.",
                       "Format, model family, ranks, trigger words.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (comfy_env.lora_filenames(), {"tooltip": "A file from the models/loras folders."}),
            },
            "optional": {
                "family": (["auto", *families.IDS], {"default": "auto",
                                                      "tooltip": "Model family, when the file's keys do not tell."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name, family="auto"):
        if comfy_env.lora_path(lora_name) is None:
            return f"LoRA file not found in the loras folders: {lora_name}"
        return True

    @classmethod
    def IS_CHANGED(cls, lora_name, family="auto"):
        path = comfy_env.lora_path(lora_name)
        return content_hash(path) if path else ""

    def load(self, lora_name, family="auto"):
        path = resolve_lora(lora_name)
        lora = load_lora(path, family=None if family == "auto" else family)
        return (lora, reword(format_report(inspect_lora(lora, path)), NODE_WORDING))
