"""Reusable value checkers for Field(check=...); each raises fields.Invalid on a bad value."""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Callable, List

from .fields import Invalid, _bounded, _to_float, _to_int


def parse_literal(value: Any) -> Any:
    """Strings such as '[[4,4],[4,2]]' (the guide quotes lists in YAML) become Python data."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise Invalid("could not read the string as a list") from None


def int_list(min_value: int = 0, allow_str_csv: bool = True) -> Callable[[Any], List[int]]:
    """Checker for a list of integers >= min_value ('1,3' is accepted when allow_str_csv)."""
    def check(value: Any) -> List[int]:
        if isinstance(value, str):
            if allow_str_csv and re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", value):
                value = [part.strip() for part in value.split(",")]
            else:
                value = parse_literal(value)
        if value is None:
            return None
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        if not isinstance(value, (list, tuple)):
            raise Invalid("expected a list of integers", type_error=True)
        out = []
        for item in value:
            number = _to_int(item)
            if number < min_value:
                raise Invalid(f"every entry must be >= {min_value}")
            out.append(number)
        return out
    return check


def plain_data(value: Any, depth: int = 0) -> Any:
    """Accept only YAML-representable data (no arbitrary objects inside configs)."""
    if depth > 20:
        raise Invalid("nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        # Integers beyond int64 cannot even be written to YAML (Python's digit limit).
        return _bounded(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid("numbers must be finite")
        return value
    if isinstance(value, (list, tuple)):
        return [plain_data(item, depth + 1) for item in value]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise Invalid(f"mapping keys must be strings, got {key!r}", type_error=True)
            out[key] = plain_data(item, depth + 1)
        return out
    raise Invalid(f"values of type {type(value).__name__} cannot be stored in a config",
                  type_error=True)


def fraction(value: Any, low_open: bool = False) -> float:
    """A float in [0, 1] ((0, 1] with low_open)."""
    number = _to_float(value)
    if number > 1 or number < 0 or (low_open and number == 0):
        raise Invalid(f"must be in {'(' if low_open else '['}0, 1]")
    return number
