"""What is in a LoRA, before you trust it: format, family, parts, ranks, alphas, dtypes, metadata, NaN/Inf.

`inspect_lora` returns a plain JSON-serialisable dict (the CLI prints it with --json, nodes show `format_report`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from . import families, fused, safe_json
from . import lora as L
from .errors import LoraFormatError
from .lora import LoRA

TRIGGER_KEYS = ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words", "trigger_phrase")


def trigger_words(metadata: Mapping[str, str], top: int = 10, problems: list[str] | None = None) -> list[str]:
    """Trigger phrases from modelspec/kohya metadata, then the most frequent training tags (``ss_tag_frequency``).

    The metadata is informational, so a malformed ``ss_tag_frequency`` (bad JSON, NaN, absurd numbers, deep
    nesting, wrong types) never makes this fail: its tags are left out and, when ``problems`` is given, a line
    saying why is appended to it.
    """
    words: list[str] = []
    for key in TRIGGER_KEYS:
        if metadata.get(key):
            words += [w.strip() for w in metadata[key].split(",") if w.strip()]
    freq: object = {}
    if metadata.get("ss_tag_frequency"):
        try:
            freq = safe_json.loads_object(metadata["ss_tag_frequency"], key="ss_tag_frequency")
        except LoraFormatError as err:
            if problems is not None:
                problems.append(str(err))
    counts: Counter[str] = Counter()
    skipped = 0
    for tags in freq.values() if isinstance(freq, dict) else ():
        if not isinstance(tags, dict):
            skipped += 1
            continue
        for t, n in tags.items():
            if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n):
                skipped += 1
                continue
            counts[str(t).strip()] += int(n)
    if skipped and problems is not None:
        problems.append(f"key 'ss_tag_frequency': {skipped} entr{'y' if skipped == 1 else 'ies'} ignored "
                        "(not a folder → {tag: count} object of numbers)")
    words += [t for t, _ in counts.most_common(top) if t and t not in words]
    return words


def non_finite_layers(lora: LoRA) -> list[str]:
    bad = []
    for key, layer in lora.layers.items():
        if any(t.is_floating_point() and not torch.isfinite(t.float()).all() for t in layer.tensors().values()):
            bad.append(key)
    return bad


def fused_weight_counts(lora: LoRA) -> dict[str, dict[str, int]]:
    """Fused-weight pattern (block index as ``*``) → layers per part, ``whole`` for layers on the full weight.

    Tells at a glance whether a FLUX.1 LoRA updates ``linear1`` whole (kohya) or per q/k/v/mlp (diffusers), and
    which parts a partial LoRA leaves alone.
    """
    if lora.family is None:
        return {}
    fam = families.get(lora.family)
    out: dict[str, Counter] = {}
    for key in lora.layers:
        module, part = fused.parse_key(key)
        path = module.removeprefix("unet.")
        if module == path or fam.fused_weight(path) is None:
            continue
        pattern = re.sub(r"\.\d+\.", ".*.", path, count=1)
        out.setdefault(pattern, Counter())[part or "whole"] += 1
    return {p: dict(c) for p, c in sorted(out.items())}


def inspect_lora(lora: LoRA, file: str | Path | None = None) -> dict:
    parts = Counter(L.part_of(k) for k in lora.layers)
    ranks = Counter(layer.rank for layer in lora.layers.values())
    alphas = Counter(layer.alpha for layer in lora.layers.values())
    kinds = Counter(
        "dora" if getattr(layer, "dora_scale", None) is not None else layer.kind for layer in lora.layers.values()
    )
    problems: list[str] = []  # malformed informational metadata: reported, never fatal
    report = {
        "file": str(file) if file else None,
        "file_bytes": Path(file).stat().st_size if file and Path(file).is_file() else None,
        "format": lora.source_format,
        "family": lora.family,
        "layers": len(lora.layers),
        "parts": dict(sorted(parts.items())),
        "fused_weights": fused_weight_counts(lora),
        "kinds": dict(sorted(kinds.items())),
        "conv_layers": sum(1 for layer in lora.layers.values() if layer.is_conv),
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "alphas": {("none (= rank)" if a is None else f"{a:g}"): n for a, n in alphas.most_common()},
        "dtypes": sorted(str(d).removeprefix("torch.") for d in L.dtypes(lora)),
        "parameters": L.num_params(lora),
        "tensor_bytes": L.nbytes(lora),
        "non_finite_layers": non_finite_layers(lora),
        "trigger_words": trigger_words(lora.metadata, problems=problems),
        "metadata_problems": problems,
        "metadata": {k: (v if len(v) <= 200 else v[:200] + "…") for k, v in sorted(lora.metadata.items())},
    }
    return report


def format_report(report: Mapping) -> str:
    """A short human-readable summary of `inspect_lora`'s dict."""
    lines = [
        f"file: {report['file']}" if report.get("file") else None,
        f"format: {report['format']}   family: {report['family'] or 'unknown'}",
        f"layers: {report['layers']}  ({', '.join(f'{p}: {n}' for p, n in report['parts'].items())})"
        f"   kinds: {', '.join(f'{k}: {n}' for k, n in report['kinds'].items())}   conv: {report['conv_layers']}",
        *(f"fused {p}: " + ", ".join(f"{part} ×{n}" for part, n in counts.items())
          for p, counts in (report.get("fused_weights") or {}).items()),
        f"ranks: {', '.join(f'{r} ×{n}' for r, n in report['ranks'].items())}",
        f"alphas: {', '.join(f'{a} ×{n}' for a, n in report['alphas'].items())}",
        f"dtypes: {', '.join(report['dtypes'])}   parameters: {report['parameters']:,}"
        f"   tensor bytes: {report['tensor_bytes']:,}"
        + (f"   file bytes: {report['file_bytes']:,}" if report.get("file_bytes") else ""),
        f"trigger words: {', '.join(report['trigger_words'])}" if report["trigger_words"] else "trigger words: none",
    ]
    bad = report["non_finite_layers"]
    lines.append(f"WARNING: NaN/Inf in {len(bad)} layer(s): {', '.join(bad[:5])}" if bad else "NaN/Inf: none")
    meta = report["metadata"]
    lines.append(f"metadata: {len(meta)} key(s)" + (": " + ", ".join(list(meta)[:12]) if meta else "")
                 + (f" … (+{len(meta) - 12} more; the JSON report lists all)" if len(meta) > 12 else ""))
    lines += [f"WARNING: metadata problem: {p}" for p in report.get("metadata_problems") or ()]
    return "\n".join(line for line in lines if line)
