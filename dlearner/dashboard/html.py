"""The page's HTML: the plain page (fallback route) and the pieces the Bokeh page shows too.

Markup lives in tornado templates under ``templates/`` (:mod:`dlearner.dashboard.templating`),
which escape every value they are given; the plain page's charts are :mod:`dlearner.dashboard.svg`'s. Functions here only
choose and format the values; a ``*_html`` argument of a template is a fragment another template
rendered. The plain page needs no JavaScript and nothing from a CDN: inline SVG charts, the
dashboard's own stylesheet (``statics/css/base.css``, served by the scheduler) and its navigation bar.
"""

from __future__ import annotations

import time
import urllib.parse
from itertools import cycle
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from dlearner.columns import ALL_MODULES
from dlearner.dashboard.formatting import age, clock_time, fmt, fmt_seconds
from dlearner.dashboard.protocol import KIND_TRAIN, PAGE_PATH
from dlearner.dashboard.store import MODULE_LOSS_KEY, custom_metric_keys
from dlearner.dashboard.svg import COLORS, render_svg_chart, xy_points
from dlearner.dashboard.templating import render

#: Colours of the statuses (the dashboard's own palette: blue running, green done, red failed only;
#: a run stopped on request, or one whose driver went away without a word, is neutral grey).
STATUS_COLORS = {"running": "#1f77b4", "finished": "#2ca02c", "failed": "#d62728", "stopped": "#7f7f7f", "ended": "#7f7f7f"}
#: What an actor row says about its health once the run ended (its actors are released then).
RUN_ENDED = "run ended"
#: Colour of a learner's or env runner's health in its table.
HEALTH_COLORS = {"healthy": "#2ca02c", "gone": "#d62728", RUN_ENDED: "#7f7f7f"}
#: Summary entries about the run's health: after a final status they are as of the last iteration.
HEALTH_KEYS = ("num_healthy_learners", "num_healthy_env_runners")
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


#: Title of a multi-agent run's return curve (RLlib's convention: an episode's return is its agents' sum).
SUMMED_RETURN_TITLE = "episode return (sum over agents)"
#: A multi-agent run's summary also shows this entry, after the env steps.
MULTI_AGENT_SUMMARY_KEY = "num_agent_steps_sampled_lifetime"


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


def run_ended(run: Mapping[str, Any]) -> bool:
    """Whether the run has a final status (its actors are gone by design, not by failure)."""
    return (run.get("status") or "running") != "running"


def _health(run: Mapping[str, Any], healthy: Optional[bool]) -> str:
    if run_ended(run):
        return RUN_ENDED
    return "–" if healthy is None else ("healthy" if healthy else "gone")


def _as_of_last_iteration(run: Mapping[str, Any], label: str) -> str:
    """``label``, marked as a figure of the last iteration once the run ended."""
    if not run_ended(run):
        return label
    step = run.get("step")
    return f"{label} (at iteration {fmt(step)})" if step is not None else f"{label} (at the last iteration)"


# ------------------------------------------------------------------------------------ tables
def table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], *, colors: Optional[Mapping[str, Mapping[str, str]]] = None
) -> str:
    """A table, each cell as :func:`fmt` writes it. ``colors``: column title -> {cell text: colour}."""
    header = [str(h) for h in header]
    cells = [[(fmt(v), (colors or {}).get(title, {}).get(fmt(v))) for title, v in zip(header, row, strict=True)] for row in rows]
    return render("table.html", header=header, rows=cells)


def run_header(run: Mapping[str, Any], now: Optional[float] = None, *, clock: bool = False) -> str:
    """Status, what the run is and where it is: one line.

    ``clock``: times of day (the scheduler's) instead of ages, for the live page: its text then
    changes only when the run sends something, and every change costs each open browser a redraw.
    """
    what = " on ".join(x for x in (run.get("algorithm"), run.get("env")) if x)
    step_name = "iteration" if run.get("kind") == KIND_TRAIN else "update"
    parts = [what] if what else []
    parts.append(f"{step_name} {fmt(run.get('step'))}")
    if clock:
        parts += [f"started {clock_time(run.get('first_seen'))}", f"last update {clock_time(run.get('updated'))}"]
    else:
        parts += [f"started {age(run.get('first_seen'), now)} ago", f"last update {age(run.get('updated'), now)} ago"]
    return render(
        "run_header.html", status=run.get("status") or "running", color=status_color(run), error=run.get("error"), parts=parts
    )


def summary_table(run: Mapping[str, Any]) -> str:
    summary = run.get("summary") or {}
    keys = list(SUMMARY_KEYS)
    if is_multi_agent(run):  # agent steps differ from env steps only there
        keys.insert(keys.index("num_env_steps_sampled_lifetime") + 1, MULTI_AGENT_SUMMARY_KEY)
    rows = [[_as_of_last_iteration(run, k) if k in HEALTH_KEYS else k, summary[k]] for k in keys if k in summary]
    return table(["run", ""], rows) if rows else ""


def is_multi_agent(run: Mapping[str, Any]) -> bool:
    """Whether the run trains on a multi-agent env (its results have returns per module)."""
    return isinstance((run.get("env_runners") or {}).get("module_episode_returns_mean"), Mapping)


def learner_ranks_table(run: Mapping[str, Any]) -> str:
    """Per learner: rank, worker, device, health, restarts, where update time goes, rows/s."""
    ranks = run.get("learner_ranks") or []
    if not ranks:
        return ""
    rows = []
    for r in ranks:
        rows.append(
            [
                str(r["rank"]),
                r.get("worker") or "–",
                r.get("device") or "–",
                _health(run, r.get("healthy")),
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


def figures_as_of(iteration: Optional[int], latest: Optional[int]) -> str:
    """How old a runner's figures are, in iterations (stable text between two iterations)."""
    if iteration is None:
        return "–"
    if latest is None or iteration >= latest:
        return f"iteration {fmt(iteration)} (latest)"
    behind = latest - iteration
    return f"iteration {fmt(iteration)} ({behind} earlier)"


def env_runners_table(run: Mapping[str, Any]) -> str:
    """Per env-runner actor (worker, health, restarts, its latest figures and how old they are),
    then the run's sampling totals."""
    summary, env = run.get("summary") or {}, run.get("env_runners") or {}
    out = []
    actors = run.get("env_runner_actors") or []
    if actors:
        rows = []
        for a in actors:
            as_of = figures_as_of(a.get("figures_iteration"), run.get("step"))
            rows.append(
                [
                    a["index"],
                    a.get("worker") or "–",
                    _health(run, a.get("healthy")),
                    a.get("restarts"),
                    a.get("env_steps_per_s"),
                    a.get("episodes"),
                    a.get("policy_lag_mean"),
                    as_of,
                ]
            )
        out.append(
            table(
                ["env runner", "worker", "health", "restarts", "env steps/s", "episodes", "policy lag", "figures as of"],
                rows,
                colors={"health": HEALTH_COLORS},
            )
        )
    module_returns = env.get("module_episode_returns_mean")
    multi_agent = is_multi_agent(run)
    totals = [
        ("env steps/s", summary.get("env_steps_per_s")),
        ("episodes", env.get("num_episodes_lifetime")),
        ("episode return (mean, sum over agents)" if multi_agent else "episode return (mean)", env.get("episode_return_mean")),
        *[(f"episode return (mean), module {m}", module_returns[m]) for m in (sorted(module_returns) if multi_agent else ())],
        ("episode length (mean)", env.get("episode_len_mean")),
        (
            "policy lag (mean / max)",
            None
            if summary.get("policy_lag_mean") is None
            else f"{fmt(summary.get('policy_lag_mean'))} / {fmt(summary.get('policy_lag_max'))}",
        ),
        (_as_of_last_iteration(run, "healthy env runners"), summary.get("num_healthy_env_runners")),
        ("env runner restarts", summary.get("num_env_runner_restarts")),
        ("env steps lost", summary.get("num_env_steps_lost")),
        # What callbacks logged (metrics_logger.log_value), under their own keys.
        *[(f"{key} (callbacks)", env[key]) for key in custom_metric_keys(env)],
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
    """One run's section of the plain page: title, status line, the curves the Bokeh page draws
    (return, losses, throughput), summary and tables."""
    return render(
        "run.html",
        run_id=run["run_id"],
        link=run_link(run["run_id"]),
        header_html=run_header(run, now),
        charts=run_charts(run),
        summary_html=summary_table(run),
        tables=run_tables(run),
    )


def module_ids(history: Sequence[Mapping[str, Any]], group: str) -> List[str]:
    """The keys that have values under ``group`` (``module_returns`` / ``module_losses`` / ``losses``) in some
    point of a multi-agent run's ``history``, by id; ``[]`` for a single-agent run."""
    return sorted({m for point in history for m, value in (point.get(group) or {}).items() if value is not None})


def module_charts(run: Mapping[str, Any], width: int = 420, height: int = 220) -> Tuple[List[str], List[str]]:
    """A multi-agent run's per-module charts, ``([returns], [losses])``: each module's mean episode
    return, and each module's total loss when there are several modules (one module's loss is the
    loss chart's). Both empty for a single-agent run."""
    history = run.get("history") or []

    def chart(group: str, x_key: str, x_label: str, y_label: str, title: str) -> str:
        modules = module_ids(history, group)
        series = [(m, color, xy_points(history, x_key, m, group)) for m, color in zip(modules, cycle(COLORS))]
        return render_svg_chart(series, x_label=x_label, y_label=y_label, title=title, width=width, height=height)

    returns, losses = module_ids(history, "module_returns"), module_ids(history, "module_losses")
    return (
        [chart("module_returns", "x", run["x_label"], "episode return (mean)", "episode return per module")] if returns else [],
        [chart("module_losses", "step", "iteration", MODULE_LOSS_KEY, f"{MODULE_LOSS_KEY} per module")]
        if len(losses) > 1
        else [],
    )


#: Title of the chart of metrics that callbacks logged.
CUSTOM_METRICS_TITLE = "metrics logged by callbacks"


def custom_metrics_chart(run: Mapping[str, Any], width: int = 420, height: int = 220) -> List[str]:
    """The chart of the metrics callbacks logged (a line per key, against the iteration); ``[]`` when none."""
    history = run.get("history") or []
    keys = module_ids(history, "custom_metrics")
    if not keys:
        return []
    series = [(key, color, xy_points(history, "step", key, "custom_metrics")) for key, color in zip(keys, cycle(COLORS))]
    return [
        render_svg_chart(series, x_label="iteration", y_label="value", title=CUSTOM_METRICS_TITLE, width=width, height=height)
    ]


def run_charts(run: Mapping[str, Any], width: int = 420, height: int = 220) -> List[str]:
    """The plain page's SVG charts of a run: its curve, losses and (training runs) throughput; a
    multi-agent run's curve is the return summed over agents, with per-module returns and losses beside."""
    history = run.get("history") or []
    step = "iteration" if run.get("kind") == KIND_TRAIN else "update"
    module_returns, module_losses = module_charts(run, width=width, height=height)
    charts = [
        render_svg_chart(
            [("", COLORS[0], xy_points(history, "x", "y"))],
            x_label=run["x_label"],
            y_label=run["y_label"],
            title=SUMMED_RETURN_TITLE if module_returns else "",
            width=width,
            height=height,
        ),
        *module_returns,
        render_svg_chart(
            [
                (key, color, xy_points(history, "step", key, "losses"))
                for key, color in zip(module_ids(history, "losses"), COLORS)
            ],
            x_label=step,
            y_label="loss",
            title="losses (mean over modules)",
            width=width,
            height=height,
        ),
        *module_losses,
    ]
    if run.get("kind") == KIND_TRAIN:
        charts.append(
            render_svg_chart(
                [
                    (label, color, xy_points(history, "step", key, "throughput"))
                    for (label, key), color in zip(
                        (("sampled", "env steps sampled/s"), ("trained", "env steps trained/s")), COLORS
                    )
                ],
                x_label=step,
                y_label="env steps/s",
                title="throughput (env steps/s)",
                width=width,
                height=height,
            )
        )
        charts.extend(custom_metrics_chart(run, width=width, height=height))
    return charts
