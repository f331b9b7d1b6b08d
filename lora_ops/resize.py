"""Rank-Resize: a LoRA → the same LoRA at smaller (fixed or per-layer dynamic) ranks, exactly and without ΔW.

Each layer's SVD comes from its factors (`lora_ops.linalg`), a rank rule (`lora_ops.rank_rules`) picks k, and the
truncated ΔW_k — the Eckart–Young optimum — is written back as up = U_k·√(σ/ρ), down = √(σ/ρ)·V_kᵀ.

Alpha semantics: the alpha/rank ratio ρ of every layer is kept (new alpha = ρ·k; a layer without alpha stays
without, i.e. alpha = rank, ρ = 1). So ``(alpha/r)·up·down`` is the truncated ΔW at the same strength, and the
file means what kohya's resize makes of it (kohya also keeps the ratio), and training continued from it sees the
same alpha/rank scale. LoHa/LoKr layers become plain LoRA layers with alpha = rank (ρ = 1).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import lora as L
from . import safe_json
from .errors import LoraFormatError
from .linalg import FactoredSVD, layer_svd
from .lora import Layer, LoRA, LoRALayer
from .progress import Progress, track
from .rank_rules import RankRule, as_rule, choose_rank, choose_ranks

log = logging.getLogger(__name__)

Tensor = torch.Tensor
STALE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")  # hashes of the source file's bytes
HEADER_BYTES_PER_TENSOR = 200  # safetensors header entry (name, dtype, shape, offsets): an upper estimate
METADATA_SLACK = 512  # room for what resize/combine add to the metadata (comment, dims)


@dataclass(frozen=True)
class LayerReport:
    """What one layer kept: ranks, retained energy, and every singular value of its ΔW."""

    key: str
    kind: str  # source kind: "lora", "dora", "loha", "lokr" (combine: "mixed" when sources differ)
    shape: tuple[int, ...]  # ΔW shape
    old_rank: int  # combine: the sum of the sources' ranks
    new_rank: int  # 0: dropped
    fro_retained_pct: float  # 100·‖ΔW_k‖_F / ‖ΔW‖_F
    sum_retained_pct: float  # 100·Σ_{i<k} σᵢ / Σσ
    max_ratio: float | None  # σ₀ / σ_{k-1}; None when σ_{k-1} = 0
    error_fro: float  # ‖ΔW − ΔW_k‖_F = √(Σ discarded σ²), the Eckart–Young optimum
    singular_values: tuple[float, ...] = ()
    sources: tuple[int, ...] = ()  # combine: which inputs had this layer

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("shape", "singular_values", "sources"):
            out[name] = list(out[name])
        return out


@dataclass(frozen=True)
class ResizeReport:
    rule: str
    conv_rule: str | None
    layers: tuple[LayerReport, ...]
    old_bytes: int
    new_bytes: int
    old_ranks: Mapping[str, int] = field(default_factory=dict, repr=False)

    @property
    def dropped(self) -> list[str]:
        return [r.key for r in self.layers if r.new_rank == 0]

    @property
    def mean_fro_retained_pct(self) -> float:
        kept = [r.fro_retained_pct for r in self.layers]
        return sum(kept) / len(kept) if kept else 100.0

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "conv_rule": self.conv_rule,
            "old_bytes": self.old_bytes,
            "new_bytes": self.new_bytes,
            "mean_fro_retained_pct": self.mean_fro_retained_pct,
            "dropped": self.dropped,
            "layers": [r.to_dict() for r in self.layers],
        }

    def summary(self) -> str:
        return summary_text(self.layers, self.old_bytes, self.new_bytes, f"resize ({self.rule})")


def layer_report(
    key: str, kind: str, sv: Tensor, shape: tuple[int, ...], old_rank: int, new_rank: int, sources: Sequence[int] = ()
) -> LayerReport:
    s = sv.double().cpu()
    sq = s.square()
    total_sq, total = float(sq.sum()), float(s.sum())
    kept_sq, kept = float(sq[:new_rank].sum()), float(s[:new_rank].sum())
    last = float(s[new_rank - 1]) if new_rank >= 1 else 0.0
    return LayerReport(
        key=key,
        kind=kind,
        shape=tuple(shape),
        old_rank=old_rank,
        new_rank=new_rank,
        fro_retained_pct=100.0 * math.sqrt(kept_sq / total_sq) if total_sq > 0 else 100.0 * (new_rank > 0),
        sum_retained_pct=100.0 * kept / total if total > 0 else 100.0 * (new_rank > 0),
        max_ratio=float(s[0]) / last if last > 0 else None,
        error_fro=math.sqrt(max(total_sq - kept_sq, 0.0)) if new_rank < len(s) else 0.0,
        singular_values=tuple(s.tolist()),
        sources=tuple(sources),
    )


def resize(
    lora: LoRA,
    rule: RankRule | str | int,
    *,
    conv_rule: RankRule | str | int | None = None,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    drop_zero: bool = False,
    progress: Progress = False,
) -> tuple[LoRA, ResizeReport]:
    """The LoRA at the ranks ``rule`` picks (``conv_rule`` for conv kernels larger than 1×1), and what was kept.

    ``dtype``: of the output tensors (default: each layer's own). ``compute_dtype``: fp32, or fp64 for more digits.
    ``drop_zero``: drop layers whose ΔW is zero instead of keeping them at rank 1. A rule may also be given as a
    whole number (fixed rank) or a string such as ``"sv_fro:0.9"`` (see `rank_rules.parse_rule`).
    """
    rule = as_rule(rule)
    conv_rule = as_rule(conv_rule, "conv_rule") if conv_rule is not None else None
    rules = {key: _rule_for(layer, rule, conv_rule) for key, layer in lora.layers.items()}
    layers: dict[str, Layer] = {}
    reports: list[LayerReport] = []
    if not any(r.is_global for r in rules.values()):  # stream: one layer's SVD in memory at a time
        for key, layer in track(lora.layers.items(), "resize", progress):
            svd = layer_svd(layer, compute_dtype, key=key)
            k = choose_rank(rules[key], svd.S, key, drop_zero=drop_zero)
            _emit(key, layer, svd, k, dtype, layers, reports)
    else:  # a global rule needs every spectrum before any rank is chosen
        svds = {
            key: layer_svd(layer, compute_dtype, key=key)
            for key, layer in track(lora.layers.items(), "resize: SVD", progress)
        }
        per_rank = {k: sum(s.dims) * _out_dtype(lora[k], dtype).itemsize for k, s in svds.items()}
        ranks = choose_ranks(
            {k: s.S for k, s in svds.items()},
            rules,
            bytes_per_rank=per_rank,
            fixed_bytes=fixed_bytes(lora, dtype),
            drop_zero=drop_zero,
        )
        for key, svd in svds.items():
            _emit(key, lora[key], svd, ranks[key], dtype, layers, reports)
    out = lora.replace(layers=layers)
    report = ResizeReport(
        rule=rule.describe(),
        conv_rule=conv_rule.describe() if conv_rule is not None else None,
        layers=tuple(reports),
        old_bytes=L.nbytes(lora),
        new_bytes=L.nbytes(out),
        old_ranks=L.ranks(lora),
    )
    out = out.replace(metadata=resized_metadata(lora.metadata, out, report))
    log.info("%s", report.summary())
    return out, report


def _rule_for(layer: Layer, rule: RankRule, conv_rule: RankRule | None) -> RankRule:
    return conv_rule if conv_rule is not None and is_big_conv(layer) else rule


def is_big_conv(layer: Layer) -> bool:
    """A conv layer whose kernel is larger than 1×1 (what kohya's conv_dim and our conv_rule are about)."""
    if isinstance(layer, LoRALayer):
        kernel = layer.mid.shape[2:] if layer.mid is not None else layer.down.shape[2:]
    else:
        kernel = next((t.shape[2:] for t in layer.parts.values() if t.ndim == 4), ())
    return math.prod(kernel) > 1


def _emit(
    key: str,
    layer: Layer,
    svd: FactoredSVD,
    k: int,
    dtype: torch.dtype | None,
    layers: dict[str, Layer],
    reports: list[LayerReport],
) -> None:
    kind = "dora" if getattr(layer, "dora_scale", None) is not None else layer.kind
    reports.append(layer_report(key, kind, svd.S, svd.shape, layer.rank, k))
    if k > 0:
        layers[key] = rebuild(layer, svd, k, _out_dtype(layer, dtype))


def rebuild(layer: Layer, svd: FactoredSVD, k: int, dtype: torch.dtype) -> LoRALayer:
    """The rank-k layer for ``svd`` with ``layer``'s alpha/rank ratio (ρ = 1 for LyCORIS sources)."""
    rho, alpha, dora = 1.0, float(k), None
    if isinstance(layer, LoRALayer):
        dora = layer.dora_scale
        if layer.alpha is None:
            alpha = None
        elif layer.alpha != 0:
            rho = layer.scale
            alpha = rho * k
    up, down = svd.factors(k, rho)
    return LoRALayer(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=alpha, dora_scale=dora)


def _out_dtype(layer: Layer, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    tensors = layer.tensors()
    return tensors["up"].dtype if "up" in tensors else next(iter(tensors.values())).dtype


def fixed_bytes(lora: LoRA, dtype: torch.dtype | None) -> int:
    """What the file weighs besides the factors: metadata, header entries, alphas, DoRA scales (an estimate)."""
    meta = len(json.dumps(dict(lora.metadata)).encode()) + METADATA_SLACK
    extra = 0
    for layer in lora.layers.values():
        item = _out_dtype(layer, dtype).itemsize
        extra += 3 * HEADER_BYTES_PER_TENSOR + item  # down, up, alpha
        dora = getattr(layer, "dora_scale", None)
        if dora is not None:
            extra += HEADER_BYTES_PER_TENSOR + dora.numel() * dora.element_size()
    return meta + extra


def network_dims(layers: Mapping[str, Layer]) -> dict[str, str]:
    """kohya's ``ss_network_dim`` / ``ss_network_alpha`` for these layers: one value, or "Dynamic" when they differ.

    Layers with kernels larger than 1×1 are left out (kohya keeps them under ``ss_network_args`` conv_dim).
    """
    lin = [ly for ly in layers.values() if not is_big_conv(ly)]
    conv = [ly for ly in layers.values() if is_big_conv(ly)]
    out = _dim_alpha(lin, "ss_network_dim", "ss_network_alpha")
    out.update(_dim_alpha(conv, "conv_dim", "conv_alpha"))
    return out


def _dim_alpha(layers: list[Layer], dim_key: str, alpha_key: str) -> dict[str, str]:
    if not layers:
        return {}
    dims = {ly.rank for ly in layers}
    alphas = {float(ly.rank if ly.alpha is None else ly.alpha) for ly in layers}
    return {
        dim_key: str(dims.pop()) if len(dims) == 1 else "Dynamic",
        alpha_key: f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic",
    }


def updated_metadata(metadata: Mapping[str, str], out: LoRA, comment: str) -> dict[str, str]:
    """Source metadata with stale file hashes removed, network dim/alpha rewritten and ``comment`` prepended."""
    meta = {k: v for k, v in metadata.items() if k not in STALE_KEYS}
    dims = network_dims(out.layers)
    conv = {k: dims.pop(k) for k in ("conv_dim", "conv_alpha") if k in dims}
    meta.update(dims)
    if conv and meta.get("ss_network_args"):
        try:
            args = safe_json.loads_object(meta["ss_network_args"], key="ss_network_args")
        except LoraFormatError as err:  # informational: a malformed value is kept as it was, not fatal
            log.warning("%s; left unchanged", err)
            args = None
        if isinstance(args, dict) and "conv_dim" in args:
            args.update(conv)
            meta["ss_network_args"] = json.dumps(args)
    old = metadata.get("ss_training_comment", "")
    meta["ss_training_comment"] = f"{comment}; {old}" if old else comment
    return meta


def resized_metadata(metadata: Mapping[str, str], out: LoRA, report: ResizeReport) -> dict[str, str]:
    old = sorted(set(report.old_ranks.values()))
    old_desc = str(old[0]) if len(old) == 1 else f"{old[0]}-{old[-1]}" if old else "?"
    conv = f" (conv: {report.conv_rule})" if report.conv_rule else ""
    return updated_metadata(metadata, out, f"resized by lora-ops from rank {old_desc} to {report.rule}{conv}")


def summary_text(reports: Sequence[LayerReport], old_bytes: int, new_bytes: int, what: str) -> str:
    """One line for a resize or combine: layers, ranks before → after, bytes before → after (shared by both)."""
    kept = [r.new_rank for r in reports if r.new_rank > 0]
    olds = [r.old_rank for r in reports]
    if not reports:
        return f"{what}: no layers"
    fro = sum(r.fro_retained_pct for r in reports) / len(reports)
    rng = f"{min(kept)}–{max(kept)}" if kept and min(kept) != max(kept) else (str(kept[0]) if kept else "-")
    old = f"{min(olds)}–{max(olds)}" if min(olds) != max(olds) else str(olds[0])
    dropped = len(reports) - len(kept)
    return (
        f"{what}: {len(reports)} layers, rank {old} → {rng}, mean Frobenius retained {fro:.1f} %, "
        f"{old_bytes / 1e6:.1f} MB → {new_bytes / 1e6:.1f} MB" + (f", {dropped} zero layers dropped" if dropped else "")
    )
