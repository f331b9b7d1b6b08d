"""The few ComfyUI services the nodes use, imported lazily so the pack imports (and tests run) without ComfyUI.

Outside ComfyUI (tests, scripts) the model folders come from `configure()`; inside it, from `folder_paths`.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_standalone: dict[str, list[Path]] = {"loras": [], "output": [], "input": []}


def configure(*, loras: list[str | Path] | None = None, output: str | Path | None = None,
              input: str | Path | None = None) -> None:
    """Set the folders used when ComfyUI is not present (tests, standalone use)."""
    if loras is not None:
        _standalone["loras"] = [Path(p) for p in loras]
    if output is not None:
        _standalone["output"] = [Path(output)]
    if input is not None:
        _standalone["input"] = [Path(input)]


def _comfy(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def lora_filenames() -> list[str]:
    fp = _comfy("folder_paths")
    if fp is not None:
        return list(fp.get_filename_list("loras"))
    names = set()
    for root in _standalone["loras"]:
        names.update(str(p.relative_to(root)) for p in root.rglob("*.safetensors"))
    return sorted(names)


def lora_folders() -> list[Path]:
    fp = _comfy("folder_paths")
    if fp is not None:
        return [Path(p) for p in fp.get_folder_paths("loras")]
    return list(_standalone["loras"])


def lora_path(name: str) -> Path | None:
    """Full path of a file from the `loras` dropdown, or None when it is not there."""
    fp = _comfy("folder_paths")
    if fp is not None:
        found = fp.get_full_path("loras", name)
        return Path(found) if found else None
    for root in _standalone["loras"]:
        candidate = (root / name).resolve()
        if candidate.is_file() and candidate.is_relative_to(root.resolve()):
            return candidate
    return None


def _folder(kind: str) -> Path:
    """ComfyUI's ``output`` / ``input`` folder, or the one `configure` set outside ComfyUI."""
    fp = _comfy("folder_paths")
    if fp is not None:
        return Path(getattr(fp, f"get_{kind}_directory")())
    if not _standalone[kind]:
        raise RuntimeError(f"no {kind} folder configured (call nodes.comfy_env.configure({kind}=...))")
    return _standalone[kind][0]


def output_dir() -> Path:
    return _folder("output")


def input_dir() -> Path:
    """ComfyUI's input folder (training data folders are looked up inside it, never outside)."""
    return _folder("input")


class Progress:
    """ComfyUI's progress bar (which also raises on interrupt) or a no-op outside ComfyUI."""

    def __init__(self, total: int) -> None:
        utils = _comfy("comfy.utils")
        self._bar = utils.ProgressBar(total) if utils is not None else None

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def update_absolute(self, value: int, total: int | None = None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(value, total)


def interrupted() -> bool:
    """True when the user pressed Cancel in ComfyUI (checked between steps of long work)."""
    mm = _comfy("comfy.model_management")
    return bool(mm is not None and getattr(mm, "processing_interrupted", lambda: False)())


def throw_if_interrupted() -> None:
    mm = _comfy("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def layer_progress():
    """A ``(done, total)`` callback for lora_ops loops: ComfyUI's progress bar (raising on Cancel), or None."""
    utils = _comfy("comfy.utils")
    if utils is None:
        return False
    bar = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = utils.ProgressBar(max(total, 1))
        bar["bar"].update_absolute(done, max(total, 1))
        throw_if_interrupted()

    return update


def send_event(event: str, data: dict) -> None:
    """Send a message to the browser (``api.addEventListener(event, …)`` in web/); a no-op outside ComfyUI."""
    server = _comfy("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None) if server is not None else None
    if instance is None:
        return
    try:
        instance.send_sync(event, data, getattr(instance, "client_id", None))
    except Exception as err:  # a closed websocket must not stop the work
        log.debug("could not send %s: %s", event, err)
