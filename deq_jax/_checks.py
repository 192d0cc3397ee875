"""Argument checks shared by every public constructor and function: one wording for each kind of error."""
from __future__ import annotations

import math
import numbers

import numpy as np


def _is_number(value) -> bool:
    """A finite real number: Python's or numpy's (``np.float32(1e-3)``), not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Real) and math.isfinite(value)


def _is_int(value) -> bool:
    """An integer, Python's or numpy's (``np.int64(25)``), not a bool."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Integral)


def check_int(owner: str, minimum: int = 1, **values) -> None:
    """Raises ``ValueError`` for an option that is not an int ``>= minimum`` (numpy's too; bools are not ints here).

    Examples:
      >>> check_int("Anderson", m=5, max_iter=25)
      >>> check_int("Phantom", steps=0)
      Traceback (most recent call last):
      ...
      ValueError: Phantom: steps must be an int >= 1, got 0.
    """
    for name, value in values.items():
        if not _is_int(value) or value < minimum:
            raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}.")


def check_number(owner: str, name: str, value, *, low: float = 0.0, high: float = math.inf,
                 low_open: bool = True, high_open: bool = True) -> None:
    """Raises ``ValueError`` unless ``value`` is a finite number in the interval from ``low`` to ``high``.

    Args:
      owner: the class or function, for the message.
      name: the option's name.
      value: what came in.
      low, high: the interval's ends; ``low_open``/``high_open`` leave an end out.

    Examples:
      >>> check_number("Phantom", "damping", 1.5, high=1.0, high_open=False)
      Traceback (most recent call last):
      ...
      ValueError: Phantom: damping must be a number in (0, 1], got 1.5.
    """
    inside = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not inside:
        raise ValueError(f"{owner}: {name} must be {describe_interval(low, high, low_open, high_open)}, got {value!r}.")


def describe_interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """``'a positive number'``, ``'a number >= 0'`` or ``'a number in (0, 1]'``."""
    if high == math.inf:
        return "a positive number" if (low, low_open) == (0, True) else f"a number {'>' if low_open else '>='} {low:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


EXAMPLES = ("independent", "coupled")


def check_examples(owner: str, examples) -> None:
    """Raises ``ValueError`` unless ``examples`` is ``"independent"`` or ``"coupled"``."""
    if examples not in EXAMPLES:
        raise ValueError(f"{owner}: examples must be 'independent' or 'coupled', got {examples!r}.")
