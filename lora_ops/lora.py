"""The LoRA value: named low-rank layers plus file metadata.

Every LoRA Ops operation takes `LoRA` values and returns new ones; nothing mutates its input. Layers are keyed by
canonical module names (see `lora_ops.keymap`): ``unet.<original/LDM module path>`` for the denoiser and
``te1.`` / ``te2.`` + the transformers module path (``text_model.encoder.layers.N.self_attn.q_proj``) for text
encoders. The ΔW of a layer is added to the weight ``<module>.weight``.

Naming follows PEFT: A = ``down`` (r×k, conv r×in×kh×kw), B = ``up`` (d×r, conv out×r×1×1).
ΔW = (alpha / r) · B · A, computed in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch

from .errors import LoraFormatError

Tensor = torch.Tensor


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
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            raise LoraFormatError(
                f"down/up must be 2-D (linear) or 4-D (conv), got {tuple(self.down.shape)} and {tuple(self.up.shape)}"
            )
        r_down, r_up = self.down.shape[0], self.up.shape[1]
        if r_down != r_up:
            raise LoraFormatError(f"mismatched ranks: down has rank {r_down}, up has rank {r_up}")
        if r_down == 0:
            raise LoraFormatError("rank 0: the layer has no components")
        if self.mid is not None and tuple(self.mid.shape[:2]) != (r_down, r_down):
            raise LoraFormatError(f"Tucker mid {tuple(self.mid.shape)} does not match rank {r_down}")

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
        if self.kind not in ("loha", "lokr"):
            raise LoraFormatError(f"unknown LyCORIS layer kind '{self.kind}'")
        object.__setattr__(self, "parts", MappingProxyType(dict(self.parts)))

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
        return torch.kron(w1, w2) * self.scale

    def scaled(self, weight: float) -> LycorisLayer:
        if weight == 1.0:
            return self
        name = {"loha": "hada_w1_a", "lokr": "lokr_w1" if "lokr_w1" in self.parts else "lokr_w1_a"}[self.kind]
        parts = dict(self.parts)
        parts[name] = (parts[name].float() * weight).to(parts[name].dtype)
        return replace(self, parts=parts)


def _tucker_or_matmul(t: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    if t is None:
        return a @ b  # (out, in·kh·kw)
    # LyCORIS Tucker: t (r, r, kh, kw), a (r, out), b (r, in)
    return torch.einsum("ijkl,jr,ip->prkl", t, b, a)  # (out, in, kh, kw)


Layer = LoRALayer | LycorisLayer


@dataclass(frozen=True)
class LoRA:
    """A LoRA adapter: canonical module name → layer, plus str→str file metadata.

    ``family`` is the model family the keys were written for ("sd1", "sdxl", or None when unknown);
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
