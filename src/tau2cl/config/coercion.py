"""Turning a value from any source into a field's type: one converter per base type.

Each converter takes a native value (from YAML, JSON or Python) or a string (from the command line)
and raises TypeError/ValueError when it cannot be that type; `coerce` turns that into a one-sentence
UserError naming the flag.
"""

from __future__ import annotations

import math
import typing
from functools import cache
from typing import Any

from tau2cl.errors import UserError

_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise TypeError(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    number = float(value)  # YAML reads 1e-6 (no dot) as a string; float() accepts it
    if math.isnan(number):
        raise ValueError(value)
    return number


def _to_str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(value)
    return str(value)


def _to_str_list(value: Any) -> list[str]:
    """A list from `a b`, `a,b` or ["a", "b,c"]: every item split on commas, blanks dropped."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise TypeError(value)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _to_float_list(value: Any) -> list[float]:
    """A list of numbers from `0.5 1` or `0.5,1` (items split like names) or [0.5, 1]."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_to_float(v) for item in items for v in (_to_str_list(item) if isinstance(item, str) else [item])]


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
_LIST_CONVERTERS = {str: _to_str_list, float: _to_float_list}  # by item type
_TYPE_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}
_LIST_WORDS = {str: "a list of names", float: "a list of numbers"}


@cache
def hint_type(hint: Any) -> tuple[type, bool]:
    """(base type, optional) of a type hint: `int | None` → (int, True), `list[str]` → (list, False)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(arg for arg in args if arg is not type(None))
    return typing.get_origin(hint) or hint, optional


@cache
def hint_item_type(hint: Any) -> type:
    """The item type of a list hint: `list[float]` → float."""
    (item,) = typing.get_args(hint)
    return item


def coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` as the type `hint` names (none allowed where it is optional), or a UserError for --name."""
    base, optional = hint_type(hint)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
        return None
    if value is None:
        raise UserError(
            f"--{name} cannot be none; give it a value or leave it out for the default."
        )
    item = hint_item_type(hint) if base is list else None
    try:
        return _LIST_CONVERTERS[item](value) if item else _CONVERTERS[base](value)
    except (TypeError, ValueError):
        none = " or none" if optional else ""
        words = _LIST_WORDS[item] if item else _TYPE_WORDS[base]
        raise UserError(f"--{name} expects {words}{none}, got {value!r}.") from None
