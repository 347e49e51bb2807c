"""Argument checks, one home for every range rule: an integer >= a minimum, a number in
an interval, one of a set of names.

Each raises ``error`` (``ValueError`` unless told; ``pgvar.config`` passes its
``ConfigError``) with a message that names the argument, the valid values and what
was given, and returns the value in its checked type.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any


def require(condition: bool, message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` unless ``condition`` holds."""
    if not condition:
        raise error(message)


def require_int(name: str, value: Any, minimum: int = 1,
                error: type[Exception] = ValueError) -> int:
    """``value`` as an int no smaller than ``minimum``; a bool, a float or text is refused
    (numpy integers are integers)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    require(ok, f"{name} must be an integer >= {minimum}, got {value!r}", error)
    return int(value)


def require_in_range(name: str, value: Any, low: float, high: float, low_open: bool = False,
                     high_open: bool = False, error: type[Exception] = ValueError) -> float:
    """``value`` as a float in the interval from ``low`` to ``high``, each end closed
    unless flagged open; NaN, a bool and text are refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    require(ok, f"{name} must lie in {interval}, got {value!r}", error)
    return float(value)


def require_choice(name: str, value: Any, choices: Collection[str],
                   error: type[Exception] = ValueError) -> Any:
    """``value`` must be one of ``choices``."""
    require(value in choices,
            f"{name}={value!r} is not valid; valid values: {', '.join(map(str, choices))}", error)
    return value
