"""The LoRA value: named low-rank layers plus file metadata.

Every LoRA Ops operation takes `LoRA` values and returns new ones; nothing mutates its input. Layers are keyed by
canonical module names (see `lora_ops.families`): ``unet.<original module path>`` for the denoiser (LDM paths for
SD UNets, BFL names for FLUX.1, ComfyUI's names for Z-Image) and ``te1.`` / ``te2.`` / ``te3.`` + the transformers
module path (``text_model.encoder.layers.N.self_attn.q_proj``, ``encoder.block.N.layer.0.SelfAttention.q``) for
text encoders. The ΔW of a layer is added to the weight ``<module>.weight``, or, for a key
``unet.<module>[<part>]``, to that part's rows of a fused weight (`lora_ops.fused`).

Naming follows PEFT: A = ``down`` (r×k, conv r×in×kh×kw), B = ``up`` (d×r, conv out×r×1×1).
ΔW = (alpha / r) · B · A, computed in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from numbers import Real
from types import MappingProxyType

import torch

from .errors import LoraFormatError

Tensor = torch.Tensor

COMPUTE_DTYPES: frozenset[torch.dtype] = frozenset(
    getattr(torch, name)
    for name in ("float16", "bfloat16", "float32", "float64",
                 "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
)
"""Factor dtypes a layer accepts: every op upcasts them (``.to(float32)``) before computing.

Refused: integers, bool and complex (not weights: ΔW would be rounded or complex), float4_e2m1fn_x2 (torch cannot
convert it to anything) and float8_e8m0fnu (a power-of-two *scale* format with no sign and no zero, used beside
MX-quantised weights, never a weight itself).
"""


def check_factor(role: str, t: object, ndims: tuple[int, ...], *, nonempty: bool = True) -> Tensor:
    """Refuse a factor that no op could compute with: not a tensor, wrong dtype or ndim, an empty dimension.

    Errors carry ``key=role`` (``"down"``, ``"hada_w1_a"`` …); readers replace it with the file's key.
    """
    if not isinstance(t, torch.Tensor):
        raise LoraFormatError(f"{role} must be a tensor, got {type(t).__name__}", key=role)
    if t.dtype not in COMPUTE_DTYPES:
        raise LoraFormatError(
            f"{role} has dtype {str(t.dtype).removeprefix('torch.')}, not a floating dtype LoRA weights can use",
            key=role, hint="supported: " + ", ".join(sorted(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)),
        )
    if t.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise LoraFormatError(f"{role} must be {want}, got shape {tuple(t.shape)}", key=role)
    if nonempty:
        check_nonempty(role, t)
    return t


def check_nonempty(role: str, t: Tensor) -> None:
    if t.numel() == 0:
        raise LoraFormatError(f"{role} has an empty dimension: shape {tuple(t.shape)}", key=role)


def check_alpha(alpha: object) -> float | None:
    """alpha as a finite float (None stays None); bool, non-numbers and NaN/±Inf are refused."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise LoraFormatError(f"alpha must be a number, got {type(alpha).__name__}", key="alpha")
    try:
        value = float(alpha)
    except OverflowError:  # an int beyond float range
        value = math.inf
    if not math.isfinite(value):
        raise LoraFormatError(f"alpha must be finite, got {value}", key="alpha")
    return value


@dataclass(frozen=True)
class LoRALayer:
    """A classic LoRA / LoCon layer: ΔW = (alpha/r) · up · [mid ·] down.

    ``mid`` is the Tucker core of a LyCORIS/kohya conv layer (r×r×kh×kw, with down r×in×1×1 and up out×r×1×1).
    ``dora_scale`` is the DoRA magnitude vector; it is carried through conversions but needs the base weight to
    apply, so `delta` ignores it.
    """

    down: Tensor
    up: Tensor
    alpha: float | None = None
    mid: Tensor | None = None
    dora_scale: Tensor | None = None

    def __post_init__(self) -> None:
        """Every factor checked once, when the layer is made, so that `delta` and linalg cannot fail in torch."""
        check_factor("down", self.down, (2, 4), nonempty=False)
        check_factor("up", self.up, (2, 4), nonempty=False)
        r_down, r_up = self.down.shape[0], self.up.shape[1]
        if r_down != r_up:
            raise LoraFormatError(f"mismatched ranks: down has rank {r_down}, up has rank {r_up}")
        if r_down == 0:
            raise LoraFormatError("rank 0: the layer has no components")
        check_nonempty("down", self.down)  # after the rank checks, whose messages say more about rank 0
        check_nonempty("up", self.up)
        if self.up.ndim == 4 and tuple(self.up.shape[2:]) != (1, 1):
            raise LoraFormatError(f"up of a conv layer must be out×r×1×1, got {tuple(self.up.shape)}", key="up")
        if self.mid is not None:
            check_factor("mid", self.mid, (4,))
            if tuple(self.mid.shape[:2]) != (r_down, r_down):
                raise LoraFormatError(f"Tucker mid {tuple(self.mid.shape)} does not match rank {r_down}", key="mid")
            if self.down.ndim != 4 or tuple(self.down.shape[2:]) != (1, 1):
                raise LoraFormatError(
                    f"with a Tucker mid, down must be r×in×1×1, got {tuple(self.down.shape)}", key="down"
                )
        if self.dora_scale is not None:
            check_factor("dora_scale", self.dora_scale, (1, 2, 3, 4))
            sizes = {int(self.up.shape[0]), int(self.down.shape[1])}
            if self.dora_scale.numel() not in sizes:
                raise LoraFormatError(
                    f"dora_scale of shape {tuple(self.dora_scale.shape)} fits neither the {self.up.shape[0]} outputs "
                    f"nor the {self.down.shape[1]} inputs of the layer", key="dora_scale",
                )
        object.__setattr__(self, "alpha", check_alpha(self.alpha))

    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r; alpha None means alpha = r (diffusers/PEFT files without alpha)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape of ΔW, (out, in) or (out, in, kh, kw), read from the factors without forming ΔW."""
        kernel = self.mid.shape[2:] if self.mid is not None else self.down.shape[2:]
        return (int(self.up.shape[0]), int(self.down.shape[1]), *map(int, kernel))

    def tensors(self) -> dict[str, Tensor]:
        """The layer's tensors by role (for casting, counting and hashing)."""
        out = {"down": self.down, "up": self.up}
        if self.mid is not None:
            out["mid"] = self.mid
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    def with_tensors(self, tensors: Mapping[str, Tensor]) -> LoRALayer:
        return replace(self, **tensors)

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full ΔW (out, in) or (out, in, kh, kw). Forms a d×k matrix: use linalg for anything rank-shaped."""
        down = self.down.to(dtype)
        up = self.up.to(dtype).flatten(1)  # (out, r)
        if self.mid is not None:
            mid = self.mid.to(dtype)  # (r, r, kh, kw)
            core = torch.einsum("ijkl,jc->ickl", mid, down.flatten(1))  # (r, in, kh, kw)
            out = torch.einsum("or,rckl->ockl", up, core)  # (out, in, kh, kw)
            return out * self.scale
        flat = up @ down.flatten(1)  # (out, in·kh·kw)
        if self.is_conv:
            flat = flat.reshape(up.shape[0], *down.shape[1:])  # (out, in, kh, kw)
        return flat * self.scale

    def scaled(self, weight: float) -> LoRALayer:
        """The same layer with its ΔW multiplied by ``weight`` (folded into ``up``)."""
        if weight == 1.0:
            return self
        return replace(self, up=(self.up.float() * weight).to(self.up.dtype))


@dataclass(frozen=True)
class LycorisLayer:
    """A LyCORIS LoHa or LoKr layer, kept in its own factors (read-only formats).

    LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r.  LoKr: ΔW = (w1 ⊗ w2) · alpha/r when a factor is decomposed.
    These have no cheap low-rank factorisation, so linalg forms their ΔW per layer. The ΔW of a conv layer
    whose factors are flattened comes out 2-D; hosts reshape it to the weight's shape.
    """

    kind: str  # "loha" | "lokr"
    parts: Mapping[str, Tensor]  # LyCORIS names without the module prefix, e.g. "hada_w1_a"
    alpha: float | None = None

    def __post_init__(self) -> None:
        """Parts, dtypes and shapes checked once, when the layer is made, so that `delta` cannot fail in torch."""
        if self.kind not in ("loha", "lokr"):
            raise LoraFormatError(f"unknown LyCORIS layer kind '{self.kind}'")
        object.__setattr__(self, "parts", MappingProxyType(dict(self.parts)))
        object.__setattr__(self, "_delta_shape", lycoris_delta_shape(self.kind, self.parts))
        object.__setattr__(self, "alpha", check_alpha(self.alpha))

    @property
    def rank(self) -> int:
        p = self.parts
        if self.kind == "loha":
            return int(p["hada_w1_b"].shape[0])
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in p:
                return int(p[name].shape[0])
        return 0  # full Kronecker factors: no rank, scale 1

    @property
    def scale(self) -> float:
        r = self.rank
        if self.alpha is None or r == 0:
            return 1.0
        return float(self.alpha) / r

    @property
    def is_conv(self) -> bool:
        return any(t.ndim == 4 for t in self.parts.values())

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The shape `delta` returns (checked from the parts when the layer was made; ΔW is not formed)."""
        return self._delta_shape  # type: ignore[attr-defined]

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.parts)

    def with_tensors(self, tensors: Mapping[str, Tensor]) -> LycorisLayer:
        return replace(self, parts=tensors)

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        p = {k: v.to(dtype) for k, v in self.parts.items()}
        if self.kind == "loha":
            w1 = _tucker_or_matmul(p.get("hada_t1"), p["hada_w1_a"], p["hada_w1_b"])
            w2 = _tucker_or_matmul(p.get("hada_t2"), p["hada_w2_a"], p["hada_w2_b"])
            return w1 * w2 * self.scale
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        else:
            w2 = _tucker_or_matmul(p.get("lokr_t2"), p["lokr_w2_a"], p["lokr_w2_b"])
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]  # (a, b, 1, 1): kron over channel dims only
        # contiguous: torch.kron views its inputs, which fails on the permuted einsum output of a Tucker w2
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale

    def scaled(self, weight: float) -> LycorisLayer:
        if weight == 1.0:
            return self
        name = {"loha": "hada_w1_a", "lokr": "lokr_w1" if "lokr_w1" in self.parts else "lokr_w1_a"}[self.kind]
        parts = dict(self.parts)
        parts[name] = (parts[name].float() * weight).to(parts[name].dtype)
        return replace(self, parts=parts)


LYCORIS_PARTS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}


def lycoris_delta_shape(kind: str, parts: Mapping[str, Tensor]) -> tuple[int, ...]:
    """The shape `LycorisLayer.delta` will return, or a `LoraFormatError` naming the part that does not fit.

    Checks each part's dtype and ndim, that exactly one spelling of each factor is present (a full ``lokr_w1``
    *and* ``lokr_w1_a``/``_b`` would leave one unused), and that the factors multiply: LoHa's two Hadamard
    factors must have the same shape (torch would otherwise broadcast them into something else or fail).
    """
    names = LYCORIS_PARTS[kind]
    unknown = sorted(set(parts) - set(names))
    if unknown:
        raise LoraFormatError(f"{kind} layer has unknown parts {unknown}", key=unknown[0])
    present = set(parts)

    def need(*required: str) -> None:
        if set(required) - present:
            raise LoraFormatError(f"{kind} layer lacks {sorted(set(required) - present)}")

    if kind == "loha":
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        w1 = _factor_shape(parts, "hada_w1_a", "hada_w1_b", "hada_t1")
        w2 = _factor_shape(parts, "hada_w2_a", "hada_w2_b", "hada_t2")
        if w1 != w2:
            raise LoraFormatError(f"loha factors do not match: w1a·w1b is {w1}, w2a·w2b is {w2}", key="hada_w2_a")
        return w1
    for full, a, b in (("lokr_w1", "lokr_w1_a", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a", "lokr_w2_b")):
        if full in present and present & {a, b}:
            raise LoraFormatError(f"lokr layer has both {full} and {sorted(present & {a, b})}: one would be unused",
                                  key=full)
        if full not in present:
            need(a, b)
    if "lokr_t2" in present and "lokr_w2" in present:
        raise LoraFormatError("lokr layer has both lokr_t2 and a full lokr_w2: lokr_t2 would be unused", key="lokr_t2")
    if "lokr_w1" in present:
        w1 = tuple(check_factor("lokr_w1", parts["lokr_w1"], (2,)).shape)
    else:
        w1 = _factor_shape(parts, "lokr_w1_a", "lokr_w1_b", None)
    if "lokr_w2" in present:
        w2 = tuple(check_factor("lokr_w2", parts["lokr_w2"], (2, 4)).shape)
    else:
        w2 = _factor_shape(parts, "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    if len(w2) == 4:
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    return (w1[0] * w2[0], w1[1] * w2[1])


def _factor_shape(parts: Mapping[str, Tensor], a: str, b: str, t: str | None) -> tuple[int, ...]:
    """Shape of ``a @ b`` (2-D factors), or of the Tucker product when part ``t`` is present."""
    ta = check_factor(a, parts[a], (2,))
    tb = check_factor(b, parts[b], (2,))
    if t is not None and t in parts:
        tt = check_factor(t, parts[t], (4,))
        # LyCORIS Tucker: t (r1, r2, kh, kw), a (r1, out), b (r2, in) → (out, in, kh, kw)
        if tt.shape[0] != ta.shape[0] or tt.shape[1] != tb.shape[0]:
            raise LoraFormatError(f"Tucker core {t} {tuple(tt.shape)} does not fit {a} {tuple(ta.shape)} and "
                                  f"{b} {tuple(tb.shape)}", key=t)
        return (int(ta.shape[1]), int(tb.shape[1]), *map(int, tt.shape[2:]))
    if ta.shape[1] != tb.shape[0]:
        raise LoraFormatError(f"{a} {tuple(ta.shape)} and {b} {tuple(tb.shape)} do not multiply", key=b)
    return (int(ta.shape[0]), int(tb.shape[1]))


def _tucker_or_matmul(t: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    if t is None:
        return a @ b  # (out, in·kh·kw)
    # LyCORIS Tucker: t (r, r, kh, kw), a (r, out), b (r, in)
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a)  # (out, in, kh, kw)


Layer = LoRALayer | LycorisLayer


@dataclass(frozen=True)
class LoRA:
    """A LoRA adapter: canonical module name → layer, plus str→str file metadata.

    ``family`` is the model family the keys were written for (a `lora_ops.families` id, or None when the keys
    fit several families equally);
    ``source_format`` records which reader produced it (informational only).
    """

    layers: Mapping[str, Layer]
    metadata: Mapping[str, str] = field(default_factory=dict)
    family: str | None = None
    source_format: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        bad = {k: v for k, v in self.metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
        if bad:
            raise LoraFormatError(f"metadata must map str to str, got {sorted(map(repr, bad))[:3]}")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __getitem__(self, key: str) -> Layer:
        return self.layers[key]

    def replace(self, **changes: object) -> LoRA:
        """A new LoRA with some fields changed (the value itself stays untouched)."""
        return replace(self, **changes)

    def map_layers(self, fn: Callable[[str, Layer], Layer | None]) -> LoRA:
        """Apply ``fn(key, layer)`` to every layer; a None result drops the layer."""
        out = {}
        for key, layer in self.layers.items():
            new = fn(key, layer)
            if new is not None:
                out[key] = new
        return replace(self, layers=out)


def delta(layer: Layer, dtype: torch.dtype = torch.float32) -> Tensor:
    """The full ΔW of one layer, alpha/r scaling included, in ``dtype`` (fp32 by default)."""
    return layer.delta(dtype)


def part_of(key: str) -> str:
    """Which model part a canonical key belongs to: "unet", "te1", "te2" …"""
    return key.split(".", 1)[0]


def is_text_encoder_key(key: str) -> bool:
    return part_of(key).startswith("te")


MAX_STRENGTH = 100.0
"""Largest |strength| the CLI (``FILE:w[:w_text]``) and the Stack node accept. ComfyUI's own LoraLoader stops at
±100, and a LoRA at 100× its trained strength already turns an image into noise: a larger number is a typo
(``1e9`` for ``1e-9``, a lost decimal point), refused before anything is loaded or written."""


def scale(lora: LoRA, weight: float, weight_text: float | None = None) -> LoRA:
    """Multiply every ΔW by ``weight`` (text-encoder layers by ``weight_text`` when given)."""
    wt = weight if weight_text is None else weight_text
    return lora.map_layers(lambda k, layer: layer.scaled(wt if is_text_encoder_key(k) else weight))


def filter_layers(lora: LoRA, keep: Callable[[str], bool] | str | tuple[str, ...]) -> LoRA:
    """Keep the layers whose key passes ``keep`` (a predicate, or a key prefix / tuple of prefixes)."""
    pred = keep if callable(keep) else (lambda k: k.startswith(keep))
    return lora.map_layers(lambda k, layer: layer if pred(k) else None)


def ranks(lora: LoRA) -> dict[str, int]:
    return {k: layer.rank for k, layer in lora.layers.items()}


def cast(lora: LoRA, dtype: torch.dtype) -> LoRA:
    """Every tensor in ``dtype`` (alpha is a Python float and keeps its value)."""
    return lora.map_layers(lambda _k, layer: layer.with_tensors({n: t.to(dtype) for n, t in layer.tensors().items()}))


def num_params(lora: LoRA) -> int:
    return sum(t.numel() for layer in lora.layers.values() for t in layer.tensors().values())


def nbytes(lora: LoRA) -> int:
    """Bytes of tensor data (what the file's payload will weigh, alphas aside)."""
    return sum(t.numel() * t.element_size() for layer in lora.layers.values() for t in layer.tensors().values())


def dtypes(lora: LoRA) -> set[torch.dtype]:
    return {t.dtype for layer in lora.layers.values() for t in layer.tensors().values()}


def equal(a: LoRA, b: LoRA, *, metadata: bool = True) -> bool:
    """Bit-for-bit equality of two LoRAs: same keys, kinds, alphas, tensors (dtype, shape, bytes)."""
    if set(a.layers) != set(b.layers):
        return False
    if metadata and dict(a.metadata) != dict(b.metadata):
        return False
    for key, la in a.layers.items():
        lb = b.layers[key]
        if type(la) is not type(lb) or la.alpha != lb.alpha or la.kind != lb.kind:
            return False
        ta, tb = la.tensors(), lb.tensors()
        if set(ta) != set(tb):
            return False
        for name, t in ta.items():
            u = tb[name]
            if t.dtype != u.dtype or t.shape != u.shape or not torch.equal(t, u):
                return False
    return True
