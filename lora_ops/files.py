"""Load and save LoRA files: safe I/O (`lora_ops.io`) + format registry (`lora_ops.formats`).

A folder is accepted where trainers write one: a PEFT adapter folder (``adapter_model.safetensors`` +
``adapter_config.json``) or a diffusers output folder (``pytorch_lora_weights.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import io
from .errors import LoraFileError
from .formats import read_lora, write_lora
from .formats.diffusers import PEFT_CONFIG
from .lora import LoRA

FOLDER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")


def _resolve(path: Path) -> tuple[Path, dict[str, str]]:
    """The weights file inside a trainer's output folder, and metadata found beside it."""
    if not path.is_dir():
        return path, {}
    for name in FOLDER_FILES:
        if (path / name).is_file():
            extra = {}
            config = path / "adapter_config.json"
            if config.is_file():
                try:
                    extra[PEFT_CONFIG] = json.dumps(json.loads(config.read_text()))
                except (OSError, ValueError) as err:
                    raise LoraFileError(f"unreadable adapter_config.json ({err})", file=config) from None
            return path / name, extra
    raise LoraFileError("folder holds no LoRA weights", file=path, hint=f"expected one of {', '.join(FOLDER_FILES)}")


def load_lora(
    path: str | Path, *, family: str | None = None, allow_pickle: bool = False, strict: bool = True
) -> LoRA:
    """Read a LoRA file (any known format, detected from its bytes and keys) into the canonical LoRA value."""
    file, extra = _resolve(Path(path))
    tensors, metadata = io.load_state_dict(file, allow_pickle=allow_pickle)
    lora, _unused = read_lora(tensors, {**extra, **metadata}, family=family, file=str(file), strict=strict)
    return lora


def save_lora(
    lora: LoRA,
    path: str | Path,
    fmt: str = "kohya",
    *,
    overwrite: bool = False,
    root: str | Path | None = None,
    **options: object,
) -> Path:
    """Write ``lora`` as ``fmt`` to a .safetensors file, atomically (temp file + replace)."""
    tensors, metadata = write_lora(lora, fmt, **options)
    return io.save_state_dict(path, tensors, metadata, overwrite=overwrite, root=root)
