"""CLIP text-encoder module paths: canonical (with ``text_model.``) ↔ the path inside a transformers model.

Canonical text-encoder paths keep transformers' names with the ``text_model.`` root, as LoRA files spell them
(``text_model.encoder.layers.0.self_attn.q_proj``). In transformers 5, ``CLIPTextModel`` has no ``text_model``
submodule (its modules are ``encoder.layers.N…``) while ``CLIPTextModelWithProjection`` still has one, next to
``text_projection``; these helpers bridge both.
"""

from __future__ import annotations

import torch

from ..errors import LoraFormatError

TEXT_MODEL = "text_model."
# Top-level modules of CLIPTextModelWithProjection that live beside text_model, not inside it.
OUTSIDE_TEXT_MODEL = ("text_projection",)


def te_to_canonical_path(path: str) -> str:
    """``encoder.layers.0.mlp.fc1`` → ``text_model.encoder.layers.0.mlp.fc1``; canonical paths pass unchanged."""
    if path.startswith(TEXT_MODEL) or path.split(".", 1)[0] in OUTSIDE_TEXT_MODEL:
        return path
    return TEXT_MODEL + path


def has_text_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` nests its transformer under a ``text_model`` submodule (transformers 4, or *WithProjection)."""
    return isinstance(getattr(model, "text_model", None), torch.nn.Module)


def te_module_path(canonical_path: str, model: torch.nn.Module) -> str:
    """The module path inside ``model`` of a canonical text-encoder path; raises if ``model`` has no such module."""
    path = te_to_canonical_path(canonical_path)
    if not has_text_model(model):
        path = path.removeprefix(TEXT_MODEL)
    try:
        model.get_submodule(path)
    except AttributeError:
        raise LoraFormatError(
            f"no such module in {type(model).__name__}", key=canonical_path, hint=f"looked for '{path}'"
        ) from None
    return path
