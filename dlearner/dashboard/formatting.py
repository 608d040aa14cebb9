"""How the page writes numbers, durations, ages and axis ticks (plain text; the templates escape it)."""

from __future__ import annotations

import math
import time
from typing import Any, List, Optional, Tuple


def fmt(value: Any) -> str:
    """A metric as the page shows it: thousands separators, 4 significant digits, ``–`` for none."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def fmt_seconds(value: Optional[float]) -> str:
    """A duration: milliseconds below one second (``12.5 ms``), seconds above (``1.25 s``)."""
    if value is None:
        return "–"
    return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"


def age(timestamp: Optional[float], now: Optional[float] = None) -> str:
    """How long ago ``timestamp`` was: ``42 s``, ``12 min``, ``3.5 h``."""
    if timestamp is None:
        return "–"
    seconds = max(0.0, (time.time() if now is None else now) - float(timestamp))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def clock_time(timestamp: Optional[float]) -> str:
    """A time of day in this process's time zone: ``14:03:27``, with the date when not today."""
    if timestamp is None:
        return "–"
    when = time.localtime(float(timestamp))
    same_day = time.strftime("%Y-%m-%d", when) == time.strftime("%Y-%m-%d")
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", when)


def nice_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    """Round tick values covering ``[lo, hi]``: steps of 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def fmt_tick(value: float, step: float) -> str:
    """A tick label with just the digits its step needs (``25 000``, ``0.5``, ``1.2e+06``)."""
    if value == 0:
        return "0"
    if abs(value) >= 1e6:
        return f"{value:.3g}"
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:,.{decimals}f}"


def padded_range(lo: float, hi: float) -> Tuple[float, float]:
    """``(lo, hi)``, widened around a single value so that a flat curve still gets an axis."""
    if hi - lo < 1e-12:  # one point, or a flat line: give the axis some height
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi
