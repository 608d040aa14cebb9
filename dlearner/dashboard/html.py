"""The page's HTML: the plain page (fallback route) and the pieces the Bokeh page shows too.

Markup lives in tornado templates under ``templates/`` (shipped as package data, loaded as
``distributed.http`` loads its own), which escape every value they are given. Functions here only
choose and format the values; a ``*_html`` argument of a template is a fragment another template
rendered. The plain page needs no JavaScript and nothing from a CDN: inline SVG charts, the
dashboard's own stylesheet (``statics/css/base.css``, served by the scheduler) and its navigation bar.
"""

from __future__ import annotations

import pathlib
import time
import urllib.parse
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from tornado import template

from dlearner.columns import ALL_MODULES
from dlearner.dashboard.formatting import (
    age,
    fmt,
    fmt_seconds,
    fmt_tick,
    nice_ticks,
    padded_range,
)
from dlearner.dashboard.protocol import KIND_TRAIN, PAGE_PATH

TEMPLATES = pathlib.Path(__file__).with_name("templates")
# "single": runs of blanks in the templates' markup become one (output values are left as they are).
_LOADER = template.Loader(str(TEMPLATES), autoescape="xhtml_escape", whitespace="single")

#: Colours of the statuses (the dashboard's own palette: blue running, green done, red failed).
STATUS_COLORS = {"running": "#1f77b4", "finished": "#2ca02c", "failed": "#d62728", "stopped": "#ff7f0e", "ended": "#7f7f7f"}
#: Colour of a learner's health in its table.
HEALTH_COLORS = {"healthy": "#2ca02c", "gone": "#d62728"}
#: Dask's navigation, for a page drawn without the scheduler's list.
DASK_PAGES = ("status", "workers", "tasks", "system", "profile", "graph", "groups", "info")

#: Top-level result entries shown in a run's summary, in this order, when present.
SUMMARY_KEYS = (
    "training_iteration",
    "num_env_steps_sampled_lifetime",
    "num_env_steps_trained_lifetime",
    "env_steps_per_s",
    "num_env_steps_trained_throughput",
    "time_this_iter_s",
    "time_total_s",
    "num_healthy_learners",
    "num_learner_restarts",
    "num_healthy_env_runners",
    "num_env_runner_restarts",
    "num_env_steps_lost",
    "policy_lag_mean",
    "policy_lag_max",
    "num_env_steps_dropped_lifetime",
    "update",
    "num_updates_received",
)


def render(name: str, **values: Any) -> str:
    """Template ``name`` filled with ``values`` (escaped), without the line breaks around it (the one
    after a template's leading comment and the file's last)."""
    return _LOADER.load(name).generate(**values).decode("utf-8").strip()


def run_link(run_id: str) -> str:
    """The page of one run, relative to ``.../dlearner``."""
    return f"{PAGE_PATH}?run={urllib.parse.quote(run_id, safe='')}"


def json_link(selected: Optional[str]) -> str:
    """``metrics.json`` of every run, or of ``selected`` only."""
    link = f"{PAGE_PATH}/metrics.json"
    return link if selected is None else link + "?run=" + urllib.parse.quote(selected, safe="")


def status_color(run: Mapping[str, Any]) -> str:
    """The colour of a run's status (grey for one the page does not know)."""
    return STATUS_COLORS.get(run.get("status") or "running", "#7f7f7f")


# ------------------------------------------------------------------------------------ tables
def table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], *, colors: Optional[Mapping[str, Mapping[str, str]]] = None
) -> str:
    """A table, each cell as :func:`fmt` writes it. ``colors``: column title -> {cell text: colour}."""
    header = [str(h) for h in header]
    cells = [[(fmt(v), (colors or {}).get(title, {}).get(fmt(v))) for title, v in zip(header, row, strict=True)] for row in rows]
    return render("table.html", header=header, rows=cells)


def run_header(run: Mapping[str, Any], now: Optional[float] = None) -> str:
    """Status, what the run is and where it is: one line."""
    what = " on ".join(x for x in (run.get("algorithm"), run.get("env")) if x)
    step_name = "iteration" if run.get("kind") == KIND_TRAIN else "update"
    parts = [what] if what else []
    parts += [
        f"{step_name} {fmt(run.get('step'))}",
        f"started {age(run.get('first_seen'), now)} ago",
        f"last update {age(run.get('updated'), now)} ago",
    ]
    return render(
        "run_header.html", status=run.get("status") or "running", color=status_color(run), error=run.get("error"), parts=parts
    )


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
        rows.append(
            [
                str(r["rank"]),
                r.get("worker") or "–",
                r.get("device") or "–",
                "–" if healthy is None else ("healthy" if healthy else "gone"),
                r.get("restarts"),
                r.get("updates"),
                fmt_seconds(r.get("compute_s")),
                fmt_seconds(r.get("allreduce_s")),
                fmt_seconds(r.get("waiting_s")),
                r.get("rows_per_s"),
            ]
        )
    return table(
        ["rank", "worker", "device", "health", "restarts", "updates", "compute", "all-reduce", "waiting", "rows/s"],
        rows,
        colors={"health": HEALTH_COLORS},
    )


def env_runners_table(run: Mapping[str, Any]) -> str:
    """Per env-runner actor (worker, health, restarts), then the run's sampling totals."""
    summary, env = run.get("summary") or {}, run.get("env_runners") or {}
    out = []
    actors = run.get("env_runner_actors") or []
    if actors:
        rows = []
        for a in actors:
            healthy = a.get("healthy")
            rows.append(
                [
                    a["index"],
                    a.get("worker") or "–",
                    "–" if healthy is None else ("healthy" if healthy else "gone"),
                    a.get("restarts"),
                    a.get("env_steps_per_s"),
                    a.get("episodes"),
                    a.get("policy_lag_mean"),
                ]
            )
        out.append(table(["env runner", "worker", "health", "restarts", "env steps/s", "episodes", "policy lag"], rows))
    totals = [
        ("env steps/s", summary.get("env_steps_per_s")),
        ("episodes", env.get("num_episodes_lifetime")),
        ("episode return (mean)", env.get("episode_return_mean")),
        ("episode length (mean)", env.get("episode_len_mean")),
        (
            "policy lag (mean / max)",
            None
            if summary.get("policy_lag_mean") is None
            else f"{fmt(summary.get('policy_lag_mean'))} / {fmt(summary.get('policy_lag_max'))}",
        ),
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


def run_tables(run: Mapping[str, Any], *, with_summary: bool = False) -> List[Tuple[str, str]]:
    """``(title, table html)`` of the tables a run has: learners, env runners, [summary,] module metrics.

    The plain page draws the summary beside the curve; the Bokeh page draws it among the tables.
    """
    tables = [("Learners", learner_ranks_table(run)), ("Env runners", env_runners_table(run))]
    if with_summary:
        tables.append(("Run", summary_table(run)))
    tables.append(("Learner metrics (latest update)", module_metrics_table(run)))
    return [(title, body) for title, body in tables if body]


# -------------------------------------------------------------------------------- plain page
def render_page(runs: List[Dict[str, Any]], *, selected: Optional[str] = None, nav_pages: Optional[Sequence[str]] = None) -> str:
    """The plain HTML page for runs as :meth:`MetricsStore.to_json` returns them.

    ``nav_pages``: the Dask dashboard's navigation (``status``, ``workers``, ...), drawn as Dask draws
    it. Links are relative to ``.../dlearner``, so they work under a ``--dashboard-prefix`` or a proxy.
    """
    pages = list(nav_pages or DASK_PAGES)
    if PAGE_PATH not in pages:
        pages.append(PAGE_PATH)
    now = time.time()
    sections = [
        SimpleNamespace(
            run_id=run["run_id"],
            folded=bool(run.get("folded")) and selected is None,
            header_html=run_header(run, now),
            body_html=render_run(run, now),
        )
        for run in runs
    ]
    return render(
        "page.html", nav_pages=pages, page_path=PAGE_PATH, json_link=json_link(selected), selected=selected, sections=sections
    )


def render_run(run: Dict[str, Any], now: Optional[float] = None) -> str:
    """One run's section of the plain page: title, status line, curve, summary and tables."""
    return render(
        "run.html",
        run_id=run["run_id"],
        link=run_link(run["run_id"]),
        header_html=run_header(run, now),
        curve_html=render_svg_curve(run["history"], x_label=run["x_label"], y_label=run["y_label"]),
        summary_html=summary_table(run),
        tables=run_tables(run),
    )


def render_svg_curve(history: List[Mapping[str, Any]], *, x_label: str, y_label: str, width: int = 520, height: int = 240) -> str:
    """An inline SVG line chart of ``history`` (``[{"x": .., "y": ..}, ...]``) with round ticks;
    points without y are skipped."""
    points = [
        (float(p["x"]), float(p["y"]))
        for p in history
        if isinstance(p.get("x"), (int, float)) and isinstance(p.get("y"), (int, float))
    ]
    if not points:
        return render("curve.svg", points=None, width=width, height=height, x_label=x_label, y_label=y_label)
    left, right, top, bottom = 64, 16, 12, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = nice_ticks(*padded_range(min(xs), max(xs)))
    y_ticks = nice_ticks(*padded_range(min(ys), max(ys)))
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1.0
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0

    def sx(x: float) -> float:
        return left + (x - x_lo) / ((x_hi - x_lo) or 1.0) * plot_w

    def sy(y: float) -> float:
        return top + (1.0 - (y - y_lo) / ((y_hi - y_lo) or 1.0)) * plot_h

    plot = SimpleNamespace(
        left=left,
        top=top,
        width=plot_w,
        height=plot_h,
        right=left + plot_w,
        center_x=f"{left + plot_w / 2:.1f}",
        center_y=f"{top + plot_h / 2:.1f}",
    )
    last_x, last_y = points[-1]
    return render(
        "curve.svg",
        width=width,
        height=height,
        x_label=x_label,
        y_label=y_label,
        plot=plot,
        y_ticks=[
            SimpleNamespace(y=f"{sy(v):.1f}", x=left - 6, label_y=f"{sy(v) + 4:.1f}", label=fmt_tick(v, y_step)) for v in y_ticks
        ],
        x_ticks=[SimpleNamespace(x=f"{sx(v):.1f}", label_y=top + plot_h + 15, label=fmt_tick(v, x_step)) for v in x_ticks],
        x_label_y=height - 6,
        points=" ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points),
        last=SimpleNamespace(x=f"{sx(last_x):.1f}", y=f"{sy(last_y):.1f}"),
    )
