"""SD-style UNet module paths: diffusers names ↔ original single-file (LDM/SGM) names.

Paths are module paths without ``.weight``. The map is exact and total on every module with weights (and on
the resnet/attention containers); anything else raises `LoraFormatError` naming the path. Index rules, with
N = layers_per_block + 1 (3 for SD 1.x and SDXL):

    down_blocks.i.resnets.j     ↔ input_blocks.{N·i+j+1}.0      (resnet leaves renamed, see RESNET_LEAVES)
    down_blocks.i.attentions.j  ↔ input_blocks.{N·i+j+1}.1      (everything inside keeps its name)
    down_blocks.i.downsamplers.0.conv ↔ input_blocks.{N·(i+1)}.0.op
    up_blocks.i.resnets.j       ↔ output_blocks.{N·i+j}.0
    up_blocks.i.attentions.j    ↔ output_blocks.{N·i+j}.1
    up_blocks.i.upsamplers.0.conv ↔ output_blocks.{N·i+N-1}.{2 if up block i has attentions else 1}.conv
    mid_block.resnets.0 / attentions.0 / resnets.1 ↔ middle_block.0 / 1 / 2
"""

from __future__ import annotations

from ..errors import LoraFormatError
from ..families.unet_layout import UnetLayout, unet_layout

# Exact (leaf) renames outside the blocks.
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
TEXT_TIME = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# What may follow an attention (Transformer2DModel) container, and a transformer block inside it.
ATTENTION_ROOTS = ("norm", "proj_in", "proj_out", "transformer_blocks")
TRANSFORMER_BLOCK_PARTS = ("norm1", "norm2", "norm3", "attn1", "attn2", "ff")

_INV = {
    "top": {v: k for k, v in TOP_LEVEL.items()},
    "text_time": {v: k for k, v in TEXT_TIME.items()},
    "resnet": {v: k for k, v in RESNET_LEAVES.items()},
}


class _Unknown(Exception):
    """Internal: the path does not name a module of this layout."""


def _index(token: str | None, limit: int) -> int:
    """A canonical decimal index below ``limit`` ("01" and "-1" are not indices)."""
    if token is None or not token.isdigit() or str(int(token)) != token or int(token) >= limit:
        raise _Unknown
    return int(token)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _resnet_leaf(rest: list[str], table: dict[str, str]) -> str:
    leaf = ".".join(rest)
    if leaf and leaf not in table:
        raise _Unknown
    return table.get(leaf, "")


def _attention_rest(rest: list[str], layout: UnetLayout) -> str:
    """Validate what follows an attention container (kept verbatim) and return it dotted."""
    if rest:
        if rest[0] not in ATTENTION_ROOTS:
            raise _Unknown
        if rest[0] == "transformer_blocks":
            _index(rest[1] if len(rest) > 1 else None, layout.max_transformer_depth)
            if len(rest) > 2 and rest[2] not in TRANSFORMER_BLOCK_PARTS:
                raise _Unknown
    return ".".join(rest)


def _to_ldm(tokens: list[str], layout: UnetLayout) -> str:
    n = layout.layers_per_block + 1
    root, rest = tokens[0], tokens[1:]
    if root == "mid_block":
        kind, idx, inner = rest[0], rest[1] if len(rest) > 1 else None, rest[2:]
        if kind == "resnets":
            return _join(f"middle_block.{2 * _index(idx, 2)}", _resnet_leaf(inner, RESNET_LEAVES))
        if kind == "attentions":
            return _join(f"middle_block.{1 + 2 * _index(idx, 1)}", _attention_rest(inner, layout))
        raise _Unknown
    if root not in ("down_blocks", "up_blocks") or len(rest) < 3:
        raise _Unknown
    i = _index(rest[0], layout.levels)
    kind, idx, inner = rest[1], rest[2], rest[3:]
    last = i == layout.levels - 1
    if root == "down_blocks":
        if kind == "resnets":
            block = n * i + _index(idx, layout.layers_per_block) + 1
            return _join(f"input_blocks.{block}.0", _resnet_leaf(inner, RESNET_LEAVES))
        if kind == "attentions" and layout.down_attention[i]:
            block = n * i + _index(idx, layout.layers_per_block) + 1
            return _join(f"input_blocks.{block}.1", _attention_rest(inner, layout))
        if kind == "downsamplers" and not last and idx == "0" and inner == ["conv"]:
            return f"input_blocks.{n * (i + 1)}.0.op"
        raise _Unknown
    if kind == "resnets":
        return _join(f"output_blocks.{n * i + _index(idx, n)}.0", _resnet_leaf(inner, RESNET_LEAVES))
    if kind == "attentions" and layout.up_attention[i]:
        return _join(f"output_blocks.{n * i + _index(idx, n)}.1", _attention_rest(inner, layout))
    if kind == "upsamplers" and not last and idx == "0" and inner == ["conv"]:
        return f"output_blocks.{n * i + n - 1}.{2 if layout.up_attention[i] else 1}.conv"
    raise _Unknown


def _to_diffusers(tokens: list[str], layout: UnetLayout) -> str:
    n = layout.layers_per_block + 1
    root = tokens[0]
    if root == "middle_block":
        k, inner = _index(tokens[1] if len(tokens) > 1 else None, 3), tokens[2:]
        if k == 1:
            return _join("mid_block.attentions.0", _attention_rest(inner, layout))
        return _join(f"mid_block.resnets.{k // 2}", _resnet_leaf(inner, _INV["resnet"]))
    if root not in ("input_blocks", "output_blocks") or len(tokens) < 3:
        raise _Unknown
    inner = tokens[3:]
    if root == "input_blocks":
        block = _index(tokens[1], n * layout.levels)
        if block == 0:
            raise _Unknown  # input_blocks.0.0 (conv_in) is in TOP_LEVEL
        i, j = divmod(block - 1, n)
        k = _index(tokens[2], 2)
        if j < layout.layers_per_block and k == 0:
            return _join(f"down_blocks.{i}.resnets.{j}", _resnet_leaf(inner, _INV["resnet"]))
        if j < layout.layers_per_block and k == 1 and layout.down_attention[i]:
            return _join(f"down_blocks.{i}.attentions.{j}", _attention_rest(inner, layout))
        if j == layout.layers_per_block and k == 0 and inner == ["op"]:
            return f"down_blocks.{i}.downsamplers.0.conv"
        raise _Unknown
    i, j = divmod(_index(tokens[1], n * layout.levels), n)
    k = _index(tokens[2], 3)
    has_attn = layout.up_attention[i]
    if k == 0:
        return _join(f"up_blocks.{i}.resnets.{j}", _resnet_leaf(inner, _INV["resnet"]))
    if k == 1 and has_attn:
        return _join(f"up_blocks.{i}.attentions.{j}", _attention_rest(inner, layout))
    upsampler_slot = 2 if has_attn else 1
    if k == upsampler_slot and j == n - 1 and i < layout.levels - 1 and inner == ["conv"]:
        return f"up_blocks.{i}.upsamplers.0.conv"
    raise _Unknown


def _convert(path: str, family: str, direction: str) -> str:
    layout = unet_layout(family)
    top, text_time = (TOP_LEVEL, TEXT_TIME) if direction == "ldm" else (_INV["top"], _INV["text_time"])
    if path in top:
        return top[path]
    if path in text_time and layout.text_time_embedding:
        return text_time[path]
    try:
        return (_to_ldm if direction == "ldm" else _to_diffusers)(path.split("."), layout)
    except (_Unknown, IndexError):
        spelling = "diffusers" if direction == "ldm" else "LDM"
        raise LoraFormatError(
            f"not a module of the {family} UNet in {spelling} naming",
            key=path,
            hint="check the model family, or that the key names a layer with weights",
        ) from None


def unet_diffusers_to_ldm(path: str, family: str) -> str:
    """``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in`` (module paths, no ``.weight``)."""
    return _convert(path, family, "ldm")


def unet_ldm_to_diffusers(path: str, family: str) -> str:
    """``input_blocks.4.1.proj_in`` → ``down_blocks.1.attentions.0.proj_in`` (module paths, no ``.weight``)."""
    return _convert(path, family, "diffusers")


def is_unet_path(path: str, family: str) -> bool:
    """Whether ``path`` (either spelling) names a module of ``family``'s UNet."""
    for fn in (unet_diffusers_to_ldm, unet_ldm_to_diffusers):
        try:
            fn(path, family)
        except LoraFormatError:
            continue
        return True
    return False
