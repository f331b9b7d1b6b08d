"""Load and save LoRA files: safe I/O (`lora_ops.io`) + format registry (`lora_ops.formats`).

A folder is accepted where trainers write one: a PEFT adapter folder (``adapter_model.safetensors`` +
``adapter_config.json``) or a diffusers output folder (``pytorch_lora_weights.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

from . import io, safe_json
from .errors import LoraFileError
from .formats import detect_format, read_lora, write_lora
from .formats.diffusers import PEFT_CONFIG, peft_alphas
from .lora import LoRA

FOLDER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")


def _resolve(path: Path) -> tuple[Path, dict[str, str]]:
    """The weights file inside a trainer's output folder, and metadata found beside it."""
    try:
        if not path.is_dir():
            return path, {}
        weights = next((path / name for name in FOLDER_FILES if (path / name).is_file()), None)
        config = path / "adapter_config.json"
        has_config = weights is not None and config.is_file()
    except OSError as err:  # e.g. a name too long: pathlib's is_dir/is_file only swallow "not found"
        raise LoraFileError(f"cannot look at this path ({err.strerror or err})", file=path) from None
    if weights is not None:
        return weights, ({PEFT_CONFIG: _peft_config_text(config)} if has_config else {})
    raise LoraFileError("folder holds no LoRA weights", file=path, hint=f"expected one of {', '.join(FOLDER_FILES)}")


def _peft_config_text(config: Path) -> str:
    """The text of a PEFT folder's ``adapter_config.json``, checked here so that errors name that file.

    Unreadable (too large, not UTF-8, I/O error) is a `LoraFileError`; bad JSON or bad alpha/rank fields a
    `LoraFormatError` (`safe_json`). The text itself is passed on: the PEFT reader parses it again, within the
    same limits.
    """
    try:
        size = config.stat().st_size
        if size > safe_json.MAX_CHARS:
            raise LoraFileError(f"{size:,} bytes, more than the {safe_json.MAX_CHARS:,} a config may have", file=config)
        text = config.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LoraFileError(f"unreadable adapter_config.json ({err})", file=config) from None
    peft_alphas(safe_json.loads_object(text, file=config), file=config, key=None)
    return text


def load_lora(
    path: str | Path, *, family: str | None = None, allow_pickle: bool = False, strict: bool = True
) -> LoRA:
    """Read a LoRA file (any known format, detected from its bytes and keys) into the canonical LoRA value.

    The format is decided from the header's tensor names and metadata before any tensor is read, so a file that
    is no LoRA (a full checkpoint picked by mistake, a file of 200_000 junk tensors) is refused after reading its
    header only, not after loading all of it; the header is then handed to the loader, not parsed again.
    Pickles (only with ``allow_pickle``) have no header to look at and are loaded first, as before.
    """
    file, extra = _resolve(Path(path))
    if io.detect_file_kind(file) in ("torch-zip", "pickle"):
        tensors, metadata = io.load_state_dict(file, allow_pickle=allow_pickle)  # refuses unless allowed
    else:
        header = io.read_safetensors_header(file)
        names = [k for k in header[0] if k != "__metadata__"]
        detect_format(names, {**extra, **header[0].get("__metadata__", {})}, file=str(file))
        tensors, metadata = io.load_state_dict(file, header=header)
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
