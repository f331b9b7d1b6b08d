"""Build a `Family` from name tables: how a DiT family is declared as data (`flux1` is one).

A DiT's module names are a short list of templates with ``{i}`` for a block index; diffusers' names are a map from
diffusers template to (original template, part of a fused weight or None). `from_tables` turns these tables into
the callables a `Family` needs (checking, translating both ways, detection, blocks), so a family module holds
nothing but data. Block indices are unbounded and must be canonical (``01`` is not an index).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import LoraFormatError
from .base import Family, FusedWeight, TextEncoder

INDEX = r"(0|[1-9]\d*)"


def _compile(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), INDEX))


def from_tables(
    *,
    family_id: str,
    label: str,
    original: tuple[str, ...],
    diffusers: Mapping[str, tuple[str, str | None]],
    text_encoders: tuple[TextEncoder, ...],
    fused: tuple[FusedWeight, ...] = (),
    swap_halves: frozenset[str] = frozenset(),
    blocks: tuple[str, ...] = (),
    diffusers_component: str = "transformer",
    compound_tokens: tuple[str, ...] = (),
    tiny_config: Mapping[str, object] | None = None,
    ss_base_model_version: str = "",
    modelspec_architecture: str = "",
) -> Family:
    """A `Family` whose names are ``original`` templates and the ``diffusers`` template map.

    ``blocks``: the template prefixes that are blocks (``"double_blocks.{i}"``), for per-block weights.
    kohya's flattened names are unflattened with every name component that holds a ``_`` (derived from the
    templates; ``compound_tokens`` adds others).
    Every diffusers target must be one of the original templates, and every part one of its fused weight's parts.
    """
    originals = [(t, _compile(t)) for t in original]
    from_d = [(_compile(d), o, part) for d, (o, part) in diffusers.items()]
    to_d = {(o, part): d for d, (o, part) in diffusers.items()}
    block_res = [re.compile(re.escape(b).replace(re.escape("{i}"), INDEX) + r"(?:\.|$)") for b in blocks]
    for o, part in to_d:
        if o not in original:
            raise ValueError(f"{family_id}: diffusers target {o!r} is not an original module")
        spec = next((f for f in fused if f.matches(o.replace("{i}", "0"))), None)
        if part is not None and (spec is None or part not in {p.name for p in spec.parts}):
            raise ValueError(f"{family_id}: {o!r} has no fused part {part!r}")

    def unknown(path: str, spelling: str) -> LoraFormatError:
        return LoraFormatError(f"not a module of the {label} model in {spelling} naming", key=path,
                               hint="check the model family, or that the key names a layer with weights")

    def template_of(path: str) -> tuple[str, str | None] | None:
        for template, pattern in originals:
            m = pattern.fullmatch(path)
            if m:
                return template, (m.group(1) if m.groups() else None)
        return None

    def original_path(path: str) -> str:
        if template_of(path) is None:
            raise unknown(path, "original")
        return path

    def from_diffusers(path: str) -> tuple[str, str | None]:
        for pattern, target, part in from_d:
            m = pattern.fullmatch(path)
            if m:
                return (target.replace("{i}", m.group(1)) if m.groups() else target), part
        raise unknown(path, "diffusers")

    def to_diffusers(path: str, part: str | None) -> str:
        found = template_of(path)
        name = to_d.get((found[0], part)) if found else None
        if name is None:
            where = path if part is None else f"{path}[{part}]"
            raise LoraFormatError(f"{label} module has no diffusers name", key=where)
        return name.replace("{i}", found[1]) if found[1] is not None else name

    def is_diffusers_path(path: str) -> bool:
        """Spelled only the diffusers way (names both spellings share, like Z-Image's ``feed_forward.w1``, count
        as original: either way they are the same canonical module)."""
        return template_of(path) is None and any(p.fullmatch(path) for p, _, _ in from_d)

    def knows(path: str) -> bool:
        try:
            from_diffusers(path) if is_diffusers_path(path) else original_path(path)
        except LoraFormatError:
            return False
        return True

    def block_of(path: str) -> str | None:
        for pattern in block_res:
            m = pattern.match(path)
            if m:
                return m.group(0).rstrip(".")
        return None

    derived = {c for t in (*original, *diffusers) for c in t.split(".") if "_" in c and "{" not in c}
    return Family(
        id=family_id, label=label, diffusers_component=diffusers_component, text_encoders=text_encoders,
        original_path=original_path, from_diffusers=from_diffusers, to_diffusers=to_diffusers,
        is_diffusers_path=is_diffusers_path, knows=knows, block_of=block_of, fused=fused, swap_halves=swap_halves,
        kohya_style="original",
        compound_tokens=tuple(sorted(derived | set(compound_tokens))), tiny_config=dict(tiny_config or {}),
        ss_base_model_version=ss_base_model_version or family_id, modelspec_architecture=modelspec_architecture,
    )
