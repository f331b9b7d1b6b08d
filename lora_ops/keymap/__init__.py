"""Key-map helpers the family modules (`lora_ops.families`) build on: canonical keys ↔ module names.

Canonical keys (see `lora_ops.lora`): ``unet.<LDM/SGM module path>`` for SD-style UNets, and ``te1.`` / ``te2.``
plus the transformers path with ``text_model.`` for CLIP text encoders. One module per job:

- `sd_unet`: diffusers ↔ LDM UNet module paths.
- `kohya_names`: kohya's flattened ``a_b_c`` names ↔ dotted paths.
- `text_encoders`: canonical ↔ in-model CLIP text-encoder paths (transformers 4 and 5 layouts).
- `detect`: the UNet family from module paths.
- `model_keys`: canonical keys of a live diffusers UNet / CLIP text encoder.
- `checkpoints`: canonical keys ↔ tensors of single-file checkpoints and diffusers folders (fused OpenCLIP q/k/v).
"""

from ..families.unet_layout import UnetLayout, unet_layout
from .checkpoints import COMPONENTS, WeightSlot, checkpoint_family, checkpoint_targets
from .detect import detect_unet_family, unet_families
from .kohya_names import compound_tokens, dotted_to_kohya, kohya_to_dotted, register_compound_tokens
from .model_keys import te_canonical_keys, unet_canonical_keys
from .sd_unet import is_unet_path, unet_diffusers_to_ldm, unet_ldm_to_diffusers
from .text_encoders import has_text_model, te_module_path, te_to_canonical_path

__all__ = [
    "COMPONENTS",
    "UnetLayout",
    "WeightSlot",
    "checkpoint_family",
    "checkpoint_targets",
    "compound_tokens",
    "detect_unet_family",
    "dotted_to_kohya",
    "has_text_model",
    "is_unet_path",
    "kohya_to_dotted",
    "register_compound_tokens",
    "te_canonical_keys",
    "te_module_path",
    "te_to_canonical_path",
    "unet_canonical_keys",
    "unet_families",
    "unet_diffusers_to_ldm",
    "unet_layout",
    "unet_ldm_to_diffusers",
]
