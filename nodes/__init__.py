"""ComfyUI node classes: thin wrappers over `lora_ops` (the only code that may import comfy, lazily).

Node ids go into users' saved workflows: they never change once shipped.
"""

from . import routes
from .apply import LoraOpsApply, LoraOpsApplyStack
from .inspect_node import LoraOpsInspect
from .load import LoraOpsLoad
from .merge import LoraOpsMergeUnload
from .save import LoraOpsSave
from .stack import LoraOpsStack

routes.register()

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LoraOpsLoad": LoraOpsLoad,
    "LoraOpsStack": LoraOpsStack,
    "LoraOpsInspect": LoraOpsInspect,
    "LoraOpsSave": LoraOpsSave,
    "LoraOpsApply": LoraOpsApply,
    "LoraOpsApplyStack": LoraOpsApplyStack,
    "LoraOpsMergeUnload": LoraOpsMergeUnload,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LoraOpsLoad": "Load LoRA (LoRA Ops)",
    "LoraOpsStack": "LoRA Stack (LoRA Ops)",
    "LoraOpsInspect": "Inspect LoRA (LoRA Ops)",
    "LoraOpsSave": "Save LoRA (LoRA Ops)",
    "LoraOpsApply": "Apply LoRA (LoRA Ops)",
    "LoraOpsApplyStack": "Apply LoRA Stack (LoRA Ops)",
    "LoraOpsMergeUnload": "Merge & Unload LoRAs (LoRA Ops)",
}
