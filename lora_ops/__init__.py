"""LoRA Ops: the whole life of a LoRA adapter for diffusion models, as a library (no ComfyUI import)."""

from .errors import LoraFileError, LoraFormatError, LoraOpsError, LoraValueError, UnsafeFileError
from .lora import LoRA, LoRALayer, LycorisLayer, delta

__version__ = "0.1.0"

__all__ = [
    "LoRA",
    "LoRALayer",
    "LycorisLayer",
    "delta",
    "LoraOpsError",
    "LoraFileError",
    "LoraFormatError",
    "LoraValueError",
    "UnsafeFileError",
    "__version__",
]
