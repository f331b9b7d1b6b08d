"""One exception family for everything LoRA Ops refuses to do.

Every error names the file, the key and the reason, and where possible says how to fix it, so that a user
sees one readable line (CLI) or one ComfyUI error message instead of a traceback from deep inside torch.
"""

from __future__ import annotations

from pathlib import Path


class LoraOpsError(Exception):
    """Base class: catch this to handle any LoRA Ops refusal."""

    def __init__(
        self,
        reason: str,
        *,
        file: str | Path | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = str(file) if file is not None else None
        self.key = key
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.key:
            parts.append(f"key '{self.key}'")
        where = ": ".join(parts)
        text = f"{where}: {self.reason}" if where else self.reason
        if self.hint:
            text += f" ({self.hint})"
        return text


class LoraFileError(LoraOpsError):
    """The file cannot be read or written: missing, truncated, corrupt header, not a model file, unsafe."""


class UnsafeFileError(LoraFileError):
    """A pickle-based file (.pt/.ckpt/.bin) was given without explicit permission to load pickles."""


class LoraFormatError(LoraOpsError):
    """The tensors are readable but do not form a valid LoRA: unknown keys, mismatched ranks, rank 0."""


class LoraValueError(LoraOpsError):
    """An operation got arguments it cannot honour (bad rank rule, NaN result, wrong family)."""
