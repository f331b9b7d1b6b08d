"""Tensor roles shared by every format: split a flat state dict into modules, build layers, and back.

Formats differ in two things only: how a module is named (handled by each format module through
`lora_ops.keymap`) and which suffix spells each tensor role. This module owns the second part, so that a
key is either consumed into a layer or reported — never silently dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..errors import LoraFormatError
from ..lora import Layer, LoRALayer, LycorisLayer

Tensor = torch.Tensor

LYCORIS_PARTS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}

# Suffix → role. Roles: down, up, mid, alpha, dora_scale, or a LyCORIS part name.
KOHYA_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_mid.weight": "mid",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
    **{f".{p}": p for parts in LYCORIS_PARTS.values() for p in parts},
}
PEFT_SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",  # older diffusers spelling
    ".lora.up.weight": "up",
    ".alpha": "alpha",
}
ANY_SUFFIXES = {**KOHYA_SUFFIXES, **PEFT_SUFFIXES}


def split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    """``"a.b.lora_up.weight"`` → ``("a.b", "up")``; None when no known suffix matches."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffixes[suffix]
    return None


def group_by_module(
    keys: Iterable[str], suffixes: Mapping[str, str], prefix: str = ""
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group source keys by module: {module: {role: source_key}}, plus the keys that matched no role.

    Only keys starting with ``prefix`` are considered (the prefix is stripped from the module name).
    """
    modules: dict[str, dict[str, str]] = {}
    unused = []
    for key in keys:
        if not key.startswith(prefix):
            unused.append(key)
            continue
        split = split_key(key[len(prefix) :], suffixes)
        if split is None:
            unused.append(key)
            continue
        module, role = split
        modules.setdefault(module, {})[role] = key
    return modules, unused


def build_layer(roles: Mapping[str, Tensor], *, file: str | None, module: str) -> Layer:
    """Make a layer from its tensors by role; a clear error names the module when parts are missing."""
    alpha = _alpha_value(roles.get("alpha"), file=file, module=module)
    present = set(roles) - {"alpha"}
    for kind, parts in LYCORIS_PARTS.items():
        if present & set(parts):
            if present - set(parts):
                raise LoraFormatError(
                    f"mixes {kind} parts with {sorted(present - set(parts))}", file=file, key=module
                )
            _check_lycoris(kind, present, file=file, module=module)
            return LycorisLayer(kind=kind, parts={p: roles[p] for p in present}, alpha=alpha)
    missing = {"down", "up"} - present
    if missing:
        raise LoraFormatError(f"has no {'/'.join(sorted(missing))} weight", file=file, key=module,
                              hint="the file is incomplete or not a LoRA")
    try:
        return LoRALayer(
            down=roles["down"], up=roles["up"], alpha=alpha, mid=roles.get("mid"), dora_scale=roles.get("dora_scale")
        )
    except LoraFormatError as err:
        raise LoraFormatError(err.reason, file=file, key=module) from None


def _check_lycoris(kind: str, present: set[str], *, file: str | None, module: str) -> None:
    if kind == "loha":
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    else:
        w1 = {"lokr_w1"} if "lokr_w1" in present else {"lokr_w1_a", "lokr_w1_b"}
        w2 = {"lokr_w2"} if "lokr_w2" in present else {"lokr_w2_a", "lokr_w2_b"}
        need = w1 | w2
    if need - present:
        raise LoraFormatError(f"{kind} layer lacks {sorted(need - present)}", file=file, key=module)


def _alpha_value(alpha: Tensor | None, *, file: str | None, module: str) -> float | None:
    if alpha is None:
        return None
    if alpha.numel() != 1:
        raise LoraFormatError(f"alpha must be a scalar, got shape {tuple(alpha.shape)}", file=file, key=module)
    value = float(alpha.float().item())
    if not (value == value and abs(value) != float("inf")):
        raise LoraFormatError("alpha is NaN/Inf", file=file, key=module)
    return value


def alpha_tensor(alpha: float, like: Tensor) -> Tensor:
    """Alpha as a 0-d tensor in the weights' dtype when that is exact (kohya's habit), else fp32."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    t = torch.tensor(alpha, dtype=dtype)
    if float(t.float().item()) != alpha:
        t = torch.tensor(alpha, dtype=torch.float32)
    return t


def layer_tensors(layer: Layer, style: str) -> dict[str, Tensor]:
    """A layer's tensors by file suffix, in ``style`` "kohya" (lora_down/up) or "peft" (lora_A/B)."""
    out: dict[str, Tensor] = {}
    if isinstance(layer, LycorisLayer):
        if style != "kohya":
            raise LoraFormatError(f"a LyCORIS {layer.kind} layer cannot be written in a {style}-style file",
                                  hint="write kohya or comfyui format, or resize it to a plain LoRA first")
        out.update({f".{name}": t for name, t in layer.parts.items()})
        like = next(iter(layer.parts.values()))
    else:
        if style == "kohya":
            out[".lora_down.weight"] = layer.down
            out[".lora_up.weight"] = layer.up
            if layer.mid is not None:
                out[".lora_mid.weight"] = layer.mid
            if layer.dora_scale is not None:
                out[".dora_scale"] = layer.dora_scale
        else:
            if layer.mid is not None or layer.dora_scale is not None:
                raise LoraFormatError(f"Tucker/DoRA layers cannot be written in a {style}-style file",
                                      hint="write kohya or comfyui format")
            out[".lora_A.weight"] = layer.down
            out[".lora_B.weight"] = layer.up
        like = layer.down
    if layer.alpha is not None and style == "kohya":
        out[".alpha"] = alpha_tensor(layer.alpha, like)
    return out
