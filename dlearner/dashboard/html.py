"""HTML pieces: the plain page (fallback route), and the tables and formatting both pages share.

The plain page needs no JavaScript and nothing from a CDN: inline SVG charts, the dashboard's own
stylesheet (``statics/css/base.css``, served by the scheduler) and its navigation bar.
"""

from __future__ import annotations

import html
import math
import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from dlearner.dashboard.publish import PAGE_PATH

ALL_MODULES = "__all_modules__"

#: Colours of the statuses (the dashboard's own palette: blue running, green done, red failed).
STATUS_COLORS = {"running": "#1f77b4", "finished": "#2ca02c", "failed": "#d62728", "stopped": "#ff7f0e",
                 "ended": "#7f7f7f"}

#: Top-level result entries shown in a run's summary, in this order, when present.
SUMMARY_KEYS = (
    "training_iteration", "num_env_steps_sampled_lifetime", "num_env_steps_trained_lifetime", "env_steps_per_s",
    "num_env_steps_trained_throughput", "time_this_iter_s", "time_total_s", "num_healthy_learners",
    "num_learner_restarts", "num_healthy_env_runners", "num_env_runner_restarts", "num_env_steps_lost",
    "policy_lag_mean", "policy_lag_max", "num_env_steps_dropped_lifetime", "update", "num_updates_received",
)

STYLE = """
.dl { font-family: Helvetica, Arial, sans-serif; color: #222; font-size: 13px; }
.dl h2 { font-size: 1.2em; margin: 1.2em 0 0.2em 0; border-bottom: 1px solid #ddd; padding-bottom: 2px; }
.dl h3 { font-size: 1em; margin: 0.6em 0 0.2em 0; }
.dl table { border-collapse: collapse; margin: 0.2em 1.5em 0.6em 0; font-size: 12px; }
.dl th, .dl td { border: 1px solid #e0e0e0; padding: 2px 7px; text-align: right; }
.dl th:first-child, .dl td:first-child { text-align: left; } .dl thead th { background: #f3f3f3; }
.dl .muted { color: #777; } .dl .row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.dl .badge { color: white; border-radius: 3px; padding: 1px 6px; font-size: 12px; font-weight: bold; }
.dl .error { color: #d62728; font-family: monospace; }
.dl svg text { font-size: 11px; fill: #444; }
.dl details > summary { cursor: pointer; padding: 4px 0; }
"""


# --------------------------------------------------------------------------------- formatting
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
    if value is None:
        return "–"
    return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"


def age(timestamp: Optional[float], now: Optional[float] = None) -> str:
    if timestamp is None:
        return "–"
    seconds = max(0.0, (time.time() if now is None else now) - float(timestamp))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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


def status_label(run: Mapping[str, Any]) -> str:
    """``running``, ``finished``, ``failed: <first line>``, ``stopped: SIGTERM ...``."""
    status = run.get("status") or "running"
    return f"{status}: {run['error']}" if run.get("error") else status


def status_badge(run: Mapping[str, Any]) -> str:
    status = run.get("status") or "running"
    color = STATUS_COLORS.get(status, "#7f7f7f")
    out = f"<span class='badge' style='background:{color}'>{html.escape(status)}</span>"
    if run.get("error"):
        out += f" <span class='error'>{html.escape(run['error'])}</span>"
    return out


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, formatted: bool = False) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{v if formatted else esc(fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------------------ run sections
def run_header(run: Mapping[str, Any], now: Optional[float] = None) -> str:
    """Status, what the run is and where it is: one line."""
    what = " on ".join(x for x in (run.get("algorithm"), run.get("env")) if x)
    step_name = "iteration" if run.get("kind") == "train" else "update"
    parts = [status_badge(run)]
    if what:
        parts.append(html.escape(what))
    parts.append(f"{step_name} {html.escape(fmt(run.get('step')))}")
    parts.append(f"started {age(run.get('first_seen'), now)} ago")
    parts.append(f"last update {age(run.get('updated'), now)} ago")
    return " &middot; ".join(parts)


def summary_table(run: Mapping[str, Any]) -> str:
    summary = run.get("summary") or {}
    rows = [[k, summary[k]] for k in SUMMARY_KEYS if k in summary]
    return table(["run", ""], rows) if rows else ""


def learner_ranks_table(run: Mapping[str, Any]) -> str:
    """Per learner: rank, worker, device, health, restarts, where update time goes, rows/s."""
    ranks = run.get("learner_ranks") or []
    if not ranks:
        return ""
    rows = []
    for r in ranks:
        healthy = r.get("healthy")
        health = "–" if healthy is None else ("<span style='color:#2ca02c'>healthy</span>" if healthy
                                             else "<span style='color:#d62728'>gone</span>")
        rows.append([html.escape(str(r["rank"])), html.escape(r.get("worker") or "–"),
                     html.escape(r.get("device") or "–"), health, html.escape(fmt(r.get("restarts"))),
                     html.escape(fmt(r.get("updates"))), fmt_seconds(r.get("compute_s")),
                     fmt_seconds(r.get("allreduce_s")), fmt_seconds(r.get("waiting_s")),
                     html.escape(fmt(r.get("rows_per_s")))])
    return table(["rank", "worker", "device", "health", "restarts", "updates", "compute", "all-reduce",
                  "waiting", "rows/s"], rows, formatted=True)


def env_runners_table(run: Mapping[str, Any]) -> str:
    """Per env-runner actor (worker, health, restarts), then the run's sampling totals."""
    summary, env = run.get("summary") or {}, run.get("env_runners") or {}
    out = []
    actors = run.get("env_runner_actors") or []
    if actors:
        rows = []
        for a in actors:
            healthy = a.get("healthy")
            rows.append([a["index"], a.get("worker") or "–",
                         "–" if healthy is None else ("healthy" if healthy else "gone"), a.get("restarts"),
                         fmt(a.get("env_steps_per_s")), fmt(a.get("episodes")), fmt(a.get("policy_lag_mean"))])
        out.append(table(["env runner", "worker", "health", "restarts", "env steps/s", "episodes", "policy lag"], rows))
    totals = [
        ("env steps/s", summary.get("env_steps_per_s")),
        ("episodes", env.get("num_episodes_lifetime")),
        ("episode return (mean)", env.get("episode_return_mean")),
        ("episode length (mean)", env.get("episode_len_mean")),
        ("policy lag (mean / max)", None if summary.get("policy_lag_mean") is None
         else f"{fmt(summary.get('policy_lag_mean'))} / {fmt(summary.get('policy_lag_max'))}"),
        ("healthy env runners", summary.get("num_healthy_env_runners")),
        ("env runner restarts", summary.get("num_env_runner_restarts")),
        ("env steps lost", summary.get("num_env_steps_lost")),
    ]
    rows = [[k, v] for k, v in totals if v is not None]
    if rows:
        out.append(table(["env runners (all)", ""], rows))
    return "".join(out)


def module_metrics_table(run: Mapping[str, Any]) -> str:
    learners = run.get("learners") or {}
    if not learners:
        return ""
    modules = sorted(learners, key=lambda m: (m == ALL_MODULES, m))
    metrics = sorted({name for m in modules for name in learners[m]})
    rows = [[name] + [learners[m].get(name, "") for m in modules] for name in metrics]
    return table(["metric"] + modules, rows)


# ------------------------------------------------------------------------------- plain page
def render_page(
    runs: List[Dict[str, Any]], *, selected: Optional[str] = None, nav_pages: Optional[Sequence[str]] = None
) -> str:
    """The plain HTML page for runs as :meth:`MetricsStore.to_json` returns them.

    ``nav_pages``: the Dask dashboard's navigation (``status``, ``workers``, ...), drawn as Dask draws
    it. Links are relative to ``.../dlearner``, so they work under a ``--dashboard-prefix`` or a proxy.
    """
    esc = html.escape
    json_link = f"{PAGE_PATH}/metrics.json"
    if selected is not None:
        json_link += "?run=" + urllib.parse.quote(selected, safe="")
    pages = list(nav_pages or ["status", "workers", "tasks", "system", "profile", "graph", "groups", "info"])
    if PAGE_PATH not in pages:
        pages.append(PAGE_PATH)
    nav = "".join(
        ("<li class='active'>" if p == PAGE_PATH else "<li>") + f"<a href='{esc(p, quote=True)}'>{esc(p.title())}</a></li>"
        for p in pages
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='5'>",
        "<title>Dask: dlearner</title>",
        "<link rel='stylesheet' href='statics/css/base.css'/>",
        f"<style>{STYLE}</style></head><body>",
        f"<div class='navbar' id='myTopnav'><ul><li id='dask-logo'><a href='status'>"
        f"<img src='statics/images/dask-logo.svg'></a></li>{nav}</ul></div>",
        "<div class='content dl' style='padding: 0 1.5em'>",
        f"<p class='muted'>{len(runs)} run(s) on this cluster, newest first &middot; refreshes every 5 s &middot; "
        f"<a href='{esc(json_link, quote=True)}'>JSON</a></p>",
    ]
    if selected is not None:
        parts.append(f"<p><a href='{PAGE_PATH}'>&larr; all runs</a></p>")
    if not runs:
        parts.append(
            "<p>No metrics yet. They appear here once a driver publishes them "
            "(<code>dlearner train</code> does each iteration).</p>"
        )
    now = time.time()
    for run in runs:
        section = render_run(run, now)
        if run.get("folded") and selected is None:
            section = (f"<details id='run-{esc(run['run_id'], quote=True)}'><summary><b>{esc(run['run_id'])}</b> "
                       f"&middot; {run_header(run, now)}</summary>{section}</details>")
        parts.append(section)
    parts.append("</div></body></html>")
    return "".join(parts)


def render_run(run: Dict[str, Any], now: Optional[float] = None) -> str:
    esc = html.escape
    rid = run["run_id"]
    link = f"{PAGE_PATH}?run={urllib.parse.quote(rid, safe='')}"
    out = [
        f"<h2 id='run-{esc(rid, quote=True)}'><a href='{esc(link, quote=True)}'>{esc(rid)}</a></h2>",
        f"<p>{run_header(run, now)}</p>",
        "<div class='row'>",
        render_svg_curve(run["history"], x_label=run["x_label"], y_label=run["y_label"]),
        f"<div>{summary_table(run)}</div>",
        "</div>",
    ]
    for title, body in (("Learners", learner_ranks_table(run)), ("Env runners", env_runners_table(run)),
                        ("Learner metrics (latest update)", module_metrics_table(run))):
        if body:
            out.append(f"<h3>{title}</h3>{body}")
    return "".join(out)


def render_svg_curve(
    history: List[Mapping[str, Any]], *, x_label: str, y_label: str, width: int = 520, height: int = 240
) -> str:
    """An inline SVG line chart of ``history`` (``[{"x": .., "y": ..}, ...]``) with round ticks;
    points without y are skipped."""
    points = [
        (float(p["x"]), float(p["y"]))
        for p in history
        if isinstance(p.get("x"), (int, float)) and isinstance(p.get("y"), (int, float))
    ]
    esc = html.escape
    if not points:
        return (
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='60' role='img'>"
            f"<text x='10' y='30'>no {esc(y_label)} yet</text></svg>"
        )
    left, right, top, bottom = 64, 16, 12, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = nice_ticks(*_padded_range(min(xs), max(xs)))
    y_ticks = nice_ticks(*_padded_range(min(ys), max(ys)))
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0

    def sx(x: float) -> float:
        return left + (x - x_lo) / ((x_hi - x_lo) or 1.0) * plot_w

    def sy(y: float) -> float:
        return top + (1.0 - (y - y_lo) / ((y_hi - y_lo) or 1.0)) * plot_h

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
        f"aria-label='{esc(y_label, quote=True)} over {esc(x_label, quote=True)}'>",
        f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='#fafafa' stroke='#bbb'/>",
    ]
    for value in y_ticks:
        y = sy(value)
        out.append(f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' stroke='#e4e4e4'/>")
        out.append(f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{esc(fmt_tick(value, y_step))}</text>")
    for value in x_ticks:
        out.append(f"<text x='{sx(value):.1f}' y='{top + plot_h + 15}' text-anchor='middle'>"
                   f"{esc(fmt_tick(value, x_step))}</text>")
    out.append(f"<text x='{left + plot_w / 2:.1f}' y='{height - 6}' text-anchor='middle'>{esc(x_label)}</text>")
    out.append(
        f"<text x='14' y='{top + plot_h / 2:.1f}' text-anchor='middle' "
        f"transform='rotate(-90 14 {top + plot_h / 2:.1f})'>{esc(y_label)}</text>"
    )
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    out.append(f"<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{coords}'/>")
    last_x, last_y = points[-1]
    out.append(f"<circle cx='{sx(last_x):.1f}' cy='{sy(last_y):.1f}' r='3' fill='#1f77b4'/>")
    out.append("</svg>")
    return "".join(out)


def _padded_range(lo: float, hi: float) -> Tuple[float, float]:
    if hi - lo < 1e-12:  # one point, or a flat line: give the axis some height
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    return lo, hi
