"""ComfyUI entry point: ComfyUI imports this file from custom_nodes/<this repo>/.

Classic node API (NODE_CLASS_MAPPINGS), which imports nothing from ComfyUI and works on every release; we do not
also export `comfy_entrypoint` (ComfyUI's loader takes one or the other). The library lives in `lora_ops/` and is
imported relatively, so the pack works from a plain clone without installing it into ComfyUI's environment.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
