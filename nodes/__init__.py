"""ComfyUI node classes: thin wrappers over `lora_ops` (the only code that may import comfy, lazily)."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
