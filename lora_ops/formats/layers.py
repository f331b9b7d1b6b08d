"""Tensor roles shared by every format: split a flat state dict into modules, build layers, and back.

Formats differ in two things only: how a module is named (handled by each format module through
`lora_ops.keymap`) and which suffix spells each tensor role. This module owns the second part, so that a
key is either consumed into a layer or reported — never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ..errors import LoraFormatError
from ..lora import COMPUTE_DTYPES, LYCORIS_PARTS, Layer, LoRALayer, LycorisLayer

Tensor = torch.Tensor


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
    ".lora_A.default.weight": "down",  # PEFT's adapter name left in (Qwen-Image, Z-Image trainers)
    ".lora_B.default.weight": "up",
    ".alpha": "alpha",
}
ANY_SUFFIXES = {**KOHYA_SUFFIXES, **PEFT_SUFFIXES}


FULL_DELTAS = (".diff", ".diff_b")  # ComfyUI's full-weight and bias deltas (distillation LoRAs, e.g. Wan lightx2v)


def why_unused(unused: list[str]) -> str | None:
    """The reason to give when a strict read leaves full-weight deltas over (shared by the kohya-style readers)."""
    extra = sorted(k for k in unused if k.endswith(FULL_DELTAS))
    if not extra:
        return None
    return (f"{len(extra)} tensor(s) are full-weight or bias deltas (.diff / .diff_b, as distillation LoRAs ship "
            f"them; e.g. {extra[0]}), not LoRA factors; LoRA Ops does not apply those yet, and loading the file "
            "without them would change what it does")


def split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    """``"a.b.lora_up.weight"`` → ``("a.b", "up")``; None when no known suffix matches."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffixes[suffix]
    return None


def group_by_module(
    keys: Iterable[str], suffixes: Mapping[str, str], prefix: str = "", *, file: str | None = None
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group source keys by module: {module: {role: source_key}}, plus the keys that matched no role.

    Only keys starting with ``prefix`` are considered (the prefix is stripped from the module name). Two keys
    giving one module the same role (``x.lora_A.weight`` and ``x.lora.down.weight``) are an error naming both:
    keeping either would silently drop the other.
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
        roles = modules.setdefault(module, {})
        if role in roles:
            raise LoraFormatError(
                f"is the {role} of module '{module}' a second time (also given by '{roles[role]}')",
                file=file, key=key, hint="the file spells one tensor two ways; remove one of the two keys",
            )
        roles[role] = key
    return modules, unused


class LayerTable:
    """The layers one reader builds, by canonical key — the one place every reader inserts a layer.

    Two source modules that land on the same canonical key (kohya's diffusers- and LDM-spelled UNet names for one
    module, ``lora_te_`` and ``lora_te1_``, a text-encoder path with and without ``text_model.``) are an error
    naming a key of each: a dict insert would silently keep one and drop the other.
    """

    def __init__(self, tensors: Mapping[str, Tensor], *, file: str | None) -> None:
        self.tensors = tensors
        self.file = file
        self.layers: dict[str, Layer] = {}
        self._origin: dict[str, str] = {}

    def add(self, key: str, module: str, roles: Mapping[str, str], *, alpha: float | None = None) -> Layer:
        """Build the layer of ``module`` from its source keys by role and insert it under canonical ``key``.

        ``alpha`` is used when the module has no alpha tensor (diffusers/PEFT config alphas).
        """
        origin = roles.get("down") or min(roles.values())
        if key in self._origin:
            raise LoraFormatError(
                f"is the same layer '{key}' as '{self._origin[key]}' (one module spelled two ways in one file; "
                "loading both would silently drop one)",
                file=self.file, key=origin, hint="remove one of the two copies",
            )
        layer = build_layer({r: self.tensors[k] for r, k in roles.items()}, file=self.file, module=module,
                            sources=roles, alpha=alpha)
        self.layers[key] = layer
        self._origin[key] = origin
        return layer


def build_layer(
    roles: Mapping[str, Tensor],
    *,
    file: str | None,
    module: str,
    sources: Mapping[str, str] | None = None,
    alpha: float | None = None,
) -> Layer:
    """Make a layer from its tensors by role; a clear error names the module when parts are missing.

    Every factor is validated here, once (`LoRALayer` / `LycorisLayer` check dtype, ndim and that the shapes
    multiply); an error names the source key of the offending tensor (``sources``: role → key) or the module.
    ``alpha`` is the layer's alpha when ``roles`` has no alpha tensor.
    """
    sources = sources or {}
    if "alpha" in roles:
        alpha = _alpha_value(roles["alpha"], file=file, key=sources.get("alpha", module))
    present = set(roles) - {"alpha"}
    try:
        for kind, parts in LYCORIS_PARTS.items():
            if present & set(parts):
                if present - set(parts):
                    raise LoraFormatError(f"mixes {kind} parts with {sorted(present - set(parts))}")
                return LycorisLayer(kind=kind, parts={p: roles[p] for p in present}, alpha=alpha)
        missing = {"down", "up"} - present
        if missing:
            raise LoraFormatError(f"has no {'/'.join(sorted(missing))} weight",
                                  hint="the file is incomplete or not a LoRA")
        return LoRALayer(down=roles["down"], up=roles["up"], alpha=alpha, mid=roles.get("mid"),
                         dora_scale=roles.get("dora_scale"))
    except LoraFormatError as err:
        key = sources.get(err.key, module) if err.key else module
        raise LoraFormatError(err.reason, file=file, key=key, hint=err.hint) from None


def _alpha_value(alpha: Tensor, *, file: str | None, key: str) -> float:
    """The value of alpha tensor ``key``: one element of a real numeric dtype, finite."""
    dtype = alpha.dtype
    if dtype == torch.bool or dtype.is_complex or (dtype.is_floating_point and dtype not in COMPUTE_DTYPES):
        raise LoraFormatError(f"alpha has dtype {str(dtype).removeprefix('torch.')}, not a real number type",
                              file=file, key=key)
    if alpha.numel() != 1:
        raise LoraFormatError(f"alpha must be a scalar, got shape {tuple(alpha.shape)}", file=file, key=key)
    try:
        value = float(alpha.detach().double().item())
    except (RuntimeError, NotImplementedError, TypeError) as err:
        raise LoraFormatError(f"alpha of dtype {dtype} cannot be read ({err})", file=file, key=key) from None
    if not math.isfinite(value):
        raise LoraFormatError("alpha is NaN/Inf", file=file, key=key)
    return value


def alpha_tensor(alpha: float, like: Tensor) -> Tensor:
    """Alpha as a 0-d tensor in the first dtype that holds it exactly: the weights' (kohya's habit), fp32, fp64.

    Exact, so a file reads back to the same ΔW scale: alphas our operations compute (rsLoRA's alpha·√r, rescaled
    fused layers) or read from JSON configs need not fit fp32, and one beyond its range would become Inf.
    """
    dtype = like.dtype if like.is_floating_point() else torch.float32
    for candidate in (dtype, torch.float32):
        t = torch.tensor(alpha, dtype=candidate)
        if float(t.double().item()) == alpha:
            return t
    return torch.tensor(alpha, dtype=torch.float64)


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
