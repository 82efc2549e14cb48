"""Checks of reader settings (constructor keys from YAML): a bad value fails at construction, naming its
key, before any file is read. One function per kind of value, shared by every reader."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np


def check_int(value, key: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{key}={value!r} is invalid: expected an integer {bound}")
    return int(value)


def check_number(value, key: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{key}={value!r} is invalid: expected a number in [{low:g}, {high:g}]")
    return float(value)


def check_fraction(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{key}={value!r} is invalid: expected a number > 0 and < 1")
    return float(value)


def check_choice(value, key: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{key}={value!r} is invalid: expected one of {', '.join(choices)}")
    return value


def check_floats(value, key: str, n: Optional[int] = None, positive: bool = False) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if not out or (n is not None and len(out) != n) or (positive and min(out) <= 0):
        count = f"{n} " if n is not None else ""
        kind = "positive numbers" if positive else "numbers"
        raise ValueError(f"{key}={value!r} is invalid: expected a list of {count}{kind}")
    return out


def check_mask_threshold(value, key: str = "mask_threshold") -> Optional[int]:
    """None (the documented encodings only) or an integer 0..254 (foreground = value > threshold)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 254:
        raise ValueError(f"{key}={value!r} is invalid: expected null (masks in 0/255 or 0/1) or an integer 0..254 "
                         f"(foreground = value > threshold)")
    return int(value)


PLAIN = (str, int, float, bool, type(None))


def plain_values(config: Mapping[str, Any], where: str, error: type[Exception]) -> dict[str, Any]:
    """The keyword values of a config that names its builder in `_target_` (left out here): each a plain value
    (string, number, bool, null) or a list of those. Nothing nested, no `_args_`: a config is data, and only
    the builder an allow-list names is called with these values (data.readers, models)."""
    out = {}
    for key, value in config.items():
        if key == "_target_":
            continue
        if not isinstance(key, str) or key.startswith("_"):
            raise error(f"{where}.{key} is not allowed: expected _target_ and plain keyword values")
        if isinstance(value, (list, tuple)):
            if not all(isinstance(v, PLAIN) for v in value):
                raise error(f"{where}.{key} holds a nested value: expected a plain value or a list of plain values "
                            f"(string, number, bool, null)")
            value = list(value)
        elif not isinstance(value, PLAIN):
            raise error(f"{where}.{key} holds a {type(value).__name__}: expected a plain value (string, number, bool, "
                        f"null) or a list of those")
        out[key] = value
    return out
