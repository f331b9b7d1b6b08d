"""Bare model names: denoiser module paths with no prefix at all, in either spelling.

DiffSynth/ModelScope write diffusers paths (``transformer_blocks.0.attn.to_q.lora_A.weight``); BFL's FLUX.1
control LoRAs write original paths (``double_blocks.0.img_attn.qkv.lora_A.weight``). Read-only: every writer
uses a prefix its consumers know. Detected last, only when some key's module is a denoiser module of a family.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import families
from ..lora import LoRA
from . import names
from .layers import ANY_SUFFIXES, LayerTable, group_by_module, split_key

# Parts of BFL control LoRAs that are not low-rank factors: a bias delta and RMSNorm scale replacements.
NOT_FACTORS = (".lora_B.bias", "_norm.scale")


def detect(keys: list[str], metadata: Mapping[str, str]) -> bool:
    for key in keys[:64]:
        split = split_key(key, ANY_SUFFIXES)
        if split is not None and families.candidates(split[0]):
            return True
    return False


def why_unused(unused: list[str]) -> str | None:
    """The reason to give when a strict read leaves ``unused`` keys: BFL control LoRAs carry non-LoRA parts."""
    extra = sorted(k for k in unused if k.endswith(NOT_FACTORS))
    if not extra:
        return None
    return (f"a BFL control LoRA: {len(extra)} tensor(s) are bias deltas or norm-scale replacements, not LoRA "
            f"factors (e.g. {extra[0]}); LoRA Ops does not apply those yet, and loading the file without them "
            "would change the model the LoRA was trained for")


def read(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, family: str | None, file: str | None
) -> tuple[LoRA, list[str]]:
    modules, unused = group_by_module(tensors, ANY_SUFFIXES, file=file)
    for module in [m for m in modules if not families.candidates(m)]:
        unused.extend(modules.pop(module).values())
    fam = names.guess_family(list(modules), (), family, file=file, metadata=metadata)
    table = LayerTable(tensors, file=file)
    for module, roles in modules.items():
        names.add_denoiser_layer(table, module, fam, module, roles)
    return LoRA(table.layers, dict(metadata), family=fam, source_format="bare"), unused
