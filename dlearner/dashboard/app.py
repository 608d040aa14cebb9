"""The ``/dlearner`` Bokeh application: one page of the Dask dashboard, in its navigation and style.

Dask builds its dashboard's Bokeh server from ``distributed.dashboard.scheduler.applications`` when
a scheduler starts (``distributed.dashboard.scheduler.connect``). :func:`install_bokeh_page` adds
this page to that dict; importing :mod:`dlearner.dashboard` calls it, so every scheduler started
afterwards in this process has the page: the embedded ``LocalCluster`` dlearner starts, and
``dask scheduler --preload dlearner.dashboard`` (a preload module is imported before the scheduler
starts its dashboard). Curves update every second from the plugin's store, in the browser, over
Bokeh's websocket, as Dask's own pages do.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from dlearner.dashboard.html import (
    CUSTOM_METRICS_TITLE,
    SUMMED_RETURN_TITLE,
    json_link,
    module_ids,
    render,
    run_header,
    run_link,
    run_tables,
    status_color,
)
from dlearner.dashboard.plugin import current_plugin
from dlearner.dashboard.protocol import PAGE_PATH
from dlearner.dashboard.store import MODULE_LOSS_KEY
from dlearner.dashboard.svg import COLORS

logger = logging.getLogger(__name__)

#: How often an open page redraws (milliseconds).
REFRESH_MS = 1000
#: Points drawn per curve (the newest ones; metrics.json has them all).
MAX_POINTS = 2000
_TIME_PARTS = (("compute_s", "compute", "#1f77b4"), ("allreduce_s", "all-reduce", "#ff7f0e"), ("waiting_s", "waiting", "#bbbbbb"))
#: Id of the banner an open page shows once its server went away.
DISCONNECTED_ID = "dlearner-disconnected"
# Runs in the browser when Bokeh's websocket to the dashboard closed for good (e.g. `dlearner train`
# ended and took its embedded cluster along): say so instead of freezing silently.
_DISCONNECTED_JS = f"""
if (!document.getElementById("{DISCONNECTED_ID}")) {{
  const banner = document.createElement("div");
  banner.id = "{DISCONNECTED_ID}";
  banner.textContent = "disconnected: the dashboard's server went away (its cluster closed?), so this page " +
    "no longer updates. A dlearner train run's record stays in its run folder: metrics.jsonl and the PNG plot.";
  banner.style.cssText = "position:fixed;top:0;left:0;right:0;z-index:10000;padding:8px 16px;" +
    "background:#7f7f7f;color:white;font:bold 14px Helvetica,Arial,sans-serif";
  document.body.appendChild(banner);
  document.title = "(disconnected) " + document.title;
}}
"""


def install_bokeh_page() -> bool:
    """Add ``/dlearner`` to the applications of dashboards of schedulers started from now on.

    Idempotent; ``False`` where Dask's dashboard is unavailable (no bokeh): the plain-HTML route of
    the plugin then serves the page.
    """
    try:
        from distributed.dashboard import scheduler as dashboard
    except ImportError:
        return False
    dashboard.applications.setdefault("/" + PAGE_PATH, dlearner_doc)
    return True


def dlearner_doc(scheduler: Any, extra: Dict[str, Any], doc: Any) -> None:
    """Bokeh application function (``applications`` signature): builds one browser session's page."""
    from bokeh.layouts import column
    from bokeh.models import CustomJS, Div
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env

    arguments = doc.session_context.request.arguments if doc.session_context else {}
    selected: Optional[str] = None
    if arguments.get("run"):
        value = arguments["run"][0]
        selected = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    intro = Div(text="", sizing_mode="stretch_width", styles={"padding": "0 1em"})
    root = column(intro, sizing_mode="stretch_width", name="dlearner-root")
    sections: Dict[str, _Section] = {}
    layout_key: List[Any] = [None]

    def update() -> None:
        plugin = current_plugin(scheduler)
        if plugin is None:
            _set(intro, render("live_intro.html", registered=False))
            return
        runs = plugin.runs_json(selected)["runs"]
        _set(
            intro,
            render(
                "live_intro.html",
                registered=True,
                num_runs=len(runs),
                json_link=json_link(selected or None),
                selected=selected,
                page_path=PAGE_PATH,
            ),
        )
        key = [(r["run_id"], bool(r["folded"] and not selected)) for r in runs]
        if key != layout_key[0]:  # a run started or folded: rebuild, keeping the sections that stay
            layout_key[0] = key
            for run_id in [r for r in sections if r not in dict(key)]:
                del sections[run_id]
            children = [intro]
            for run, (run_id, folded) in zip(runs, key):
                section = sections.get(run_id)
                if section is None or section.folded != folded:
                    section = sections[run_id] = _Section(run, folded)
                children.append(section.root)
            root.children = children
        for run in runs:
            sections[run["run_id"]].update(run)

    update()
    doc.add_periodic_callback(update, REFRESH_MS)
    doc.js_on_event("connection_lost", CustomJS(code=_DISCONNECTED_JS))
    doc.title = "Dask: dlearner"
    doc.add_root(root)
    doc.template = env.get_template("simple.html")
    doc.template_variables.update(extra)
    doc.theme = BOKEH_THEME


class _Section:
    """One run on the page: a header, live curves, and the learner / env-runner tables."""

    def __init__(self, run: Dict[str, Any], folded: bool):
        from bokeh.layouts import column, row
        from bokeh.models import ColumnDataSource, Div, FactorRange, HoverTool, Legend, NumeralTickFormatter
        from bokeh.plotting import figure

        self.folded = folded
        self.run_id = run["run_id"]
        self.header = Div(text="", sizing_mode="stretch_width", styles={"padding": "0 1em"})
        self._texts: Dict[int, str] = {}
        self._last_history: Any = None
        self._last_timing: Any = None
        if folded:
            self.root = column(self.header, sizing_mode="stretch_width")
            return
        name = self.run_id
        self.curve = ColumnDataSource({"x": [], "y": [], "step": []}, name=f"return-source-{name}")
        self.throughput = ColumnDataSource({"step": [], "sampled": [], "trained": []}, name=f"throughput-source-{name}")
        self.timing = ColumnDataSource({"rank": [], **{k: [] for k, _, _ in _TIME_PARTS}})

        def fig(title: str, x_label: str, legend: bool = False, **kwargs: Any) -> Any:
            # The toolbar sits right of the plot, so a title has the whole width; a few short
            # ticks (25k, not 25,000) so that labels never collide.
            f = figure(
                title=title, height=250, width=310, tools="pan,wheel_zoom,box_zoom,reset,save", toolbar_location="right", **kwargs
            )
            f.xaxis.axis_label = x_label
            if x_label in ("iteration", "update"):
                f.xaxis.ticker.min_interval = 1  # whole iterations, never 1.2
            for axis in (f.xaxis, f.yaxis):
                axis.formatter = NumeralTickFormatter(format="0.[00]a")
                axis.ticker.desired_num_ticks = 4
            if legend:
                _legend_below(f, Legend)
            return f

        x_label, y_label = run["x_label"], run["y_label"]
        ret = fig(y_label if run["kind"] == "train" else "loss", x_label, name=f"return-figure-{name}")
        ret.line("x", "y", source=self.curve, line_width=2, color=COLORS[0])
        ret.scatter("x", "y", source=self.curve, size=4, color=COLORS[0])
        self.return_figure = ret
        ret.add_tools(HoverTool(tooltips=[("step", "@step"), (x_label, "@x{0,0}"), (y_label, "@y{0.000}")]))
        loss = fig("losses (mean over modules)", "iteration" if run["kind"] == "train" else "update", legend=True)
        # A line per loss the results have (PPO's policy_loss, vf_loss, ...; SAC's qf_loss, alpha_loss, ...).
        self.loss_lines = _ModuleLines(loss, x_key="step", group="losses")
        # A multi-agent run's curves per module: hidden until its results name modules; a line is
        # added for each module as it appears (modules can join a run: Algorithm.add_module).
        self.module_returns = _ModuleLines(
            fig("episode return per module", x_label, legend=True, name=f"module-returns-figure-{name}"),
            x_key="x",
            group="module_returns",
        )
        self.module_losses = _ModuleLines(
            fig(f"{MODULE_LOSS_KEY} per module", "iteration", legend=True, name=f"module-losses-figure-{name}"),
            x_key="step",
            group="module_losses",
            min_modules=2,  # one module's loss is the loss chart's
        )
        # Metrics callbacks logged: hidden until the results have some, a line added per key as it appears.
        self.custom_metrics = _ModuleLines(
            fig(CUSTOM_METRICS_TITLE, "iteration", legend=True, name=f"custom-metrics-figure-{name}"),
            x_key="step",
            group="custom_metrics",
        )
        thr = fig("throughput (env steps/s)", "iteration", legend=True, name=f"throughput-figure-{name}")
        thr.line("step", "sampled", source=self.throughput, color=COLORS[0], line_width=2, legend_label="sampled")
        thr.line("step", "trained", source=self.throughput, color=COLORS[1], line_width=2, legend_label="trained")
        tim = figure(
            title="update time per learner",
            height=250,
            width=310,
            y_range=FactorRange(factors=[]),
            toolbar_location=None,
            tools="",
        )
        _legend_below(tim, Legend)
        tim.xaxis.ticker.desired_num_ticks = 4
        tim.hbar_stack(
            [k for k, _, _ in _TIME_PARTS],
            y="rank",
            height=0.6,
            source=self.timing,
            color=[c for _, _, c in _TIME_PARTS],
            legend_label=[label for _, label, _ in _TIME_PARTS],
        )
        tim.xaxis.axis_label = "seconds (mean of recent updates)"
        self.timing_figure = tim
        self.tables = Div(text="", sizing_mode="stretch_width", styles={"padding": "0 1em"}, name=f"tables-{name}")
        # A row of their own for the per-module figures: one row of six would not fit a window.
        self.module_row = row(self.module_returns.figure, self.module_losses.figure, self.custom_metrics.figure, visible=False)
        self.root = column(self.header, row(ret, loss, thr, tim), self.module_row, self.tables, sizing_mode="stretch_width")

    def update(self, run: Dict[str, Any]) -> None:
        _set(
            self.header,
            render(
                "live_run_header.html",
                run_id=self.run_id,
                link=run_link(self.run_id),
                color=status_color(run),
                header_html=run_header(run, clock=True),
                folded=self.folded,
            ),
        )
        if self.folded:
            return
        _set(self.tables, render("live_tables.html", tables=run_tables(run, with_summary=True)))
        history = run["history"][-MAX_POINTS:]
        marker = (len(run["history"]), history[-1] if history else None)
        if marker != self._last_history:
            self._last_history = marker
            self.curve.data = {
                "x": [_nan(p.get("x")) for p in history],
                "y": [_nan(p.get("y")) for p in history],
                "step": [p["step"] for p in history],
            }
            self.loss_lines.update(history)
            self.throughput.data = {
                "step": [p["step"] for p in history],
                "sampled": [_nan((p.get("throughput") or {}).get("env steps sampled/s")) for p in history],
                "trained": [_nan((p.get("throughput") or {}).get("env steps trained/s")) for p in history],
            }
            self.module_returns.update(history)
            self.module_losses.update(history)
            self.custom_metrics.update(history)
            if self.module_returns.figure.visible and not self.module_row.visible:  # a multi-agent run
                self.module_row.visible = True
                self.return_figure.title.text = SUMMED_RETURN_TITLE  # say what its return is
            if self.custom_metrics.figure.visible and not self.module_row.visible:  # metrics from callbacks
                self.module_row.visible = True
        ranks = run.get("learner_ranks") or []
        labels = [f"rank {r['rank']}" for r in ranks]
        if self.timing_figure.visible != bool(ranks):
            self.timing_figure.visible = bool(ranks)  # no learner actors (local learner): nothing to split
        if list(self.timing_figure.y_range.factors) != labels:
            self.timing_figure.y_range.factors = labels
        timing = {"rank": labels, **{k: [r.get(k) or 0.0 for r in ranks] for k, _, _ in _TIME_PARTS}}
        if timing != self._last_timing:  # every change redraws the chart in each open browser
            self._last_timing = timing
            self.timing.data = timing


class _ModuleLines:
    """One figure with a line per key of ``point[group]`` (a multi-agent run's modules, or the losses a
    run reports) against ``point[x_key]``, and its legend; hidden while fewer than ``min_modules``
    keys have values."""

    def __init__(self, figure: Any, *, x_key: str, group: str, min_modules: int = 1):
        from bokeh.models import ColumnDataSource

        self.figure = figure
        self.figure.visible = False
        self.x_key, self.group, self.min_modules = x_key, group, min_modules
        self.source = ColumnDataSource({"x": []})
        self.modules: List[str] = []  # those with a line, in the order their lines were added

    def update(self, history: List[Dict[str, Any]]) -> None:
        modules = module_ids(history, self.group)
        data = {"x": [_nan(p.get(self.x_key)) for p in history]}
        # Columns are numbered by line: a module id is any string, a column name should not be.
        new = [m for m in modules if m not in self.modules]
        for index, module in enumerate(self.modules + new):
            data[f"m{index}"] = [_nan((p.get(self.group) or {}).get(module)) for p in history]
        self.source.data = data
        for module in new:  # after the data, so that the new line's column exists
            index, color = len(self.modules), COLORS[len(self.modules) % len(COLORS)]
            self.figure.line("x", f"m{index}", source=self.source, color=color, line_width=2, legend_label=module)
            self.modules.append(module)
        visible = len(modules) >= self.min_modules
        if self.figure.visible != visible:
            self.figure.visible = visible


def _legend_below(figure: Any, legend_class: Any) -> None:
    """Give ``figure`` an empty legend below its plot area: glyphs drawn with ``legend_label`` join
    it there, never on top of the data."""
    figure.add_layout(
        legend_class(
            orientation="horizontal",
            ncols=3,
            label_text_font_size="8pt",
            glyph_width=14,
            label_standoff=3,
            spacing=6,
            padding=2,
            margin=2,
            border_line_alpha=0,
        ),
        "below",
    )


def _set(div: Any, text: str) -> None:
    if div.text != text:  # an unchanged Div sends nothing to the browser
        div.text = text


def _nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")
