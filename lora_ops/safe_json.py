"""Parse untrusted JSON text from a LoRA file's metadata (or a config file beside it) without surprises.

Metadata strings come from whoever made the file. Python's `json` module, given such text, can fail in ways that
are not `json.JSONDecodeError` and so escape the usual ``except``: an integer of more than 4300 digits raises a
plain ValueError (Python's int-string conversion limit), nesting a few thousand levels deep raises RecursionError,
and ``NaN`` / ``Infinity`` / ``1e999`` are accepted as floats that then poison an alpha. Duplicate object keys are
accepted too, the last silently overwriting the others. `loads` refuses all of these with one `LoraFormatError`
naming the file and the metadata key, checks the nesting depth with a linear scan *before* `json.loads` runs (so
the recursive decoder never sees deep input), and checks the type of the top-level value.

The typed getters below (`finite_number`, `positive_int`, `number_map`, `positive_int_map`) read single fields of
a parsed config — the PEFT `LoraConfig` fields we use — and refuse wrong types the same way, naming the field:
``bool`` is never a number (``True`` would otherwise read as rank 1), and non-finite values are never accepted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from .errors import LoraFormatError

MAX_CHARS = 16 * 1024 * 1024
"""Longest text accepted: metadata JSON (configs, tag frequencies) is kilobytes; the header limit is 100 MB."""
MAX_DEPTH = 32
"""Deepest nesting of arrays/objects accepted; PEFT configs and kohya metadata nest 3 levels at most."""
MAX_INT_DIGITS = 100
"""Longest integer literal accepted (digits); far below Python's 4300-digit limit, far above any real value."""

# A whole JSON string, written as an "unrolled loop" so the regex engine never backtracks; an unterminated string
# runs to the end of the text. Everything left once strings are gone is structure.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_AS_PARENS = str.maketrans("[{]}", "(())")


class _Refused(Exception):
    """Raised from inside json.loads' hooks; turned into a LoraFormatError by `loads`."""


def _where(file: str | Path | None, key: str | None) -> dict:
    return {"file": file, "key": key}


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """An upper bound on how deep ``[``/``{`` nest outside strings, exact for balanced text; stops past ``limit``.

    Brackets inside string literals do not count. No recursion and no per-character Python loop: strings and
    everything but brackets are removed with regexes, then innermost ``()`` pairs are deleted one level per pass
    (the number of passes is the nesting depth), at most ``limit + 1`` passes. Unmatched opening brackets left
    over are added, since a recursive decoder descends into them before it notices the text is invalid.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_AS_PARENS)
    depth = 0
    while "()" in brackets:
        depth += 1
        if depth > limit:
            return depth
        brackets = brackets.replace("()", "")
    return depth + brackets.count("(")


def _parse_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {digits} digits (limit {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} overflows to infinity")
    return value


def _parse_constant(name: str) -> float:
    raise _Refused(f"{name}, which is not JSON (numbers must be finite)")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"the object key '{k[:80]}' appears twice (one value would be silently dropped)")
        out[k] = v
    return out


_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


def json_type(value: object) -> str:
    """How JSON names the type of a parsed value, for messages ("an object", "a number" …)."""
    if isinstance(value, bool) or value is None:
        return _TYPE_NAMES[type(value)]
    if isinstance(value, (int, float)):
        return "a number"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _got(value: object) -> str:
    """A parsed value for a message: its JSON type, plus the value itself when it is short and scalar."""
    if isinstance(value, (dict, list)) or value is None:
        return json_type(value)
    text = json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
    return f"{json_type(value)} {text if len(text) <= 40 else text[:40] + '…'}"


def loads(
    text: str,
    *,
    file: str | Path | None = None,
    key: str | None = None,
    expect: type | None = dict,
    max_chars: int = MAX_CHARS,
    max_depth: int = MAX_DEPTH,
) -> object:
    """The value of JSON ``text`` (metadata ``key`` of ``file``), of type ``expect`` (None: any type).

    Raises `LoraFormatError` for text that is not a string, too long, nested deeper than ``max_depth``, not valid
    JSON, holding NaN/Infinity or numbers that overflow, integers longer than `MAX_INT_DIGITS`, duplicate object
    keys, or a top-level value of another type. Never raises anything else.
    """
    where = _where(file, key)
    if not isinstance(text, str):
        raise LoraFormatError(f"JSON must be given as a string, got {type(text).__name__}", **where)
    if len(text) > max_chars:
        raise LoraFormatError(f"JSON of {len(text):,} characters, more than the limit of {max_chars:,}", **where)
    depth = nesting_depth(text, max_depth)
    if depth > max_depth:
        raise LoraFormatError(f"JSON nested more than {max_depth} levels deep", **where)
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant,
                           object_pairs_hook=_no_duplicates)
    except _Refused as err:
        raise LoraFormatError(f"the JSON holds {err}", **where) from None
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})", **where) from None
    except (ValueError, RecursionError, MemoryError) as err:  # belt and braces: the checks above should catch these
        raise LoraFormatError(f"the JSON cannot be parsed ({type(err).__name__})", **where) from None
    if expect is not None and not isinstance(value, expect):
        raise LoraFormatError(f"must be {_TYPE_NAMES.get(expect, expect.__name__)} in JSON, got "
                              f"{json_type(value)}", **where)
    return value


def loads_object(text: str, *, file: str | Path | None = None, key: str | None = None) -> dict:
    """`loads` for the usual case: the metadata value must be a JSON object."""
    return cast(dict, loads(text, file=file, key=key, expect=dict))


def finite_number(value: object, *, field: str, file: str | Path | None = None, key: str | None = None) -> float:
    """``value`` as a float: an int or float that is finite; ``bool`` and numeric strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraFormatError(f"'{field}' must be a number, got {_got(value)}", **_where(file, key))
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise LoraFormatError(f"'{field}' must be finite, got {_got(value)}", **_where(file, key))
    return number


def positive_int(value: object, *, field: str, file: str | Path | None = None, key: str | None = None) -> int:
    """``value`` as an int ≥ 1; ``bool`` and floats (even integral ones) are refused: a rank is a count."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoraFormatError(f"'{field}' must be a positive integer, got {_got(value)}", **_where(file, key))
    return value


def _mapping(value: object, field: str, file: str | Path | None, key: str | None) -> Mapping:
    if not isinstance(value, Mapping):
        raise LoraFormatError(f"'{field}' must be an object (module name → value), got {json_type(value)}",
                              **_where(file, key))
    return value


def number_map(value: object, *, field: str, file: str | Path | None = None, key: str | None = None
               ) -> dict[str, float]:
    """``value`` as {str: finite float} (a PEFT ``alpha_pattern``); null means empty."""
    if value is None:
        return {}
    return {str(k): finite_number(v, field=f'{field}["{k}"]', file=file, key=key)
            for k, v in _mapping(value, field, file, key).items()}


def positive_int_map(value: object, *, field: str, file: str | Path | None = None, key: str | None = None
                     ) -> dict[str, int]:
    """``value`` as {str: int ≥ 1} (a PEFT ``rank_pattern``); null means empty."""
    if value is None:
        return {}
    return {str(k): positive_int(v, field=f'{field}["{k}"]', file=file, key=key)
            for k, v in _mapping(value, field, file, key).items()}
