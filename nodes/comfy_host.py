"""The ComfyUI host: MODEL (a ModelPatcher) and CLIP as LoRA targets — the only module that imports comfy.

ComfyUI is imported lazily inside the functions, so the pack (and its tests) import without it.

Applying goes through ComfyUI's own patch mechanism, as `comfy.sd.load_lora_for_models` does (clone, then
`add_patches`; the CLIP side on ``clip.patcher``), so that ComfyUI's memory management, low-VRAM offload, hooks and
every sampler keep working and the input MODEL/CLIP stay untouched. The key map is ours, not ComfyUI's: every matched
layer goes into a ComfyUI LoRA state dict under its canonical key, with ``key_map`` pointing it at the weight it
patches — ``"diffusion_model.X.weight"`` for a whole layer, ``("diffusion_model.X.weight", (0, start, length))`` for a
layer on part of a fused weight (``unet.X[q]``: FLUX.1's q/k/v/mlp rows, from the family's `FusedWeight` and the
weight's own row count) — and `comfy.lora.load_lora` builds ComfyUI's own weight adapters from it (LoRA, LoCon,
LoHa, LoKr, DoRA: whatever ComfyUI can apply). So a LoRA applies fully whatever spelling its file used, including
those ComfyUI's key map drops (diffusers-named SD attention, XLabs, DiffSynth, ``diffusion_model.<diffusers name>``).
Coverage is checked first (a wrong-family LoRA is refused with the likely cause), and afterwards we verify that
ComfyUI built an adapter for, and took, every matched layer: ComfyUI itself only logs what it skips.

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
import inspect
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..lora_ops import families, fused
from ..lora_ops.coverage import CoverageReport, combine_reports, family_label
from ..lora_ops.errors import LoraValueError
from ..lora_ops.formats.layers import layer_tensors
from ..lora_ops.hosts.base import ApplyItem, check_items
from ..lora_ops.lora import LoRA, is_text_encoder_key, part_of

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
UNET_PREFIX = "diffusion_model."
LORA_KEYS = "lora_ops:"  # our names in the ComfyUI LoRA state dict handed to comfy.lora.load_lora
# Where a text encoder's weights start inside ComfyUI's CLIP module, by kind (CLIP: text_model + text_projection).
TE_ROOTS = {"clip": ("text_model.", "text_projection"), "t5": ("encoder.",)}
# ComfyUI model-config class → our family, for models whose weight names do not tell (labels otherwise).
CONFIG_FAMILIES = {"SD15": "sd1", "SD20": "sd1", "SDXL": "sdxl", "Flux": "flux1", "FluxSchnell": "flux1",
                   "FluxInpaint": "flux1", "ZImage": "zimage", "QwenImage": "qwen_image"}


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


def clip_prefixes(family: str | None = None) -> dict[str, families.TextEncoder]:
    """ComfyUI CLIP state-dict prefix (``clip_l.transformer.``, ``t5xxl.transformer.``) → the text encoder there.

    From the family's ``text_encoders`` (`TextEncoder.comfyui` is ``text_encoders.<name>.transformer.``, ComfyUI's
    generic LoRA name for ``<name>.transformer.``); with no registered family, every registered family's.
    """
    fams = [families.REGISTRY[family]] if family in families.REGISTRY else list(families.REGISTRY.values())
    out: dict[str, families.TextEncoder] = {}
    for fam in fams:
        for te in fam.text_encoders:
            out.setdefault(te.comfyui.removeprefix("text_encoders."), te)
    return out


def clip_targets(clip: Any, family: str | None = None) -> dict[str, Shape]:
    """Canonical key (``te1.text_model.…``, ``te2.…``, ``te3.encoder.…``) → weight shape for the text-encoder weights
    of a CLIP (CLIP-L / CLIP-G / T5-XXL, as ``family``'s text encoders name them)."""
    prefixes = clip_prefixes(family)
    out = {}
    for name, tensor in clip.cond_stage_model.state_dict().items():
        if not name.endswith(".weight"):
            continue
        for prefix, te in prefixes.items():
            rest = name[len(prefix) : -len(".weight")]
            if name.startswith(prefix) and rest.startswith(TE_ROOTS[te.kind]):
                out[f"{te.part}.{rest}"] = tuple(tensor.shape)
    return out


def model_family(model: Any, unet_keys: Sequence[str] | None = None) -> str | None:
    """The family the MODEL's weight names give ("sd1", "sdxl", "flux1"); else its ComfyUI model-config name mapped
    through `CONFIG_FAMILIES` (unregistered configs keep their class name, e.g. "SD3", for the messages)."""
    keys = unet_targets(model) if unet_keys is None else unet_keys
    family = families.detect(k.removeprefix("unet.") for k in keys)
    if family is not None:
        return family
    config = getattr(getattr(model, "model", None), "model_config", None)
    name = type(config).__name__ if config is not None else None
    return CONFIG_FAMILIES.get(name, name)


def _patch_key(canonical: str, family: str | None = None) -> str:
    """The state-dict key ComfyUI patches for a canonical key (``unet.X`` and ``unet.X[q]`` →
    ``diffusion_model.X.weight``; ``te1.P`` → ``clip_l.transformer.P.weight``)."""
    module, _ = fused.parse_key(canonical)
    part, path = module.split(".", 1)
    if part == "unet":
        return f"{UNET_PREFIX}{path}.weight"
    prefix = next((p for p, te in clip_prefixes(family).items() if te.part == part), None)
    if prefix is None:
        raise LoraValueError(f"no ComfyUI text encoder for '{part}' in {family_label(family)} models", key=canonical)
    return f"{prefix}{path}.weight"


def _target(key: str, family: str | None, targets: Mapping[str, Shape]) -> str | tuple[str, tuple[int, int, int]]:
    """ComfyUI's patch target for a matched layer: the weight key, or (weight key, (0, start, length)) for a part.

    The part's rows come from the family's `FusedWeight` and the weight's own row count (as coverage placed them).
    """
    weight = _patch_key(key, family)
    rows = fused.part_rows(family if family in families.REGISTRY else None, key, targets[fused.parse_key(key)[0]][0])
    return weight if rows is None else (weight, (0, *rows))


def comfy_lora(
    lora: LoRA, keys: Sequence[str], targets: Mapping[str, Shape], family: str | None
) -> tuple[dict[str, torch.Tensor], dict[str, str | tuple]]:
    """The layers ``keys`` of ``lora`` as a ComfyUI LoRA state dict under names of ours, and the key map from those
    names to ComfyUI patch targets — the two arguments of `comfy.lora.load_lora`.

    Tensors keep ComfyUI's suffixes (``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha`` / ``.lora_mid.weight``
    / ``.dora_scale`` / LyCORIS ``.hada_*`` / ``.lokr_*``), which its weight adapters read. ``family`` places the
    rows of part layers (the LoRA's own family when it has one, as coverage does).
    """
    place = lora.family if lora.family is not None else family
    sd: dict[str, torch.Tensor] = {}
    key_map: dict[str, str | tuple] = {}
    for key in keys:
        name = LORA_KEYS + key
        key_map[name] = _target(key, place if part_of(key) == "unet" else family, targets)
        for suffix, tensor in layer_tensors(lora.layers[key], "kohya").items():
            sd[name + suffix] = tensor
    return sd, key_map


def _load(sd: Mapping[str, torch.Tensor], key_map: Mapping[str, str | tuple]) -> dict:
    """`comfy.lora.load_lora` on our own key map; raises if ComfyUI built no adapter for a layer."""
    import comfy.lora

    loaded = comfy.lora.load_lora(sd, key_map)
    missing = [name for name, target in key_map.items() if target not in loaded]
    if missing:
        raise LoraValueError(
            f"ComfyUI could not load {len(missing)} of {len(key_map)} matched layers",
            key=missing[0].removeprefix(LORA_KEYS),
            hint="this ComfyUI version has no weight adapter for that layer type; update ComfyUI",
        )
    return loaded


def _verify_taken(
    before: Mapping[str, list], after: Mapping[str, list], keys: Sequence[str], what: str, family: str | None = None
) -> None:
    """Raise if ComfyUI did not add exactly one patch per matched layer (it only logs keys it skips).

    Layers on parts of one fused weight each add a patch to the same weight key, so patches are counted per key.
    """
    expected = Counter(_patch_key(k, family) for k in keys)
    wrong = {w for w, n in expected.items() if len(after.get(w, ())) != len(before.get(w, ())) + n}
    missing = [k for k in keys if _patch_key(k, family) in wrong]
    if missing:
        raise LoraValueError(
            f"ComfyUI did not take {len(missing)} of {len(keys)} matched {what} layers",
            key=missing[0],
            hint="ComfyUI's model disagrees with LoRA Ops' key map for it; please report it with the model type",
        )


def _takes_metadata() -> bool:
    """Whether this ComfyUI's `load_lora_for_models` attaches the file's metadata (``lora_metadata``) to clones."""
    import comfy.sd

    return "lora_metadata" in inspect.signature(comfy.sd.load_lora_for_models).parameters


def _add(obj: Any, loaded: Mapping, strength: float, metadata: Mapping[str, str], *, is_clip: bool) -> Any:
    """A clone of ``obj`` (MODEL or CLIP) with ``loaded`` added, as `comfy.sd.load_lora_for_models` does."""
    clone = obj.clone()
    clone.add_patches(dict(loaded), strength)
    if metadata and _takes_metadata():
        (clone.patcher if is_clip else clone).set_attachments("lora_metadata", dict(metadata))
    return clone


def _patch_one(
    model: Any, clip: Any, lora: LoRA, report: CoverageReport, sm: float, sc: float, targets: Mapping[str, Shape],
    family: str | None,
) -> tuple[Any, Any]:
    """Add one checked LoRA's matched layers as ComfyUI patches (clones; zero strengths skip that side)."""
    unet_keys = [k for k in report.matched if not is_text_encoder_key(k)] if sm != 0 else []
    te_keys = [k for k in report.matched if is_text_encoder_key(k)] if clip is not None and sc != 0 else []
    if not unet_keys and not te_keys:
        return model, clip
    sd, key_map = comfy_lora(lora, unet_keys + te_keys, targets, family)
    loaded = _load(sd, key_map)
    on_unet = {key_map[LORA_KEYS + k] for k in unet_keys}
    unet_patches = {t: p for t, p in loaded.items() if t in on_unet}
    te_patches = {t: p for t, p in loaded.items() if t not in on_unet}
    new_model, new_clip = model, clip
    if unet_keys:
        new_model = _add(model, unet_patches, sm, lora.metadata, is_clip=False)
        _verify_taken(model.patches, new_model.patches, unet_keys, "UNet", family)
    if te_keys:
        new_clip = _add(clip, te_patches, sc, lora.metadata, is_clip=True)
        _verify_taken(clip.patcher.patches, new_clip.patcher.patches, te_keys, "text-encoder", family)
    return new_model, new_clip


def apply_loras(model: Any, clip: Any | None, items: Sequence[ApplyItem]) -> tuple[Any, Any | None, CoverageReport]:
    """Apply several (LoRA, strength_model, strength_clip) on clones of MODEL/CLIP; the inputs stay untouched.

    Every item is checked (coverage, finite strengths) before anything is patched. Without a CLIP, text-encoder
    layers count as not in the model (the nodes drop them first and say so).
    """
    if not is_model_patcher(model):
        raise LoraValueError(f"MODEL is not a ComfyUI model (got {type(model).__name__})")
    unet = unet_targets(model)
    family = model_family(model, list(unet))
    targets = {**unet, **(clip_targets(clip, family) if clip is not None else {})}
    reports = check_items(items, targets, family=family, allow_dora=True)  # ComfyUI applies DoRA itself
    new_model, new_clip = model, clip
    for (lora, sm, sc), report in zip(items, reports):
        new_model, new_clip = _patch_one(new_model, new_clip, lora, report, float(sm), float(sc), targets, family)
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
    import comfy.utils

    seed_of = getattr(comfy.utils, "string_to_seed", None) or mp.string_to_seed  # moved to comfy.utils by 0.33
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
                out = comfy.float.stochastic_rounding(out, base.dtype, seed=seed_of(key))
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
