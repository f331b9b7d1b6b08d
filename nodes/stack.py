"""LoraOpsStack: rows of (lora, enabled, strength_model, strength_clip) → LORA_STACK, chainable.

The rows live in one JSON widget (`rows`) that the front end (web/loraops_stack.js) draws as a list with
add / remove / reorder, toggles and strengths; without the front end it is plain editable JSON.
"""

from __future__ import annotations

import json
import math

from ..lora_ops.errors import LoraValueError
from ..lora_ops.files import load_lora
from . import comfy_env
from .load import content_hash, resolve_lora
from .types import CATEGORY, LORA, LORA_STACK, StackEntry

EXAMPLE_ROWS = '[{"lora": "my_style.safetensors", "enabled": true, "strength_model": 1.0, "strength_clip": 1.0}]'


def parse_rows(text: str) -> list[dict]:
    """Validated rows; a clear message names the row and the field that is wrong."""
    try:
        rows = json.loads(text or "[]")
    except json.JSONDecodeError as err:
        raise LoraValueError(f"rows are not valid JSON ({err.msg})", hint=f"expected e.g. {EXAMPLE_ROWS}") from None
    if not isinstance(rows, list):
        raise LoraValueError("rows must be a JSON list", hint=f"expected e.g. {EXAMPLE_ROWS}")
    out = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("lora"), str):
            raise LoraValueError(f"row {i} needs a 'lora' file name")
        strengths = []
        for field in ("strength_model", "strength_clip"):
            value = row.get(field, 1.0)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LoraValueError(f"row {i} ({row['lora']}): {field} must be a finite number, got {value!r}")
            strengths.append(float(value))
        out.append({"lora": row["lora"], "enabled": bool(row.get("enabled", True)),
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
        except LoraValueError as err:
            return str(err)
        missing = [r["lora"] for r in parsed if r["enabled"] and comfy_env.lora_path(r["lora"]) is None]
        return f"LoRA file(s) not found in the loras folders: {', '.join(missing)}" if missing else True

    @classmethod
    def IS_CHANGED(cls, rows="[]", **_kw):
        try:
            parsed = parse_rows(rows)
        except LoraValueError:
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

