"""PIL image → ComfyUI IMAGE tensor ([batch, height, width, channels], float 0..1)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_image_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(array)[None]  # (1, H, W, 3)
