"""Combine a stack of weighted LoRAs into one LoRA.

Methods (every one works per layer over the union of the inputs' keys; mixed ranks, dtypes, conv, Tucker all fine):

* ``concat`` — exact: the factors stacked, rank Σrᵢ, alpha = rank (scale 1) with each wᵢ·sᵢ folded into its up.
* ``svd`` — exact SVD of Σ wᵢ·ΔWᵢ from the concatenated factors (QR trick, no dense ΔW), then any rank rule.
* ``linear`` — the same weighted sum formed densely and re-factorised by a dense SVD (the reference path; summing
  A and B separately, as some tools do, adds cross terms wᵢwⱼ·BᵢAⱼ — see PEFT issue #3004 — and is not offered).
* ``ties`` — TIES-merging on the dense task vectors τᵢ = wᵢ·ΔWᵢ: keep each τᵢ's largest ``density`` fraction by
  magnitude, elect a sign per entry (sign of the sum), average the entries that agree with it.
* ``dare_linear`` / ``dare_ties`` — DARE: drop each entry with probability 1 − density and rescale by 1/density,
  then sum (linear) or elect signs and average (ties). Random masks come from a `torch.Generator` per layer seeded
  from ``seed`` and the layer key, so a result is reproducible and independent of the other layers.

``rule`` (a `lora_ops.rank_rules` rule) picks the output rank of every method but concat; without one the rank is
Σ of the sources' ranks (exact for svd/linear; for ties/dare a truncation of a dense result whose rank is full).
LoHa/LoKr inputs go through their dense ΔW. Weights: ``weight`` for the denoiser, ``text_weight`` (default: weight)
for text encoders, times an optional per-block weight (see `block_id`). A term of weight 0 is skipped, and a layer
left without terms is dropped (a disabled LoRA contributes nothing). Output alpha = rank (scale 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import families, fused, safe_json
from . import lora as L
from .errors import LoraFormatError, LoraValueError
from .inspect import TRIGGER_KEYS
from .linalg import FactoredSVD, common_shape, dense_svd, flat_factors, sum_svd
from .lora import Layer, LoRA, LoRALayer
from .progress import Progress, track
from .rank_rules import Fixed, RankRule, as_rule, choose_rank, choose_ranks
from .resize import LayerReport, fixed_bytes, is_big_conv, layer_report, summary_text, updated_metadata

log = logging.getLogger(__name__)

Tensor = torch.Tensor
METHODS = ("concat", "svd", "linear", "ties", "dare_linear", "dare_ties")
DENSE_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
BlockWeights = Mapping[str, float] | Callable[[str], float]
Item = tuple[LoRA, float, float | None] | tuple[LoRA, float]
Terms = list[tuple[int, Layer, float]]  # (input index, layer, effective weight)


@dataclass(frozen=True)
class CombineReport:
    method: str
    rule: str
    weights: tuple[tuple[float, float], ...]  # (weight, text weight) per input
    seed: int | None
    density: float | None
    layers: tuple[LayerReport, ...]
    old_bytes: int  # all inputs together
    new_bytes: int

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "rule": self.rule,
            "weights": [list(w) for w in self.weights],
            "seed": self.seed,
            "density": self.density,
            "old_bytes": self.old_bytes,
            "new_bytes": self.new_bytes,
            "layers": [r.to_dict() for r in self.layers],
        }

    def summary(self) -> str:
        return summary_text(self.layers, self.old_bytes, self.new_bytes, f"combine {len(self.weights)} ({self.method})")


_BLOCK = re.compile(r"^unet\.(?:(input_blocks|output_blocks|double_blocks|single_blocks)\.(\d+)|(middle_block))\.")
_BLOCK_NAMES = {"input_blocks": "in", "output_blocks": "out", "double_blocks": "double", "single_blocks": "single"}


def block_id(key: str) -> str:
    """The block a canonical key sits in: "in4", "mid", "out7" (LDM UNet), "double3"/"single12" (Flux), "te1"/"te2"
    for text encoders, else the model part ("unet"). Block weights are looked up by this id, then by the part."""
    m = _BLOCK.match(key)
    if m is None:
        return L.part_of(key)
    if m.group(3):
        return "mid"
    return f"{_BLOCK_NAMES[m.group(1)]}{int(m.group(2))}"


def _block_weight(weights: BlockWeights | None, key: str) -> float:
    if weights is None:
        return 1.0
    if callable(weights):
        return float(weights(key))
    bid = block_id(key)
    for name in (bid, L.part_of(key), "te" if L.is_text_encoder_key(key) else None):
        if name is not None and name in weights:
            return float(weights[name])
    return 1.0


def combine(
    items: Sequence[Item],
    method: str,
    rule: RankRule | str | int | None = None,
    *,
    conv_rule: RankRule | str | int | None = None,
    block_weights: BlockWeights | Sequence[BlockWeights | None] | None = None,
    seed: int = 0,
    density: float = 0.5,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
    progress: Progress = False,
) -> tuple[LoRA, CombineReport]:
    """One LoRA from ``items`` = [(lora, weight, text_weight or None), …] by ``method`` (see the module docs).

    ``block_weights``: one mapping/function for every input, or a sequence with one per input (None: all 1).
    ``dtype``: of the output (default: the inputs' dtype if they share one, else fp32).
    """
    loras, weights = _check_items(items)
    rule = as_rule(rule) if rule is not None else None
    conv_rule = as_rule(conv_rule, "conv_rule") if conv_rule is not None else None
    method = _check_method(method, rule, conv_rule, density)
    per_item_bw = _per_item_block_weights(block_weights, len(loras))
    family = _common_family(loras)
    # One key per weight: a fused kohya LoRA (…qkv) and a split diffusers one (…qkv[q]) of the same model meet on
    # the fused weight, where concat stays exact and SVD methods see the whole ΔW.
    loras = [fused.fuse(lo.replace(family=family)) for lo in loras]
    out_dtype = dtype or _common_dtype(loras)
    metadata = _merge_metadata([lo.metadata for lo in loras])
    keys = list(dict.fromkeys(k for lo in loras for k in lo.layers))  # the union, in first-seen order

    layers: dict[str, Layer] = {}
    reports: list[LayerReport] = []
    pending: dict[str, tuple[Terms, FactoredSVD]] = {}  # a global rule needs every spectrum first
    rules: dict[str, RankRule] = {}
    needs_all = any(r is not None and r.is_global for r in (rule, conv_rule))
    for key in track(keys, f"combine ({method})", progress):
        terms = _terms(key, loras, weights, per_item_bw)
        if not terms:
            continue
        if method == "concat":
            layers[key] = _concat(terms, out_dtype, compute_dtype, key)
            reports.append(_concat_report(key, terms, layers[key]))
            continue
        svd = _merged_svd(method, terms, compute_dtype, key, seed, density)
        rules[key] = _rule_for(terms, rule, conv_rule)
        if needs_all:
            pending[key] = (terms, svd)
        else:
            _emit(key, terms, svd, choose_rank(rules[key], svd.S, key), out_dtype, layers, reports)
    if pending:
        ranks = choose_ranks(
            {k: s.S for k, (_, s) in pending.items()},
            rules,
            bytes_per_rank={k: sum(s.dims) * out_dtype.itemsize for k, (_, s) in pending.items()},
            fixed_bytes=fixed_bytes(LoRA({k: t[0][1] for k, (t, _) in pending.items()}, metadata), out_dtype),
        )
        for key, (terms, svd) in pending.items():
            _emit(key, terms, svd, ranks[key], out_dtype, layers, reports)

    out = LoRA(layers, {}, family=family, source_format=None)
    report = CombineReport(
        method=method,
        rule=_rule_desc(method, rule, conv_rule),
        weights=tuple(weights),
        seed=seed if method.startswith("dare") else None,
        density=density if method in ("ties", "dare_linear", "dare_ties") else None,
        layers=tuple(reports),
        old_bytes=sum(L.nbytes(lo) for lo in loras),
        new_bytes=L.nbytes(out),
    )
    ws = ", ".join(f"{w:g}" if w == t else f"{w:g}/{t:g}" for w, t in weights)
    comment = f"combined by lora-ops ({method}, {report.rule}) from {len(loras)} LoRAs with weights {ws}"
    log.info("%s", report.summary())
    return out.replace(metadata=updated_metadata(metadata, out, comment)), report


def _terms(
    key: str, loras: Sequence[LoRA], weights: Sequence[tuple[float, float]], block_weights: list[BlockWeights | None]
) -> Terms:
    """(input index, layer, effective weight) of every input that has ``key`` with a non-zero weight."""
    terms = []
    for i, lo in enumerate(loras):
        if key in lo.layers:
            w, wt = weights[i]
            weight = (wt if L.is_text_encoder_key(key) else w) * _block_weight(block_weights[i], key)
            if weight != 0:
                terms.append((i, lo.layers[key], weight))
    _check_terms(key, terms)
    return terms


# --- checks ---------------------------------------------------------------------------------------------------


def _check_items(items: Sequence[Item]) -> tuple[list[LoRA], list[tuple[float, float]]]:
    if not items:
        raise LoraValueError("nothing to combine", hint="give at least one (lora, weight) pair")
    loras, weights = [], []
    for n, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3) or not isinstance(item[0], LoRA):
            raise LoraValueError(f"item {n} must be (lora, weight[, text_weight]), got {type(item).__name__}")
        w = item[1]
        wt = item[2] if len(item) == 3 and item[2] is not None else w
        for value in (w, wt):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LoraValueError(f"item {n}: weight must be a finite number, got {value!r}")
        loras.append(item[0])
        weights.append((float(w), float(wt)))
    return loras, weights


def _check_method(method: str, rule: RankRule | None, conv_rule: RankRule | None, density: float) -> str:
    name = str(method).strip().lower()
    if name not in METHODS:
        raise LoraValueError(f"unknown combine method '{method}'", hint=f"one of {', '.join(METHODS)}")
    if name == "concat" and (rule is not None or conv_rule is not None):
        raise LoraValueError("concat is exact and takes no rank rule", hint="use method 'svd' with a rule to shrink")
    if name in ("ties", "dare_linear", "dare_ties") and (
        isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1
    ):
        raise LoraValueError(f"density must be in (0, 1], got {density!r}", hint="the fraction of entries kept")
    return name


def _per_item_block_weights(
    block_weights: BlockWeights | Sequence[BlockWeights | None] | None, n: int
) -> list[BlockWeights | None]:
    if block_weights is None or isinstance(block_weights, Mapping) or callable(block_weights):
        return [block_weights] * n  # type: ignore[list-item]
    per = list(block_weights)
    if len(per) != n:
        raise LoraValueError(f"{len(per)} block-weight sets for {n} LoRAs", hint="give one per LoRA, or one for all")
    return per


def _check_terms(key: str, terms: Terms) -> None:
    shape = None
    for _, layer, _ in terms:
        if getattr(layer, "dora_scale", None) is not None and len(terms) > 1:
            raise LoraValueError(
                "DoRA layers cannot be combined: the magnitude vector applies to the whole weight, not to ΔW",
                key=key,
                hint="merge DoRA LoRAs into the model instead",
            )
        shape = common_shape(shape, layer.delta_shape, key)


def _common_family(loras: Sequence[LoRA]) -> str | None:
    found = {lo.family for lo in loras if lo.family is not None}
    if len(found) > 1:
        raise LoraValueError("cannot combine LoRAs for different models: "
                             + ", ".join(families.label(f) for f in sorted(found)))
    return found.pop() if found else None


def _common_dtype(loras: Sequence[LoRA]) -> torch.dtype:
    found = set().union(*(L.dtypes(lo) for lo in loras))
    found = {d for d in found if d.is_floating_point}
    return found.pop() if len(found) == 1 else torch.float32


def _rule_for(terms: Terms, rule: RankRule | None, conv_rule: RankRule | None) -> RankRule:
    first = terms[0][1]
    chosen = conv_rule if conv_rule is not None and is_big_conv(first) else rule
    if chosen is not None:
        return chosen
    return Fixed(sum(_source_rank(layer) for _, layer, _ in terms))


def _source_rank(layer: Layer) -> int:
    if isinstance(layer, LoRALayer):
        return layer.rank
    shape = layer.delta_shape
    return min(shape[0], math.prod(shape[1:]))  # LoHa/LoKr: no rank to speak of, count it as full


def _rule_desc(method: str, rule: RankRule | None, conv_rule: RankRule | None) -> str:
    if method == "concat":
        return "exact concat (rank = Σ ranks)"
    desc = rule.describe() if rule is not None else "rank = Σ source ranks"
    return desc + (f" (conv: {conv_rule.describe()})" if conv_rule is not None else "")


# --- methods --------------------------------------------------------------------------------------------------


def _concat(terms: Terms, dtype: torch.dtype, compute: torch.dtype, key: str) -> LoRALayer:
    bs, as_, shape = [], [], None
    for _, layer, weight in terms:
        b, a, s = flat_factors(layer, compute)  # (out, rᵢ) with the scale in it, (rᵢ, in·kh·kw)
        shape = common_shape(shape, s, key)
        bs.append(b * weight)
        as_.append(a)
    up, down = torch.cat(bs, dim=1), torch.cat(as_, dim=0)  # (out, R), (R, in·kh·kw)
    rank = up.shape[1]
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])  # (out,R,1,1), (R,in,kh,kw)
    dora = terms[0][1].dora_scale if isinstance(terms[0][1], LoRALayer) else None
    return LoRALayer(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=float(rank), dora_scale=dora)


def _concat_report(key: str, terms: Terms, layer: LoRALayer) -> LayerReport:
    """Concat is exact: nothing discarded, no spectrum computed (that would cost what concat avoids)."""
    r = layer.rank
    sources = tuple(i for i, _, _ in terms)
    return LayerReport(key, _kind(terms), layer.delta_shape, r, r, 100.0, 100.0, None, 0.0, (), sources)


def _merged_svd(
    method: str, terms: Terms, compute: torch.dtype, key: str, seed: int, density: float
) -> FactoredSVD:
    """The SVD of the merged ΔW: from the factors (svd), or of the dense merge (linear, ties, dare)."""
    if method == "svd":
        return sum_svd([(layer, w) for _, layer, w in terms], compute, key=key)
    shape = None
    for _, layer, _ in terms:
        shape = common_shape(shape, layer.delta_shape, key)
    tvs = [w * layer.delta(compute).reshape(shape) for _, layer, w in terms]  # task vectors τᵢ = wᵢ·ΔWᵢ
    gen = layer_generator(seed, key) if method.startswith("dare") else None
    if method == "linear":
        merged = torch.stack(tvs).sum(0)
    elif method == "ties":
        merged = _disjoint_mean(torch.stack([_trim(t, density) for t in tvs]))
    elif method == "dare_linear":
        merged = torch.stack([_dare(t, density, gen) for t in tvs]).sum(0)
    else:  # dare_ties
        merged = _disjoint_mean(torch.stack([_dare(t, density, gen) for t in tvs]))
    return dense_svd(merged)


def layer_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded from (seed, key) with a stable hash (Python's own ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _trim(t: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude (at least one), zero the rest."""
    flat = t.flatten()
    k = max(1, int(density * flat.numel()))
    if k >= flat.numel():
        return t
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k, sorted=False).indices] = True
    return (flat * keep).reshape(t.shape)


def _dare(t: Tensor, density: float, gen: torch.Generator | None) -> Tensor:
    """Drop each entry with probability 1 − density, rescale the survivors by 1/density."""
    if density >= 1:
        return t
    keep = torch.rand(t.shape, generator=gen, dtype=torch.float32) < density
    return t * keep / density


def _disjoint_mean(stacked: Tensor) -> Tensor:
    """TIES: elect a sign per entry (sign of the sum), average the entries that agree with it."""
    elected = stacked.sum(0).sign()  # (out, in…)
    agree = (stacked.sign() == elected) & (stacked != 0)  # (n, out, in…)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def _emit(
    key: str,
    terms: Terms,
    svd: FactoredSVD,
    k: int,
    dtype: torch.dtype,
    layers: dict[str, Layer],
    reports: list[LayerReport],
) -> None:
    k = max(1, min(k, svd.rank))
    old = sum(_source_rank(layer) for _, layer, _ in terms)
    reports.append(layer_report(key, _kind(terms), svd.S, svd.shape, old, k, [i for i, _, _ in terms]))
    up, down = svd.factors(k)
    dora = terms[0][1].dora_scale if isinstance(terms[0][1], LoRALayer) else None
    layers[key] = LoRALayer(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=float(k),
                            dora_scale=dora)


def _kind(terms: Terms) -> str:
    kinds = {layer.kind for _, layer, _ in terms}
    return kinds.pop() if len(kinds) == 1 else "mixed"


# --- metadata -------------------------------------------------------------------------------------------------


def _merge_metadata(metas: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The union of the sources' metadata (first wins), with trigger words, tag frequencies and titles merged."""
    out: dict[str, str] = {}
    for meta in metas:
        for k, v in meta.items():
            out.setdefault(k, v)
    for key in TRIGGER_KEYS:
        phrases: list[str] = []
        for meta in metas:
            phrases += [p.strip() for p in meta.get(key, "").split(",") if p.strip() and p.strip() not in phrases]
        if phrases:
            out[key] = ", ".join(phrases)
    freq: dict[str, dict[str, int]] = {}
    for meta in metas:
        for folder, tags in _json_dict(meta.get("ss_tag_frequency"), "ss_tag_frequency").items():
            if isinstance(tags, dict):
                merged = freq.setdefault(str(folder), {})
                for tag, n in tags.items():
                    if isinstance(n, (int, float)) and not isinstance(n, bool) and abs(n) < 2**63:  # a count
                        merged[str(tag)] = merged.get(str(tag), 0) + int(n)
    if freq:
        out["ss_tag_frequency"] = json.dumps(freq)
    dirs: dict[str, object] = {}
    for meta in metas:
        for folder, info in _json_dict(meta.get("ss_dataset_dirs"), "ss_dataset_dirs").items():
            dirs.setdefault(str(folder), info)
    if dirs:
        out["ss_dataset_dirs"] = json.dumps(dirs)
    titles = list(dict.fromkeys(m["modelspec.title"] for m in metas if m.get("modelspec.title")))
    if len(titles) > 1:
        out["modelspec.title"] = " + ".join(titles)
    return out


def _json_dict(text: str | None, key: str) -> dict:
    """Informational metadata ``key`` as a JSON object; malformed (see `safe_json`) is logged and left out."""
    if not text:
        return {}
    try:
        return safe_json.loads_object(text, key=key)
    except LoraFormatError as err:
        log.warning("%s; not merged", err)
        return {}
