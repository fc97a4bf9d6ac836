"""Checks of what a JSON or pickled file holds, one entry at a time, each failure one line that
names the file (``where``) and the entry. Files are checked once, where they are loaded."""

from __future__ import annotations

import math
from typing import Any

from utils import UserError

_NAMES = {
    int: "an integer",
    float: "a finite number",
    str: "a string",
    list: "a list",
    dict: "an object",
    bool: "a boolean",
}


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return _is(value, float)


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def entry(mapping: Any, key: str, kind: type, where: str, default: Any = ...) -> Any:
    """``mapping[key]``, which must be of ``kind`` (an int counts as a float, a bool as neither);
    a missing key is an error unless a ``default`` is given."""
    if not isinstance(mapping, dict):
        raise UserError(f"{where} is not an object")
    if key not in mapping:
        if default is not ...:
            return default
        raise UserError(f"{where} has no {key!r} entry")
    value = mapping[key]
    if not _is(value, kind):
        raise UserError(f"{where}: {key!r} must be {_NAMES.get(kind, kind.__name__)}, got {_short(value)}")
    return value


def items(values: Any, kind: type, where: str) -> list:
    """A list whose every element is of ``kind``."""
    if not isinstance(values, list):
        raise UserError(f"{where} must be a list, got {_short(values)}")
    for i, value in enumerate(values):
        if not _is(value, kind):
            raise UserError(f"{where}[{i}] must be {_NAMES.get(kind, kind.__name__)}, got {_short(value)}")
    return values


def in_range(value: float, low: float, high: float, where: str) -> None:
    if not low <= value <= high:
        raise UserError(f"{where} must be between {low} and {high}, got {value}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
