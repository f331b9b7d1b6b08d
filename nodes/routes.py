"""Small read-only HTTP routes for the front end, registered only inside ComfyUI.

`GET /loraops/info?name=<file in the loras folders>` → the Inspect report as JSON. Only files that the `loras`
dropdown lists can be read: the name is looked up through ComfyUI's folder_paths, never joined to a path.
"""

from __future__ import annotations

import importlib
import logging

from ..lora_ops.errors import LoraOpsError
from ..lora_ops.files import load_lora
from ..lora_ops.inspect import inspect_lora
from . import comfy_env
from .types import NODE_WORDING

log = logging.getLogger(__name__)


def lora_info(name: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one file of the loras folders."""
    if name not in comfy_env.lora_filenames():
        return 404, {"error": f"not in the loras folders: {name}"}
    try:
        path = comfy_env.lora_path(name)
        report = inspect_lora(load_lora(path, strict=False), path)
    except LoraOpsError as err:
        return 422, {"error": err.message(NODE_WORDING)}
    return 200, report


def register() -> bool:
    """Attach the routes to ComfyUI's server when it is running; a no-op elsewhere."""
    try:
        server = importlib.import_module("server")
        from aiohttp import web
    except ImportError:
        return False
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False

    @instance.routes.get("/loraops/info")
    async def _info(request):
        status, body = lora_info(request.query.get("name", ""))
        return web.json_response(body, status=status)

    return True
