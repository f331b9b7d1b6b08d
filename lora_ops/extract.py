"""Extract a LoRA from two models: the best low-rank approximation of (tuned − base), layer by layer.

Inputs are single-file checkpoints (LDM names for SD; BFL names for FLUX.1, top level or under
``model.diffusion_model.``), SD diffusers folders, in-memory state dicts in checkpoint naming, or canonical key →
weight mappings (what the hosts give). The family comes from the tensor names; when they do not tell, it must be
given (``family=``): there is no default family. FLUX.1's fused weights (``img_attn.qkv``, ``linear1``) are
extracted whole, as kohya and ComfyUI files hold them; so are Z-Image's ``attention.qkv``, from ComfyUI-named
files (one tensor) or officially named ones (``to_q``, ``to_k``, ``to_v`` read stacked), so base and tuned may
be in different layouts.
Weights are read one layer at a time (`safetensors.safe_open`), so the peak memory is a few layers, not two
models. ΔW of a fine-tune is full-rank, so each layer needs a dense SVD — that is the cost of extraction. Unlike
ComfyUI's extractor we do not clamp factor values to a quantile: the result is the exact Eckart–Young truncation,
and extracting a rank-r LoRA back at rank r recovers it to float precision.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from . import families, fused
from .coverage import with_article
from .errors import LoraFileError, LoraValueError
from .io import read_safetensors_header
from .keymap import checkpoint_family, checkpoint_targets
from .linalg import FactoredSVD
from .lora import LoRA, LoRALayer, nbytes
from .progress import Progress, track
from .rank_rules import RankRule, as_rule, choose_rank
from .resize import ResizeReport, layer_report

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Source = str | Path | Mapping[str, Tensor]
Getter = Callable[[], Tensor]
CANONICAL_PARTS = ("unet", "te1", "te2", "te3")
DIFFUSERS_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


@contextmanager
def open_weights(
    source: Source, family: str | None = None, fallback: str | None = None
) -> Iterator[tuple[dict[str, Getter], str | None]]:
    """canonical key → a function reading that (2-D or 4-D) weight, and the family; files stay open meanwhile.

    Without ``family`` the names tell it; ``fallback`` is the family to take when they do not."""
    if isinstance(source, Mapping) and source and all(k.split(".", 1)[0] in CANONICAL_PARTS for k in source):
        # already canonical (host weights): their module names tell the family when it is not given
        fam = family or families.detect(k.removeprefix("unet.") for k in source if k.startswith("unet.")) or fallback
        yield {k: (lambda t=t: t) for k, t in source.items()}, fam
        return
    with ExitStack() as stack:
        files: list[tuple[str | None, Mapping[str, Tensor] | object, list[str]]] = []
        if isinstance(source, Mapping):
            files.append((None, source, list(source)))
        else:
            path = Path(source)
            if path.is_dir():
                for component, rel in DIFFUSERS_FILES.items():
                    if (path / rel).is_file():
                        files.append((component, _open(stack, path / rel), None))
                if not files:
                    raise LoraFileError("not a diffusers folder with .safetensors weights", file=path,
                                        hint=f"expected {', '.join(DIFFUSERS_FILES.values())}")
            else:
                files.append((None, _open(stack, path), None))
        resolved = [(c, h, list(h.keys()) if keys is None else keys) for c, h, keys in files]
        fam = family or _family_of([k for _, _, keys in resolved for k in keys], source, fallback)
        getters: dict[str, Getter] = {}
        for component, handle, keys in resolved:
            for key, slot in checkpoint_targets(keys, fam, component=component).items():
                getters[key] = _getter(handle, slot)
        yield _stacked(getters, fam), fam


def _stacked(getters: dict[str, Getter], family: str | None) -> dict[str, Getter]:
    """Part keys (a file storing a fused weight's parts apart) → one getter of the whole weight, its parts stacked
    in the family's order; a fused weight with parts missing keeps its part keys (their layers are still right)."""
    groups: dict[str, dict[str, Getter]] = {}
    for key, get in getters.items():
        module, part = fused.parse_key(key)
        if part is not None:
            groups.setdefault(module, {})[part] = get
    if not groups or family is None:
        return getters
    out = dict(getters)
    for module, parts in groups.items():
        spec = families.get(family).fused_weight(module.removeprefix("unet."))
        if spec is None or {p.name for p in spec.parts} != set(parts) or module in out:
            continue
        order = [parts[p.name] for p in spec.parts]
        for p in spec.parts:
            del out[fused.part_key(module, p.name)]
        out[module] = lambda order=order: torch.cat([get() for get in order])
    return out


def _family_of(keys: list[str], source: Source, fallback: str | None = None) -> str:
    fam = checkpoint_family(keys) or fallback
    if fam is None:
        shown = ", ".join(keys[:4]) + (f" … ({len(keys)} tensors)" if len(keys) > 4 else "") if keys else "none"
        raise LoraValueError(
            f"cannot tell the model family from the checkpoint's tensor names ({shown})",
            file=None if isinstance(source, Mapping) else str(source),
            hint="pass family=",
        )
    return fam


def _open(stack: ExitStack, path: Path):
    read_safetensors_header(path)  # our validation and errors first
    return stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))


def _getter(handle, slot) -> Getter:
    if isinstance(handle, Mapping):
        return lambda: slot.read(handle[slot.tensor])
    return lambda: slot.read(handle.get_tensor(slot.tensor))


def extract(
    base: Source,
    tuned: Source,
    rule: RankRule | str | int,
    *,
    conv_rule: RankRule | str | int | None = None,
    family: str | None = None,
    parts: tuple[str, ...] = ("unet", "te1", "te2"),
    min_diff: float = 0.0,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
    progress: Progress = False,
) -> tuple[LoRA, ResizeReport]:
    """A LoRA whose ΔW approximates tuned − base for every Linear/Conv weight of ``parts`` (per-layer rank rules).

    Layers whose difference is at most ``min_diff`` (max abs) are skipped: unchanged layers cost nothing.
    """
    rule = as_rule(rule)
    conv_rule = as_rule(conv_rule, "conv_rule") if conv_rule is not None else None
    if rule.is_global or (conv_rule is not None and conv_rule.is_global):
        raise LoraValueError("extract takes per-layer rank rules",
                             hint="use a per-layer rule (fixed, sv_ratio, sv_fro, sv_cumulative), then resize to "
                                  "size_mb")
    with open_weights(base, family) as (base_w, fam), open_weights(tuned, family, fam) as (tuned_w, tuned_fam):
        if fam is not None and tuned_fam is not None and tuned_fam != fam:
            raise LoraValueError(f"the base is {with_article(families.label(fam))} checkpoint, the tuned one "
                                 f"{families.label(tuned_fam)}", hint="extract needs two checkpoints of one family")
        keys = [k for k in base_w if k in tuned_w and k.split(".", 1)[0] in parts]
        missing = sorted(k for k in base_w if k not in tuned_w and k.split(".", 1)[0] in parts)
        if missing:
            log.warning("%d weights of the base are not in the tuned model (e.g. %s)", len(missing), missing[0])
        if base_w and not any(k in tuned_w for k in base_w):
            raise LoraValueError("the two checkpoints have no weight in common",
                                 hint="they are different architectures (or families)")
        layers: dict[str, LoRALayer] = {}
        reports = []
        for key in track(keys, "extract", progress):
            w0, w1 = base_w[key](), tuned_w[key]()
            if w0.ndim < 2:
                continue
            if w0.shape != w1.shape:
                raise LoraValueError(f"shapes differ: base {tuple(w0.shape)}, tuned {tuple(w1.shape)}", key=key,
                                     hint="the two checkpoints are different architectures")
            diff = w1.to(compute_dtype) - w0.to(compute_dtype)  # (out, in[, kh, kw])
            if not torch.isfinite(diff).all():
                raise LoraValueError("weights hold NaN/Inf", key=key)
            if float(diff.abs().max()) <= min_diff:
                continue
            u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)  # (out, m), (m,), (m, in·kh·kw)
            svd = FactoredSVD(u, s, vh, tuple(diff.shape))
            layer_rule = conv_rule if conv_rule is not None and diff.ndim == 4 and diff.shape[2:] != (1, 1) else rule
            k = choose_rank(layer_rule, s, key)
            up, down = svd.factors(k)
            layers[key] = LoRALayer(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=float(k))
            reports.append(layer_report(key, "lora", s, svd.shape, int(s.numel()), k))
    if not layers:
        raise LoraValueError("the two models do not differ in any matched weight", hint="are they the same file?")
    metadata = {"ss_training_comment": f"extracted by lora-ops ({rule.describe()})",
                "ss_network_dim": "Dynamic" if len({lo.rank for lo in layers.values()}) > 1
                else str(next(iter(layers.values())).rank)}
    metadata["ss_network_alpha"] = metadata["ss_network_dim"]
    lora = LoRA(layers, metadata, family=fam, source_format=None)
    report = ResizeReport(rule=rule.describe(), conv_rule=conv_rule.describe() if conv_rule else None,
                          layers=tuple(reports), old_bytes=0, new_bytes=nbytes(lora))
    return lora, report

