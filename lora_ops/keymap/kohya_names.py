"""kohya's flat module names: the dotted module path with every '.' replaced by '_'.

Flattening loses the split between a module name's own underscores (``to_q``, ``proj_in``) and the dots.
Unflattening splits on '_' and re-joins pieces greedily into the longest compound name from a vocabulary of
the module names that contain underscores; everything else becomes its own dotted component.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import LoraFormatError, LoraValueError

# Module-name components that contain '_', by where they occur. A new family adds its own tuple here
# (or calls `register_compound_tokens`); nothing else changes.
SD_UNET_DIFFUSERS = (
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "time_emb_proj", "conv_shortcut",
)  # fmt: skip
SD_UNET_LDM = (
    "input_blocks", "output_blocks", "middle_block", "time_embed", "label_emb",
    "in_layers", "out_layers", "emb_layers", "skip_connection",
)  # fmt: skip
SD_TRANSFORMER = ("transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out")
CLIP_TEXT = (
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
    "final_layer_norm", "token_embedding", "position_embedding", "text_projection",
)  # fmt: skip

T5_TEXT = ("wi_0", "wi_1", "layer_norm", "final_layer_norm", "relative_attention_bias")

_COMPOUNDS: set[str] = set()
_MAX_PIECES = 1


def register_compound_tokens(tokens: Iterable[str]) -> None:
    """Add module-name components containing '_' to the unflattening vocabulary."""
    global _MAX_PIECES
    for token in tokens:
        if "." in token or "_" not in token or "" in token.split("_"):
            raise LoraValueError(f"not a compound module-name component: {token!r}")
        _COMPOUNDS.add(token)
        _MAX_PIECES = max(_MAX_PIECES, token.count("_") + 1)


register_compound_tokens(SD_UNET_DIFFUSERS + SD_UNET_LDM + SD_TRANSFORMER + CLIP_TEXT + T5_TEXT)


def compound_tokens() -> frozenset[str]:
    return frozenset(_COMPOUNDS)


def dotted_to_kohya(path: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` → ``down_blocks_0_attentions_0_proj_in``."""
    return path.replace(".", "_")


def kohya_to_dotted(flat: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` → ``down_blocks.0.attentions.0.proj_in`` (longest compound first)."""
    pieces = flat.split("_")
    if "" in pieces:
        raise LoraFormatError("empty component in a kohya module name", key=flat)
    out: list[str] = []
    i = 0
    while i < len(pieces):
        for n in range(min(_MAX_PIECES, len(pieces) - i), 0, -1):
            token = "_".join(pieces[i : i + n])
            if n == 1 or token in _COMPOUNDS:
                out.append(token)
                i += n
                break
    return ".".join(out)
