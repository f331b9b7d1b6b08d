"""Rank rules: how many singular values of a layer's ΔW to keep. Every rule lives here, in one place.

Per-layer rules look at one layer's singular values σ₀ ≥ σ₁ ≥ … (all of them, from `lora_ops.linalg`):

* ``Fixed(k)`` — keep k.
* ``SvRatio(x)`` — keep every σᵢ > σ₀/x (x ≥ 1; 1 keeps σ₀ alone).
* ``SvFro(x)`` — keep the fewest k with ‖ΔW_k‖_F ≥ x·‖ΔW‖_F, i.e. Σ_{i<k} σᵢ² ≥ x²·Σσ² (0 < x ≤ 1).
* ``SvCumulative(x)`` — keep the fewest k with Σ_{i<k} σᵢ ≥ x·Σσ (0 < x ≤ 1).
* ``BaseRelative(x, base)`` — keep every σᵢ > x·‖W_base‖₂, the base layer's own spectral norm (needs the base).

One global rule looks at every layer at once:

``TargetSize(mb)``  one singular-value threshold τ for the whole file, the lowest whose kept ranks (σᵢ ≥ τ, at
                    least 1 per layer) fit in ``mb`` megabytes (10⁶ bytes) of tensor data + header estimate.

Common to all: a layer always keeps at least rank 1; a zero layer (σ₀ = 0) keeps rank 1 (a zero rank-1 layer, like
kohya) or is dropped when asked (``drop_zero``); a rank above what the layer has (min(r, out, in·kh·kw)) is clamped,
never an error; the dynamic rules take an optional ``max_rank`` cap. Boundaries are inclusive up to 1e-9 (a
fraction reached to within rounding counts as reached), so ``SvFro(1.0)`` stops where only σ below rounding noise
remain.

Where kohya's ``networks/resize_lora.py`` differs, and why:

* ``sv_fro`` — same meaning as kohya: x is the retained *Frobenius norm* fraction, so x² of Σσ² (kohya searches
  its cumulative Σσ²/Σσ² for ``target**2``). This matches the report's "retained Frobenius %": ``SvFro(0.9)`` gives
  layers reporting ≥ 90 %, and a kohya user's ``--dynamic_param 0.9`` gives the same ranks here.
* ``sv_ratio`` — older kohya (e.g. commit 41de936) computes ``index = #(σ > σ₀/x)``, clamps it and *then* adds one,
  so it keeps one rank more than its definition says (the first σ at or below σ₀/x). Current kohya keeps exactly
  #(σ > σ₀/x), as we do: the rule is "keep σᵢ > σ₀/x", nothing more.
* kohya takes the spectrum of the dense B·A, whose min(d, k) values beyond rank r are rounding noise (~1e-7·σ₀);
  with large x, sv_ratio then keeps noise directions up to its cap. Ours has exactly min(d, k, r) values, the
  rest being exact zeros. kohya's newer versions also use ``torch.svd_lowrank`` (randomised, 2 iterations) for
  layers over 2048×2048, so their spectra and the dynamic ranks derived from them are approximate; ours are exact.
* kohya caps dynamic ranks with ``--new_rank`` (default 4); here the cap is ``max_rank`` and defaults to none.
* a fixed rank above the layer's rank: kohya keeps the requested count, padding with noise directions (a bigger file,
  no better approximation); we clamp to the available rank.
* kohya treats σ₀ ≤ 1e-6 (absolute) as a zero layer; we use σ₀ = 0 exactly — 1e-6 is a unit-dependent threshold
  and a legitimately small layer (tiny alpha, fp16 factors) can sit below it.
* kohya applies its conv rank to every conv layer, 1×1 included; resize here applies ``conv_rule`` to kernels larger
  than 1×1 only (kohya trains 1×1 convs, e.g. SD1 proj_in/out, with the linear ``network_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import LoraValueError

Tensor = torch.Tensor
TOL = 1e-9  # fractions reached to within this count as reached
MB = 1_000_000


class RankRule:
    """Base class. Per-layer rules implement `keep`; global rules (``is_global``) are resolved by `choose_ranks`."""

    is_global = False

    def keep(self, sv: Tensor, key: str | None = None) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_max_rank(max_rank: int | None) -> None:
    if max_rank is not None:
        _check_rank(max_rank, "max_rank")


def _check_rank(rank: object, name: str = "rank") -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise LoraValueError(f"{name} must be a whole number, got {rank!r}")
    if rank < 1:
        raise LoraValueError(f"{name} must be at least 1, got {rank}", hint="to remove layers, filter them instead")


def _check_fraction(x: float, name: str) -> None:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or not 0 < x <= 1:
        raise LoraValueError(f"{name} must be a fraction in (0, 1], got {x!r}", hint="e.g. 0.9 keeps 90 %")


def _capped(n: int, max_rank: int | None) -> int:
    return n if max_rank is None else min(n, max_rank)


def _suffix(max_rank: int | None) -> str:
    return "" if max_rank is None else f" (max rank {max_rank})"


def _first_reaching(cumulative: Tensor, target: float) -> int:
    """The fewest k with cumulative[k-1] ≥ target (cumulative is a non-decreasing fraction ending at 1)."""
    return int((cumulative < target - TOL).sum()) + 1


@dataclass(frozen=True)
class Fixed(RankRule):
    rank: int

    def __post_init__(self) -> None:
        _check_rank(self.rank)

    def keep(self, sv: Tensor, key: str | None = None) -> int:
        return self.rank

    def describe(self) -> str:
        return f"rank {self.rank}"


@dataclass(frozen=True)
class SvRatio(RankRule):
    """Keep every σᵢ > σ₀/ratio."""

    ratio: float
    max_rank: int | None = None

    def __post_init__(self) -> None:
        x = self.ratio
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 1:
            raise LoraValueError(
                f"sv_ratio must be a number ≥ 1, got {x!r}", hint="it is the largest σ₀/σᵢ kept; 1 keeps σ₀ alone"
            )
        _check_max_rank(self.max_rank)

    def keep(self, sv: Tensor, key: str | None = None) -> int:
        s = sv.double()
        return _capped(int((s > s[0] / self.ratio).sum()), self.max_rank)

    def describe(self) -> str:
        return f"sv_ratio {self.ratio:g}{_suffix(self.max_rank)}"


@dataclass(frozen=True)
class SvFro(RankRule):
    """Keep the fewest σ whose Frobenius norm reaches ``fraction`` of ‖ΔW‖_F (kohya's sv_fro)."""

    fraction: float
    max_rank: int | None = None

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, "sv_fro")
        _check_max_rank(self.max_rank)

    def keep(self, sv: Tensor, key: str | None = None) -> int:
        cum = sv.double().square().cumsum(0)
        return _capped(_first_reaching((cum / cum[-1]).sqrt(), self.fraction), self.max_rank)

    def describe(self) -> str:
        return f"sv_fro {self.fraction:g}{_suffix(self.max_rank)}"


@dataclass(frozen=True)
class SvCumulative(RankRule):
    """Keep the fewest σ whose sum reaches ``fraction`` of Σσ (kohya's sv_cumulative)."""

    fraction: float
    max_rank: int | None = None

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, "sv_cumulative")
        _check_max_rank(self.max_rank)

    def keep(self, sv: Tensor, key: str | None = None) -> int:
        cum = sv.double().cumsum(0)
        return _capped(_first_reaching(cum / cum[-1], self.fraction), self.max_rank)

    def describe(self) -> str:
        return f"sv_cumulative {self.fraction:g}{_suffix(self.max_rank)}"


@dataclass(frozen=True)
class BaseRelative(RankRule):
    """Keep every σᵢ > threshold·‖W_base‖₂: a change small against the base weight itself is dropped.

    ``base`` maps canonical keys to the base weights (tensors) or their spectral norms (floats); a LoRA layer
    whose key is missing there is refused with a clear error.
    """

    threshold: float
    base: Mapping[str, float | Tensor] = field(repr=False)
    max_rank: int | None = None

    def __post_init__(self) -> None:
        x = self.threshold
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
            raise LoraValueError(f"base-relative threshold must be a positive number, got {x!r}", hint="e.g. 0.001")
        _check_max_rank(self.max_rank)
        object.__setattr__(self, "base", spectral_norms(self.base))

    def keep(self, sv: Tensor, key: str | None = None) -> int:
        if key not in self.base:
            raise LoraValueError("no base weight for this layer", key=key, hint="give the base model's weights")
        return _capped(int((sv.double() > self.threshold * self.base[key]).sum()), self.max_rank)

    def describe(self) -> str:
        return f"σ > {self.threshold:g}·‖W_base‖₂{_suffix(self.max_rank)}"


@dataclass(frozen=True)
class TargetSize(RankRule):
    """One global singular-value threshold so that the whole file fits in ``megabytes`` (10⁶ bytes)."""

    megabytes: float
    is_global = True

    def __post_init__(self) -> None:
        x = self.megabytes
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
            raise LoraValueError(f"target size must be a positive number of MB, got {x!r}")

    def keep(self, sv: Tensor, key: str | None = None) -> int:
        raise LoraValueError("a target size is a rule for a whole file", hint="use choose_ranks")

    def describe(self) -> str:
        return f"size ≤ {self.megabytes:g} MB"


def spectral_norms(weights: Mapping[str, float | Tensor]) -> dict[str, float]:
    """‖W‖₂ of each weight (conv weights flattened to (out, in·kh·kw)); floats pass through."""
    out = {}
    for key, w in weights.items():
        if isinstance(w, Tensor):
            out[key] = float(torch.linalg.matrix_norm(w.detach().float().flatten(1), ord=2))
        else:
            out[key] = float(w)
    return out


def is_zero(sv: Tensor) -> bool:
    return sv.numel() == 0 or float(sv[0]) == 0.0


def choose_rank(rule: RankRule, sv: Tensor, key: str | None = None, *, drop_zero: bool = False) -> int:
    """The rank one layer keeps under a per-layer rule: ≥ 1, ≤ len(sv); 0 for a zero layer when ``drop_zero``."""
    if is_zero(sv):
        return 0 if drop_zero else 1
    return max(1, min(rule.keep(sv, key), sv.numel()))


def choose_ranks(
    spectra: Mapping[str, Tensor],
    rules: Mapping[str, RankRule],
    *,
    bytes_per_rank: Mapping[str, int] | None = None,
    fixed_bytes: int = 0,
    drop_zero: bool = False,
) -> dict[str, int]:
    """The rank of every layer: per-layer rules first, then one global rule over the bytes that remain.

    ``rules`` maps each key of ``spectra`` to its rule; ``bytes_per_rank`` is what one kept rank costs in the output
    (needed by `TargetSize`), ``fixed_bytes`` what the file weighs regardless of ranks (header, metadata, alphas).
    """
    ranks: dict[str, int] = {}
    global_keys: list[str] = []
    global_rules = {id(r): r for r in rules.values() if r.is_global}
    if len(global_rules) > 1:
        raise LoraValueError("only one target-size rule per operation", hint="give conv layers a per-layer rule")
    for key, sv in spectra.items():
        rule = rules[key]
        if rule.is_global and not is_zero(sv):
            global_keys.append(key)
        else:
            ranks[key] = choose_rank(rule if not rule.is_global else Fixed(1), sv, key, drop_zero=drop_zero)
    if global_keys:
        (rule,) = global_rules.values()
        if bytes_per_rank is None:
            raise LoraValueError("a target size needs the bytes per rank of every layer")
        used = fixed_bytes + sum(ranks[k] * bytes_per_rank[k] for k in ranks)
        ranks.update(_fit_size(rule, {k: spectra[k] for k in global_keys}, bytes_per_rank, used))
    return {k: ranks[k] for k in spectra}


def _fit_size(rule: TargetSize, spectra: Mapping[str, Tensor], cost: Mapping[str, int], used: int) -> dict[str, int]:
    budget = int(rule.megabytes * MB) - used
    ranks = {k: 1 for k in spectra}  # σ₀ of every layer is always kept
    floor = sum(cost[k] for k in spectra)
    if floor > budget:
        smallest = (floor + used) / MB
        raise LoraValueError(
            f"target size {rule.megabytes:g} MB is below the smallest possible file ({smallest:.2f} MB at rank 1)",
            hint="raise the target or drop layers",
        )
    # candidates beyond σ₀, largest first; a threshold τ keeps every σ ≥ τ
    sv, owner = [], []
    keys = list(spectra)
    for i, k in enumerate(keys):
        s = spectra[k].double()[1:]
        s = s[s > 0]
        sv.append(s)
        owner.append(torch.full_like(s, i, dtype=torch.long))
    if not sv:
        return ranks
    sv_all, owner_all = torch.cat(sv), torch.cat(owner)
    order = torch.argsort(sv_all, descending=True, stable=True)
    sv_all, owner_all = sv_all[order], owner_all[order]
    costs = torch.tensor([cost[k] for k in keys], dtype=torch.long)[owner_all]
    fits = int((costs.cumsum(0) <= budget - floor).sum())  # how many candidates fit, largest first
    if fits < sv_all.numel():
        while fits > 0 and sv_all[fits - 1] == sv_all[fits]:  # a threshold keeps all of a tie or none of it
            fits -= 1
    counts = torch.bincount(owner_all[:fits], minlength=len(keys))
    return {k: 1 + int(counts[i]) for i, k in enumerate(keys)}


_NAMES = {
    "rank": "fixed", "fixed": "fixed", "sv_ratio": "sv_ratio", "ratio": "sv_ratio", "sv_fro": "sv_fro",
    "fro": "sv_fro", "sv_cumulative": "sv_cumulative", "cumulative": "sv_cumulative", "size_mb": "size_mb",
    "mb": "size_mb", "size": "size_mb",
}


def make_rule(method: str, param: float, *, max_rank: int | None = None) -> RankRule:
    """A rule from a method name and its parameter: fixed|rank, sv_ratio, sv_fro, sv_cumulative, size_mb."""
    name = _NAMES.get(method.strip().lower())
    if name is None:
        raise LoraValueError(f"unknown rank rule '{method}'", hint=f"one of {sorted(set(_NAMES.values()))}")
    if name == "fixed":
        if isinstance(param, float) and param.is_integer():
            param = int(param)
        return Fixed(param)  # type: ignore[arg-type]
    if name == "size_mb":
        return TargetSize(param)
    cls = {"sv_ratio": SvRatio, "sv_fro": SvFro, "sv_cumulative": SvCumulative}[name]
    return cls(param, max_rank)


def as_rule(rule: RankRule | str | int, name: str = "rule") -> RankRule:
    """A rule as given: a `RankRule`, a whole number (a fixed rank) or a `parse_rule` string."""
    if isinstance(rule, RankRule):
        return rule
    if isinstance(rule, int) and not isinstance(rule, bool):
        return Fixed(rule)
    if isinstance(rule, str):
        return parse_rule(rule)
    raise LoraValueError(f"{name} must be a rank rule, got {type(rule).__name__}",
                         hint="e.g. rank_rules.Fixed(32), 32, or 'sv_fro:0.9'")


def parse_rule(spec: str, *, max_rank: int | None = None) -> RankRule:
    """``"32"`` → rank 32; ``"sv_fro:0.9"`` / ``"sv_fro=0.9"`` / ``"size_mb:40"`` → that rule."""
    text = spec.strip()
    for sep in (":", "="):
        if sep in text:
            method, _, value = text.partition(sep)
            break
    else:
        method, value = "fixed", text
    try:
        number = float(value)
    except ValueError:
        raise LoraValueError(f"rank rule '{spec}' needs a number", hint="e.g. 32, sv_fro:0.9, size_mb:40") from None
    return make_rule(method, number, max_rank=max_rank)
