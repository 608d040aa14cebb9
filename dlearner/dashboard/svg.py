"""The plain page's charts: inline SVG line charts with round ticks and a legend below the plot.

Every coordinate is computed here and written by the ``chart.svg`` template (which escapes every
label). A chart scales down with the window (``viewBox``, ``max-width: 100%``), never wider than it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from dlearner.dashboard.formatting import fmt_tick, nice_ticks, padded_range
from dlearner.dashboard.templating import render
from dlearner.validation import is_real

#: Line colours, in the order of a chart's series (the Bokeh page's palette: Category10, enough for
#: the store's ``MAX_MODULE_CURVES`` modules).
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: One series of a chart: its legend label, colour and ``(x, y)`` points.
Series = Tuple[str, str, Sequence[Tuple[float, float]]]

_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 12, 42
_LEGEND_ROW = 16
_CHAR_W = 6.5  # about one 11px character: enough to lay the legend out in rows


def render_svg_curve(history: List[Mapping[str, Any]], *, x_label: str, y_label: str, width: int = 520, height: int = 240) -> str:
    """An inline SVG line chart of ``history`` (``[{"x": .., "y": ..}, ...]``) with round ticks;
    points without y are skipped."""
    return render_svg_chart(
        [("", COLORS[0], xy_points(history, "x", "y"))], x_label=x_label, y_label=y_label, width=width, height=height
    )


def xy_points(
    history: Sequence[Mapping[str, Any]], x_key: str, y_key: str, group: Optional[str] = None
) -> List[Tuple[float, float]]:
    """``(point[x_key], point[y_key])`` (or ``point[group][y_key]``) of the points that have both numbers."""
    out = []
    for point in history:
        values = (point.get(group) or {}) if group is not None else point
        x, y = point.get(x_key), values.get(y_key)
        if _number(x) and _number(y):
            out.append((float(x), float(y)))
    return out


def render_svg_chart(
    series: Sequence[Series], *, x_label: str, y_label: str, title: str = "", width: int = 520, height: int = 240
) -> str:
    """An inline SVG chart of several lines; a series with a label gets a legend entry below the plot
    (never on top of the data). Series without points are left out; no points at all: "no <y> yet"."""
    drawn = [(label, color, list(points)) for label, color, points in series if points]
    if not drawn:
        return render("chart.svg", lines=None, width=width, x_label=x_label, y_label=title or y_label)
    legend = _legend([(label, color) for label, color, _ in drawn if label], width)
    top = _TOP + (16 if title else 0)
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    xs = [x for _, _, points in drawn for x, _ in points]
    ys = [y for _, _, points in drawn for _, y in points]
    x_ticks = nice_ticks(*padded_range(min(xs), max(xs)))
    y_ticks = nice_ticks(*padded_range(min(ys), max(ys)))
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0

    def sx(x: float) -> float:
        return _LEFT + (x - x_lo) / ((x_hi - x_lo) or 1.0) * plot_w

    def sy(y: float) -> float:
        return top + (1.0 - (y - y_lo) / ((y_hi - y_lo) or 1.0)) * plot_h

    bottom = top + plot_h
    total_h = bottom + _BOTTOM + len({row for row, _ in legend}) * _LEGEND_ROW
    plot = SimpleNamespace(
        left=_LEFT,
        top=top,
        width=plot_w,
        height=plot_h,
        right=_LEFT + plot_w,
        center_x=f"{_LEFT + plot_w / 2:.1f}",
        center_y=f"{top + plot_h / 2:.1f}",
    )
    return render(
        "chart.svg",
        width=width,
        height=total_h,
        title=title,
        x_label=x_label,
        y_label=y_label,
        plot=plot,
        y_ticks=[
            SimpleNamespace(y=f"{sy(v):.1f}", x=_LEFT - 6, label_y=f"{sy(v) + 4:.1f}", label=fmt_tick(v, y_step)) for v in y_ticks
        ],
        x_ticks=[SimpleNamespace(x=f"{sx(v):.1f}", label_y=bottom + 15, label=fmt_tick(v, x_step)) for v in x_ticks],
        x_label_y=bottom + 34,
        lines=[
            SimpleNamespace(
                color=color,
                points=" ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points),
                last=SimpleNamespace(x=f"{sx(points[-1][0]):.1f}", y=f"{sy(points[-1][1]):.1f}"),
            )
            for _, color, points in drawn
        ],
        legend=[
            SimpleNamespace(label=label, color=color, x=x, y=bottom + _BOTTOM + row * _LEGEND_ROW + 4)
            for row, (x, label, color) in legend
        ],
    )


def _legend(entries: Sequence[Tuple[str, str]], width: int) -> List[Tuple[int, Tuple[int, str, str]]]:
    """``(row, (x, label, colour))`` of each legend entry, in rows that fit ``width``."""
    out: List[Tuple[int, Tuple[int, str, str]]] = []
    row, x = 0, _LEFT
    for label, color in entries:
        entry_w = int(22 + _CHAR_W * len(label) + 14)
        if x > _LEFT and x + entry_w > width - _RIGHT:
            row, x = row + 1, _LEFT
        out.append((row, (x, label, color)))
        x += entry_w
    return out


def _number(value: Any) -> bool:
    return is_real(value) and math.isfinite(value)
