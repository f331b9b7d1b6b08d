"""LoraOpsStack: rows of (lora, enabled, strength_model, strength_clip) → LORA_STACK, chainable.

The rows live in one JSON widget (`rows`) that the front end (web/loraops_stack.js) draws as a list with
add / remove / reorder, toggles and strengths; without the front end it is plain editable JSON.
"""

from __future__ import annotations

import json
import math

from ..lora_ops import safe_json
from ..lora_ops.errors import LoraFormatError, LoraOpsError, LoraValueError
from ..lora_ops.files import load_lora
from ..lora_ops.lora import MAX_STRENGTH
from . import comfy_env
from .load import content_hash, resolve_lora
from .types import CATEGORY, LORA, LORA_STACK, StackEntry

EXAMPLE_ROWS = '[{"lora": "my_style.safetensors", "enabled": true, "strength_model": 1.0, "strength_clip": 1.0}]'
MAX_ROWS_CHARS = 1_000_000
"""Longest rows text accepted (a row is ~100 characters)."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"


def parse_rows(text: str) -> list[dict]:
    """Validated rows; a clear message names the row and the field that is wrong.

    The JSON goes through `lora_ops.safe_json` (no NaN/Infinity, no huge integers, bounded nesting, no
    duplicate keys); ``enabled`` must be true/false, strengths finite numbers (not true/false) within
    ±`MAX_STRENGTH`. Every refusal is a `LoraValueError`.
    """
    if not isinstance(text, str):
        raise LoraValueError(f"rows must be text, got {type(text).__name__}", hint=f"expected e.g. {EXAMPLE_ROWS}")
    try:
        rows = safe_json.loads(text.strip() or "[]", expect=list, max_chars=MAX_ROWS_CHARS, max_depth=4)
    except LoraFormatError as err:
        raise LoraValueError(f"rows: {err.reason}", hint=f"expected e.g. {EXAMPLE_ROWS}") from None
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("lora"), str):
            raise LoraValueError(f"row {i} needs a 'lora' file name", hint=f"expected e.g. {EXAMPLE_ROWS}")
        name = row["lora"] if len(row["lora"]) <= 60 else row["lora"][:60] + "…"
        enabled = row.get("enabled", True)
        if not isinstance(enabled, bool):
            raise LoraValueError(f"row {i} ({name}): enabled must be true or false, got {_show(enabled)}")
        strengths = []
        for field in ("strength_model", "strength_clip"):
            value = row.get(field, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LoraValueError(f"row {i} ({name}): {field} must be a finite number, got {_show(value)}")
            if abs(value) > MAX_STRENGTH:
                raise LoraValueError(f"row {i} ({name}): {field} {value:g} is beyond ±{MAX_STRENGTH:g}",
                                     hint="strengths are usually 0–2; at 100× a LoRA already gives noise")
            strengths.append(float(value))
        out.append({"lora": row["lora"], "enabled": enabled,
                    "strength_model": strengths[0], "strength_clip": strengths[1]})
    return out


class LoraOpsStack:
    CATEGORY = CATEGORY
    DESCRIPTION = "A list of LoRAs with enable toggles and strengths. Feed Apply Stack, or Combine into one LoRA."
    RETURN_TYPES = (LORA_STACK,)
    RETURN_NAMES = ("lora_stack",)
    OUTPUT_TOOLTIPS = ("The enabled rows, after any incoming stack.",)
    FUNCTION = "stack"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "rows": ("STRING", {"default": "[]", "multiline": True,
                                    "tooltip": "The rows as JSON (the LoRA Ops front end edits this for you)."}),
            },
            "optional": {
                "lora_stack": (LORA_STACK, {"tooltip": "A stack to extend (its rows come first)."}),
                "lora": (LORA, {"tooltip": "A LoRA from another node (Load, Resize, Train…), added as the last row."}),
                "lora_strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                                  "tooltip": "Model strength of the `lora` input."}),
                "lora_strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                                 "tooltip": "Text-encoder strength of the `lora` input."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, rows="[]", **_kw):
        try:
            parsed = parse_rows(rows)
        except LoraOpsError as err:
            return str(err)
        missing = [r["lora"] for r in parsed if r["enabled"] and comfy_env.lora_path(r["lora"]) is None]
        return f"LoRA file(s) not found in the loras folders: {', '.join(missing)}" if missing else True

    @classmethod
    def IS_CHANGED(cls, rows="[]", **_kw):
        try:
            parsed = parse_rows(rows)
        except LoraOpsError:
            return rows
        return json.dumps([(r, content_hash(resolve_lora(r["lora"]))) for r in parsed if r["enabled"]])

    def stack(self, rows, lora_stack=None, lora=None, lora_strength_model=1.0, lora_strength_clip=1.0):
        entries = list(lora_stack or ())
        for row in parse_rows(rows):
            if row["enabled"]:
                value = load_lora(resolve_lora(row["lora"]))
                entries.append(StackEntry(value, row["lora"], row["strength_model"], row["strength_clip"]))
        if lora is not None:
            entries.append(StackEntry(lora, "lora input", float(lora_strength_model), float(lora_strength_clip)))
        return (tuple(entries),)

