"""ComfyUI entry point: ComfyUI imports this file from custom_nodes/<this repo>/.

Classic node API (NODE_CLASS_MAPPINGS), which imports nothing from ComfyUI and works on every release; we do not
also export `comfy_entrypoint` (ComfyUI's loader takes one or the other). The library lives in `lora_ops/` and is
imported relatively, so the pack works from a plain clone without installing it into ComfyUI's environment.

ComfyUI always imports this file as a package (a module spec with the repo folder as its search location), so
the relative import works whatever the folder is called (`lora-ops`, `ComfyUI-LoRA-Ops`). Tools that import it
as a plain module instead — pytest does, when it collects a clone whose folder name is not a Python identifier —
get empty mappings rather than an ImportError; there is nothing for them to register.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module, outside ComfyUI: no parent package to import the nodes relative to
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
