"""One exception family for everything LoRA Ops refuses to do.

Every error names the file, the key and the reason, and where possible says how to fix it, so that a user
sees one readable line (CLI) or one ComfyUI error message instead of a traceback from deep inside torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

Wording = Sequence[tuple[str, str]]
"""(regex, replacement) pairs that turn the library's API wording into an audience's (CLI flags, node inputs)."""


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

    def message(self, wording: Wording = ()) -> str:
        """The message, with the reason and hint reworded by ``wording`` (applied in order; file and key untouched).

        Library hints speak API (``pass overwrite=True``); the CLI and the nodes pass their own table so that the
        user reads the flag or the input to change (``--overwrite``).
        """
        return self._render(reword(self.reason, wording), reword(self.hint, wording) if self.hint else None)

    def _render(self, reason: str | None = None, hint: str | None = None) -> str:
        reason = self.reason if reason is None else reason
        hint = self.hint if hint is None else hint
        parts = []
        if self.file:
            parts.append(self.file)
        if self.key:
            parts.append(f"key '{self.key}'")
        where = ": ".join(parts)
        text = f"{where}: {reason}" if where else reason
        if hint:
            text += f" ({hint})"
        return text


def reword(text: str, wording: Wording) -> str:
    """``text`` with each (regex, replacement) of ``wording`` substituted, in order."""
    for pattern, replacement in wording:
        text = re.sub(pattern, replacement, text)
    return text


class LoraFileError(LoraOpsError):
    """The file cannot be read or written: missing, truncated, corrupt header, not a model file, unsafe."""


class UnsafeFileError(LoraFileError):
    """A pickle-based file (.pt/.ckpt/.bin) was given without explicit permission to load pickles."""


class LoraFormatError(LoraOpsError):
    """The tensors are readable but do not form a valid LoRA: unknown keys, mismatched ranks, rank 0."""


class LoraValueError(LoraOpsError):
    """An operation got arguments it cannot honour (bad rank rule, NaN result, wrong family)."""
