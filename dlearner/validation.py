"""Checks of user-given settings, each raising a ``ValueError`` that names the setting.

One place for what "an int" or "a finite number" means across dlearner: ``True`` is an ``int`` to
Python but never a count or a rate here, and numpy scalars count like Python ones.

Example::

    >>> positive_int("num_epochs", 3)
    3
    >>> positive_int("num_epochs", True)
    Traceback (most recent call last):
    ...
    ValueError: num_epochs must be an int, got True.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, Tuple

__all__ = [
    "NotProvided",
    "apply_checks",
    "boolean",
    "is_int",
    "is_real",
    "non_negative",
    "non_negative_int",
    "positive",
    "positive_int",
    "unit_interval",
]


class _NotProvided:
    """Marks a keyword the caller did not pass (``None`` is a real value for many settings)."""

    def __repr__(self) -> str:
        return "NotProvided"


NotProvided: Any = _NotProvided()


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or numpy) and not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (Python or numpy, ints included) and not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(name: str, value: Any, *, allow_none: bool = False, allow_zero: bool = False) -> Any:
    """``value`` as an ``int`` >= 1 (>= 0 with ``allow_zero``; ``None`` passes with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}.")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    """``value`` as an ``int`` >= 0."""
    return positive_int(name, value, allow_zero=True)


def non_negative(name: str, value: Any) -> float:
    """``value`` as a finite ``float`` >= 0."""
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def positive(name: str, value: Any) -> float:
    """``value`` as a finite ``float`` > 0."""
    value = non_negative(name, value)
    if value == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    return value


def unit_interval(name: str, value: Any) -> float:
    """``value`` as a ``float`` in [0, 1]."""
    number = non_negative(name, value)
    if number > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    return number


def boolean(name: str, value: Any) -> bool:
    """``value`` itself when it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


Check = Callable[[str, Any], Any]


def apply_checks(target: Any, settings: Mapping[str, Tuple[Any, Check]]) -> None:
    """Check each provided setting and set it on ``target``; ``NotProvided`` ones are left alone.

    ``settings`` maps a name to ``(value, check)``; every value is checked before any is set, so a
    bad one leaves ``target`` as it was.
    """
    checked = {name: check(name, value) for name, (value, check) in settings.items() if value is not NotProvided}
    for name, value in checked.items():
        setattr(target, name, value)
