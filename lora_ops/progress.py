"""Progress for per-layer loops: a tqdm bar on the command line, or a callback for a host's own progress bar.

``progress`` is False (silent), True (tqdm), or a callable ``(done, total)`` called after each item — ComfyUI's
ProgressBar raises from it when the user cancels, which stops the loop within one layer; operations build new
values and write nothing until they finish, so a cancel leaves nothing half-done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
Progress = bool | Callable[[int, int], None]


def track(items: Iterable[T], desc: str, progress: Progress, *, unit: str = "layer") -> Iterator[T]:
    if not callable(progress):
        yield from tqdm(items, desc=desc, unit=unit, disable=not progress)
        return
    total = len(items) if isinstance(items, Sized) else 0
    for done, item in enumerate(items, 1):
        yield item
        progress(done, total)
