"""The ComfyUI host: MODEL (a ModelPatcher) and CLIP as LoRA targets — the only module that imports comfy.

ComfyUI is imported lazily inside the functions, so the pack (and its tests) import without it.

Applying goes through ComfyUI's own patch mechanism, `comfy.sd.load_lora_for_models` (clone, then `add_patches`),
so that ComfyUI's memory management, low-VRAM offload, hooks and every sampler keep working and the input MODEL/CLIP
stay untouched. We write the LoRA in ComfyUI's own key format (`lora_ops.formats.comfyui`), whose names ComfyUI's
generic key map accepts one-to-one, check coverage first (a wrong-family LoRA is refused with the likely cause), and
afterwards verify that ComfyUI really took every matched layer: ComfyUI itself only logs unmatched keys.

Merge & Unload computes each patched weight exactly as ComfyUI does when it loads the model (base weight in fp32 →
`comfy.lora.calculate_weight` → ComfyUI's own rounding back to the weight's dtype) and returns a clone whose only
patches are ComfyUI ``"set"`` patches holding those merged weights. Why "set" patches rather than new modules: the
clone keeps sharing the underlying torch module with its input (which must keep giving the unpatched output), and
ComfyUI loads, offloads and unpatches it like any other clone — installing the result costs one copy per weight at
load time, and no LoRA product is computed any more. Memory: one tensor per patched weight, in the weight's dtype,
on the offload device (what a merged checkpoint's changed weights would weigh); the LoRA factors are dropped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..lora_ops import keymap
from ..lora_ops.coverage import CoverageReport, combine_reports
from ..lora_ops.errors import LoraValueError
from ..lora_ops.formats import write_lora
from ..lora_ops.hosts.base import ApplyItem, check_items
from ..lora_ops.lora import LoRA, filter_layers, is_text_encoder_key

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
UNET_PREFIX = "diffusion_model."
# ComfyUI CLIP state-dict prefix → canonical text-encoder part (SD1: clip_l; SDXL: clip_l + clip_g).
CLIP_PARTS = {"clip_l.transformer.": "te1", "clip_g.transformer.": "te2"}
TE_ROOTS = ("text_model.", "text_projection")
# ComfyUI model-config class → our family name, for models whose UNet layout does not tell (labels otherwise).
CONFIG_FAMILIES = {"SD15": "sd1", "SD20": "sd1", "SDXL": "sdxl"}


def is_model_patcher(obj: object) -> bool:
    """Whether ``obj`` looks like ComfyUI's MODEL (a ModelPatcher), without importing comfy."""
    return all(hasattr(obj, name) for name in ("model", "clone", "add_patches", "patches", "model_state_dict"))


def unet_targets(model: Any) -> dict[str, Shape]:
    """Canonical key (``unet.<LDM path>``) → weight shape for every ``diffusion_model.*.weight`` of a MODEL."""
    out = {}
    for name, tensor in model.model_state_dict().items():
        if name.startswith(UNET_PREFIX) and name.endswith(".weight"):
            out["unet." + name[len(UNET_PREFIX) : -len(".weight")]] = tuple(tensor.shape)
    return out


def clip_targets(clip: Any) -> dict[str, Shape]:
    """Canonical key (``te1.text_model.…`` / ``te2.…``) → weight shape for the CLIP-L / CLIP-G weights of a CLIP."""
    out = {}
    for name, tensor in clip.cond_stage_model.state_dict().items():
        if not name.endswith(".weight"):
            continue
        for prefix, part in CLIP_PARTS.items():
            rest = name[len(prefix) : -len(".weight")]
            if name.startswith(prefix) and rest.startswith(TE_ROOTS):
                out[f"{part}.{rest}"] = tuple(tensor.shape)
    return out


def model_family(model: Any, unet_keys: Sequence[str] | None = None) -> str | None:
    """The family from the UNet's module names ("sd1", "sdxl"); else ComfyUI's model-config name (e.g. "Flux")."""
    keys = unet_targets(model) if unet_keys is None else unet_keys
    family = keymap.detect_unet_family(keys)
    if family is not None:
        return family
    config = getattr(model.model, "model_config", None)
    name = type(config).__name__ if config is not None else None
    return CONFIG_FAMILIES.get(name, name)


def _patch_key(canonical: str) -> str:
    """The state-dict key ComfyUI patches for a canonical key (``unet.X`` → ``diffusion_model.X.weight``)."""
    part, path = canonical.split(".", 1)
    if part == "unet":
        return f"{UNET_PREFIX}{path}.weight"
    prefix = next(p for p, q in CLIP_PARTS.items() if q == part)
    return f"{prefix}{path}.weight"


def _verify_taken(before: Mapping[str, list], after: Mapping[str, list], keys: Sequence[str], what: str) -> None:
    """Raise if ComfyUI did not add exactly one patch for each matched layer (it only logs keys it skips)."""
    missing = [k for k in keys if len(after.get(_patch_key(k), ())) != len(before.get(_patch_key(k), ())) + 1]
    if missing:
        raise LoraValueError(
            f"ComfyUI did not take {len(missing)} of {len(keys)} matched {what} layers",
            key=missing[0],
            hint="ComfyUI's key map disagrees with LoRA Ops' for this model; please report it with the model type",
        )


def _patch_one(model: Any, clip: Any, lora: LoRA, report: CoverageReport, sm: float, sc: float) -> tuple[Any, Any]:
    """Add one checked LoRA's matched layers as ComfyUI patches (clones; zero strengths skip that side)."""
    import comfy.sd

    unet_keys = [k for k in report.matched if not is_text_encoder_key(k)] if sm != 0 else []
    te_keys = [k for k in report.matched if is_text_encoder_key(k)] if clip is not None and sc != 0 else []
    if not unet_keys and not te_keys:
        return model, clip
    keep = set(unet_keys) | set(te_keys)
    sd, _ = write_lora(filter_layers(lora, keep.__contains__), "comfyui")
    use_model, use_clip = (model if unet_keys else None), (clip if te_keys else None)
    new_model, new_clip = comfy.sd.load_lora_for_models(use_model, use_clip, sd, sm, sc)
    if use_model is not None:
        _verify_taken(model.patches, new_model.patches, unet_keys, "UNet")
    if use_clip is not None:
        _verify_taken(clip.patcher.patches, new_clip.patcher.patches, te_keys, "text-encoder")
    return (model if new_model is None else new_model), (clip if new_clip is None else new_clip)


def apply_loras(model: Any, clip: Any | None, items: Sequence[ApplyItem]) -> tuple[Any, Any | None, CoverageReport]:
    """Apply several (LoRA, strength_model, strength_clip) on clones of MODEL/CLIP; the inputs stay untouched.

    Every item is checked (coverage, finite strengths) before anything is patched. Without a CLIP, text-encoder
    layers count as not in the model (the nodes drop them first and say so).
    """
    if not is_model_patcher(model):
        raise LoraValueError(f"MODEL is not a ComfyUI model (got {type(model).__name__})")
    unet = unet_targets(model)
    targets = {**unet, **(clip_targets(clip) if clip is not None else {})}
    family = model_family(model, list(unet))
    reports = check_items(items, targets, family=family, allow_dora=True)  # ComfyUI applies DoRA itself
    new_model, new_clip = model, clip
    for (lora, sm, sc), report in zip(items, reports):
        new_model, new_clip = _patch_one(new_model, new_clip, lora, report, float(sm), float(sc))
    report = combine_reports(reports)
    log.info("applied %d LoRA(s): %s", len(items), report.summary())
    return new_model, new_clip, report


def apply_lora(
    model: Any, clip: Any | None, lora: LoRA, strength_model: float, strength_clip: float
) -> tuple[Any, Any | None, CoverageReport]:
    """Apply one LoRA on clones of MODEL/CLIP (see `apply_loras`)."""
    return apply_loras(model, clip, [(lora, strength_model, strength_clip)])


def _base_weight(patcher: Any, key: str, current: torch.Tensor) -> torch.Tensor:
    """The unpatched weight: the backup when a clone currently has it patched in place (as get_key_patches does)."""
    backup = patcher.backup.get(key)
    hook_backup = getattr(patcher, "hook_backup", {}).get(key)  # ComfyUI releases before hooks have none
    if hook_backup is not None:
        return hook_backup[0]
    return backup.weight if backup is not None else current


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t.float()).all())


def patched_weights(patcher: Any) -> dict[str, torch.Tensor]:
    """State-dict key → W with every pending patch applied, as ComfyUI computes it on a full load.

    Each weight is computed as ComfyUI's ``patch_weight_to_device`` does (fp32, ``calculate_weight``, ComfyUI's
    rounding to the weight's dtype). Refuses if any result would hold NaN/Inf. ``patcher`` is not modified.
    """
    import comfy.float
    import comfy.lora
    import comfy.model_patcher as mp

    merged: dict[str, torch.Tensor] = {}
    ejected = patcher.use_ejected() if hasattr(patcher, "use_ejected") else contextlib.nullcontext()
    with ejected:
        for key, patches in patcher.patches.items():
            current, set_func, convert_func = mp.get_key_weight(patcher.model, key)
            base = _base_weight(patcher, key, current)
            work = base.to(torch.float32, copy=True)
            if convert_func is not None:
                work = convert_func(work, inplace=True)
            out = comfy.lora.calculate_weight(patches, work, key, intermediate_dtype=torch.float32)
            if set_func is None:  # a plain weight: store what ComfyUI would load; quantized ops keep fp32 for set_func
                out = comfy.float.stochastic_rounding(out, base.dtype, seed=mp.string_to_seed(key))
            if not _finite(out):
                raise LoraValueError(
                    "merging would put NaN/Inf into a weight; nothing was changed",
                    key=key,
                    hint="the LoRA holds NaN/Inf or is too strong for the weight's dtype",
                )
            merged[key] = out.to(patcher.offload_device)
    return merged


def merged_patcher(patcher: Any) -> Any:
    """A clone of ``patcher`` whose patches are replaced by "set" patches holding the merged weights.

    The merged model gives exactly what the patched one gives on a full load (see `patched_weights`).
    """
    merged = patched_weights(patcher)
    clone = patcher.clone()
    clone.patches = {}
    clone.add_patches({key: ("set", (value,)) for key, value in merged.items()}, 1.0, 1.0)
    log.info("merged %d patched weights", len(merged))
    return clone


def merge_and_unload(model: Any | None, clip: Any | None) -> tuple[Any | None, Any | None]:
    """New MODEL/CLIP whose weights hold W + ΔW of every pending patch, with no LoRA patch left (inputs untouched)."""
    if model is not None and not is_model_patcher(model):
        raise LoraValueError(f"MODEL is not a ComfyUI model (got {type(model).__name__})")
    new_model = merged_patcher(model) if model is not None else None
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        new_clip.patcher = merged_patcher(clip.patcher)
    return new_model, new_clip


def unet_weights(model: Any) -> dict[str, torch.Tensor]:
    """Canonical key → effective weight (pending patches applied) of every Linear/Conv weight of a MODEL's UNet."""
    state = model.model_state_dict()
    patched = patched_weights(model) if model.patches else {}
    out = {}
    for name, tensor in state.items():
        if name.startswith(UNET_PREFIX) and name.endswith(".weight") and tensor.ndim >= 2:
            out["unet." + name[len(UNET_PREFIX) : -len(".weight")]] = patched.get(name, tensor)
    return out
