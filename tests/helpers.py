"""Test helpers: tiny models' canonical weight shapes and random LoRAs on them (cached per session)."""

from __future__ import annotations

import functools

import torch

from lora_ops import keymap
from lora_ops.testing import tiny
from lora_ops.testing.fixtures import model_shapes, random_lora


@functools.cache
def canonical_shapes(family: str, *, attention_only: bool = False) -> dict[str, tuple[int, ...]]:
    """canonical key → weight shape for the tiny UNet and text encoder(s) of ``family``."""
    unet = tiny.tiny_unet(family)
    shapes = model_shapes(unet, keymap.unet_canonical_keys(unet, family))
    encoders = [("te1", "clip-l")] + ([("te2", "clip-g")] if family == "sdxl" else [])
    for part, kind in encoders:
        te = tiny.tiny_text_encoder(kind)
        shapes.update(model_shapes(te, keymap.te_canonical_keys(te, prefix=part)))
    if attention_only:
        shapes = {k: s for k, s in shapes.items() if any(t in k for t in ("attn", "self_attn", "mlp"))}
    return shapes


def sample_lora(family: str = "sd1", *, rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
                dtype: torch.dtype = torch.float32, attention_only: bool = False, **kw):
    return random_lora(canonical_shapes(family, attention_only=attention_only), rank=rank, alpha=alpha,
                       family=family, seed=seed, dtype=dtype, **kw)


def import_pack(name: str = "lora_ops_pack"):
    """Import the repo root the way ComfyUI's load_custom_node does (custom_nodes/<repo>/__init__.py)."""
    import importlib.util
    import pathlib
    import sys

    if name in sys.modules:
        return sys.modules[name]
    root = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
