"""ComfyUI node classes: thin wrappers over `lora_ops` (the only code that may import comfy, lazily).

Node ids go into users' saved workflows: they never change once shipped.
"""

from . import routes
from .apply import LoraOpsApply, LoraOpsApplyStack
from .combine_node import LoraOpsCombine
from .extract_node import LoraOpsExtract
from .inspect_node import LoraOpsInspect
from .load import LoraOpsLoad
from .merge import LoraOpsMergeUnload
from .resize_node import LoraOpsResize
from .save import LoraOpsSave
from .stack import LoraOpsStack
from .train_node import LoraOpsTrain
from .types import reword_errors

routes.register()

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LoraOpsLoad": LoraOpsLoad,
    "LoraOpsStack": LoraOpsStack,
    "LoraOpsInspect": LoraOpsInspect,
    "LoraOpsSave": LoraOpsSave,
    "LoraOpsApply": LoraOpsApply,
    "LoraOpsApplyStack": LoraOpsApplyStack,
    "LoraOpsMergeUnload": LoraOpsMergeUnload,
    "LoraOpsCombine": LoraOpsCombine,
    "LoraOpsResize": LoraOpsResize,
    "LoraOpsExtract": LoraOpsExtract,
    "LoraOpsTrain": LoraOpsTrain,
}
for _cls in NODE_CLASS_MAPPINGS.values():
    reword_errors(_cls)  # library hints speak API (allow_pickle=True …); node users read what they can change

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LoraOpsLoad": "Load LoRA (LoRA Ops)",
    "LoraOpsStack": "LoRA Stack (LoRA Ops)",
    "LoraOpsInspect": "Inspect LoRA (LoRA Ops)",
    "LoraOpsSave": "Save LoRA (LoRA Ops)",
    "LoraOpsApply": "Apply LoRA (LoRA Ops)",
    "LoraOpsApplyStack": "Apply LoRA Stack (LoRA Ops)",
    "LoraOpsMergeUnload": "Merge & Unload LoRAs (LoRA Ops)",
    "LoraOpsCombine": "Combine LoRA Stack (LoRA Ops)",
    "LoraOpsResize": "Rank-Resize LoRA (LoRA Ops)",
    "LoraOpsExtract": "Extract LoRA (LoRA Ops)",
    "LoraOpsTrain": "Train LoRA (LoRA Ops)",
}
