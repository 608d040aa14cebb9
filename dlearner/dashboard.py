"""A dlearner page inside the Dask dashboard: the latest learner and env-runner metrics and a return curve.

The page is served by the scheduler's own HTTP server, on the same port as the Dask dashboard's
``/status``::

    http://<scheduler host>:8787/dlearner              # HTML, refreshes itself every 5 s
    http://<scheduler host>:8787/dlearner/metrics.json # the same data as JSON

How it works:

* :func:`register_dashboard` registers :class:`DashboardPlugin`, a
  :class:`distributed.diagnostics.plugin.SchedulerPlugin`, on the scheduler. Its ``start`` adds two
  tornado routes to ``scheduler.http_application`` (the application behind the dashboard port).
* The driver sends each iteration's result with :func:`publish_metrics` (or a bare
  ``LearnerGroup.update`` result with :func:`publish_learner_results`) as a scheduler *event* on the
  topic :data:`EVENT_TOPIC` (``Client.log_event``'s RPC, sent from the client's event loop so the
  training loop never waits for it). The scheduler calls every plugin's ``log_event`` hook; the
  plugin keeps the latest metrics and a bounded history per run id. Events logged before the plugin
  was registered are replayed from the scheduler's event log when it starts, so the order of
  registering and publishing does not matter.
* Several runs (run ids) can share one cluster; the page shows each of them.

Example::

    from distributed import Client
    from dlearner.dashboard import publish_metrics, register_dashboard

    client = Client("tcp://scheduler:8786")
    print("dlearner dashboard:", register_dashboard(client))
    for _ in range(10):
        result = algo.train()
        publish_metrics(client, "ppo-cartpole", result)

The scheduler must be able to import ``dlearner`` (install it in the scheduler's environment); a
scheduler can also load the page at start-up with ``dask scheduler --preload dlearner.dashboard``.
"""

from __future__ import annotations

import collections
import html
import json
import logging
import numbers
import time
import urllib.parse
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from dlearner.jsonsafe import json_safe

__all__ = [
    "EVENT_TOPIC",
    "PLUGIN_NAME",
    "DashboardPlugin",
    "dashboard_url",
    "dask_setup",
    "publish_learner_results",
    "publish_metrics",
    "register_dashboard",
]

logger = logging.getLogger(__name__)

#: Scheduler event topic that carries dlearner metrics from drivers to the plugin.
EVENT_TOPIC = "dlearner-metrics"
#: Prefix of the event topics where Dask learner groups' rank-0 learner logs each update's results
#: (``LearnerGroup.metrics_topic`` = ``learner-metrics-<group id>``, messages
#: ``{"learner": key, "request": n, "result": {module_id: {...}}}``). The page shows each group as a
#: run named ``learner-group-<group id>``, so bare LearnerGroup users see their metrics too.
LEARNER_TOPIC_PREFIX = "learner-metrics-"
#: Name of the scheduler plugin (one per scheduler; registering again is a no-op).
PLUGIN_NAME = "dlearner-dashboard"
#: Path of the page under the dashboard's URL prefix.
PAGE_PATH = "dlearner"

_MESSAGE_VERSION = 1
_KIND_TRAIN = "train"
_KIND_LEARNER = "learner_update"
_ALL_MODULES = "__all_modules__"  # dlearner.columns.ALL_MODULES; not imported so the scheduler needs no torch
_MAX_STRING = 200  # longest string the page keeps


# ------------------------------------------------------------------------------ driver side
def register_dashboard(client: Any) -> str:
    """Install the dlearner page on ``client``'s scheduler and return its URL.

    Idempotent: a scheduler keeps one :class:`DashboardPlugin` however many clients or runs register
    it. Returns ``""`` when the scheduler reports no dashboard address (``client.dashboard_link`` is
    empty).

    Raises:
        RuntimeError: the scheduler cannot import ``dlearner`` (install it in the scheduler's
            environment, or start the scheduler with ``--preload dlearner.dashboard``).
    """
    try:
        client.register_plugin(DashboardPlugin(), name=PLUGIN_NAME)
    except ImportError as err:  # raised on the scheduler while unpickling the plugin, re-raised here
        raise RuntimeError(
            f"The scheduler at {client.scheduler.address} cannot import dlearner ({err}); install dlearner in the "
            "scheduler's Python environment, or start the scheduler with `--preload dlearner.dashboard`."
        ) from err
    return dashboard_url(client)


def dashboard_url(client: Any) -> str:
    """The URL of the dlearner page for ``client``'s scheduler (``""`` if it has no dashboard).

    Built from ``client.dashboard_link`` (``distributed.dashboard.link`` config): its trailing
    ``status`` is replaced by ``dlearner``, so a URL prefix or proxy in the link carries over.
    """
    link = client.dashboard_link or ""
    if not link:
        return ""
    parts = urllib.parse.urlsplit(link)
    path = parts.path
    if path.endswith("/status"):
        path = path[: -len("status")] + PAGE_PATH
    else:
        path = path.rstrip("/") + "/" + PAGE_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def publish_metrics(client: Any, run_id: str, result: Mapping[str, Any], *, wait: bool = False) -> None:
    """Send one ``algo.train()`` result of run ``run_id`` to the dashboard page.

    ``result`` is the nested result dict (``result["learners"][module_id][metric]``,
    ``result["env_runners"]["episode_return_mean"]``, ``result["num_env_steps_sampled_lifetime"]``,
    ``result["training_iteration"]``, ...). Numbers follow :func:`dlearner.jsonsafe.json_safe` (NaN and
    infinities arrive as ``None``); lists and arrays are left out; a value that is not a number,
    string or ``None`` raises ``TypeError`` naming its key.

    By default this returns at once and the message is sent from the client's event loop; a failed
    send is logged, never raised, so the dashboard cannot slow down or break training. With
    ``wait=True`` it blocks until the scheduler has the message (use it for the last result before
    closing the client) and raises on failure. Results of the same run and ``training_iteration``
    replace each other, so publishing a result twice is harmless.
    """
    _check_run_id(run_id)
    if not isinstance(result, Mapping):
        raise TypeError(f"result must be the dict algo.train() returns, got {type(result).__name__}.")
    _send(client, {"run_id": run_id, "kind": _KIND_TRAIN, "result": _sanitize(result)}, wait=wait)


def publish_learner_results(
    client: Any,
    run_id: str,
    results: Mapping[str, Any],
    *,
    step: Optional[int] = None,
    wait: bool = False,
) -> None:
    """Send the result of a bare ``LearnerGroup.update`` (``{module_id: {...}, "__all_modules__": {...}}``).

    ``step`` numbers the update (the x axis of the page's loss curve); by default the page counts the
    updates it has received for ``run_id``. Sending is asynchronous as in :func:`publish_metrics`.
    """
    _check_run_id(run_id)
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be the dict LearnerGroup.update returns, got {type(results).__name__}.")
    if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0):
        raise ValueError(f"step must be an int >= 0 or None, got {step!r}.")
    message = {"run_id": run_id, "kind": _KIND_LEARNER, "result": _sanitize(results)}
    if step is not None:
        message["step"] = int(step)
    _send(client, message, wait=wait)


def _check_run_id(run_id: Any) -> None:
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError(f"run_id must be a non-empty string, got {run_id!r}.")


def _send(client: Any, message: Dict[str, Any], *, wait: bool) -> None:
    if client.status not in ("running", "connecting", "newly-created"):
        raise ValueError(f"Cannot publish dlearner metrics: the client is {client.status}.")
    message = {"version": _MESSAGE_VERSION, "time": time.time(), **message}
    if wait:
        client.sync(client.scheduler.log_event, topic=EVENT_TOPIC, msg=message)
    else:
        # add_callback is thread-safe and returns at once: the RPC runs on the client's event loop thread.
        client.loop.add_callback(_send_in_background, client, message)


async def _send_in_background(client: Any, message: Dict[str, Any]) -> None:
    try:
        await client.scheduler.log_event(topic=EVENT_TOPIC, msg=message)
    except OSError as err:  # CommClosedError is an OSError: the scheduler went away or the client closed
        logger.warning("Could not send dlearner metrics of run %r to the scheduler: %s", message["run_id"], err)


def _sanitize(result: Mapping[str, Any]) -> Dict[str, Any]:
    """A result as the page keeps it: JSON-safe numbers by :func:`dlearner.jsonsafe.json_safe` (the policy
    the metrics file follows: NaN/inf become None, numpy/torch scalars plain numbers, a value that is
    not a metric ``TypeError``), then without lists (curves, not metrics) and with strings cut short."""
    return _drop_lists(json_safe(result, name="result"))


def _drop_lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_lists(v) for k, v in value.items() if not isinstance(v, list)}
    if isinstance(value, str):
        return value[:_MAX_STRING]  # strings in results are labels; anything longer is not a metric
    return value


# --------------------------------------------------------------------------- scheduler side
class _RunRecord:
    """What the page knows about one run: latest values and a bounded curve."""

    def __init__(self, run_id: str, kind: str, max_history: int):
        self.run_id = run_id
        self.kind = kind
        self.first_seen = time.time()
        self.updated = self.first_seen
        self.step: Optional[int] = None  # training_iteration, or the update number of learner-only runs
        self.summary: Dict[str, Any] = {}
        self.learners: Dict[str, Dict[str, Any]] = {}
        self.env_runners: Dict[str, Any] = {}
        self.num_updates = 0
        # step -> (x, y); a dict so a re-sent step replaces its point, trimmed to max_history.
        self.history: "collections.OrderedDict[int, Tuple[Optional[float], Optional[float]]]" = collections.OrderedDict()
        self.max_history = max_history

    @property
    def axis_labels(self) -> Tuple[str, str]:
        if self.kind == _KIND_TRAIN:
            return "env steps sampled", "episode return (mean)"
        return "update", "total loss (mean over modules)"

    def add_point(self, step: int, x: Optional[float], y: Optional[float]) -> None:
        late = bool(self.history) and step < next(reversed(self.history))
        self.history[step] = (x, y)
        if late:  # messages may overtake each other: keep the curve in step order
            self.history = collections.OrderedDict(sorted(self.history.items()))
        while len(self.history) > self.max_history:
            self.history.popitem(last=False)

    def to_json(self) -> Dict[str, Any]:
        x_label, y_label = self.axis_labels
        return {
            "run_id": self.run_id,
            "kind": self.kind,
            "first_seen": self.first_seen,
            "updated": self.updated,
            "step": self.step,
            "summary": self.summary,
            "learners": self.learners,
            "env_runners": self.env_runners,
            "history": [{"step": s, "x": x, "y": y} for s, (x, y) in self.history.items()],
            "x_label": x_label,
            "y_label": y_label,
        }


class MetricsStore:
    """The metrics of every run that published to this scheduler (lives in the scheduler process)."""

    def __init__(self, *, max_history: int = 10_000, max_runs: int = 100):
        self.max_history = max_history
        self.max_runs = max_runs
        self.runs: "collections.OrderedDict[str, _RunRecord]" = collections.OrderedDict()

    def add(self, message: Any, received: Optional[float] = None) -> None:
        """Record one published message; malformed messages are logged and ignored."""
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("run_id"), str)
            and message.get("kind") in (_KIND_TRAIN, _KIND_LEARNER)
            and isinstance(message.get("result"), Mapping)
        ):
            logger.warning("Ignoring a malformed %r event: %.200r", EVENT_TOPIC, message)
            return
        run_id, kind, result = message["run_id"], message["kind"], message["result"]
        run = self.runs.get(run_id)
        if run is None:
            run = _RunRecord(run_id, kind, self.max_history)
            self.runs[run_id] = run
            while len(self.runs) > self.max_runs:
                self.runs.popitem(last=False)  # the run that was updated longest ago
        self.runs.move_to_end(run_id)
        run.updated = float(message.get("time") or received or time.time())  # the sender's clock if it has one
        run.kind = kind
        if kind == _KIND_TRAIN:
            self._add_train(run, result)
        else:
            self._add_learner_update(run, result, message.get("step"))

    @staticmethod
    def _add_train(run: _RunRecord, result: Mapping[str, Any]) -> None:
        step = result.get("training_iteration")
        step = int(step) if isinstance(step, int) else (run.step or 0) + 1
        env_runners = result.get("env_runners") if isinstance(result.get("env_runners"), Mapping) else {}
        x = result.get("num_env_steps_sampled_lifetime")
        run.add_point(step, x, env_runners.get("episode_return_mean"))
        if run.step is not None and step < run.step:
            return  # an older iteration arrived late: it only adds its point to the curve
        run.step = step
        run.summary = {k: v for k, v in result.items() if not isinstance(v, Mapping)}
        learners = result.get("learners") if isinstance(result.get("learners"), Mapping) else {}
        run.learners = {str(m): dict(v) for m, v in learners.items() if isinstance(v, Mapping)}
        run.env_runners = dict(env_runners)

    @staticmethod
    def _add_learner_update(run: _RunRecord, results: Mapping[str, Any], step: Any) -> None:
        run.num_updates += 1
        step = int(step) if isinstance(step, int) else run.num_updates
        losses = [
            v.get("total_loss") for m, v in results.items()
            if m != _ALL_MODULES and isinstance(v, Mapping) and isinstance(v.get("total_loss"), (int, float))
        ]
        run.add_point(step, float(step), sum(losses) / len(losses) if losses else None)
        if run.step is not None and step < run.step:
            return
        run.step = step
        run.summary = {"update": step, "num_updates_received": run.num_updates}
        run.learners = {str(m): dict(v) for m, v in results.items() if isinstance(v, Mapping)}

    def to_json(self, run_id: Optional[str] = None) -> Dict[str, Any]:
        """``{"runs": [run, ...]}``, most recently updated first (only ``run_id`` if given)."""
        runs = [r for r in reversed(self.runs.values()) if run_id is None or r.run_id == run_id]
        return {"runs": [r.to_json() for r in runs], "generated": time.time()}


# Applications that already carry our routes: a plugin unregistered and registered again must not add
# them twice. Handlers look the current plugin up by name, so they serve whichever one is installed.
_APPS_WITH_ROUTES: "weakref.WeakSet[web.Application]" = weakref.WeakSet()


class DashboardPlugin(SchedulerPlugin):
    """Scheduler plugin that serves ``/dlearner`` and ``/dlearner/metrics.json`` on the dashboard port.

    Register it with :func:`register_dashboard` (or ``dask scheduler --preload dlearner.dashboard``).
    """

    name = PLUGIN_NAME
    idempotent = True  # registering again (another client or run) keeps the existing plugin and its data

    def __init__(self, *, max_history: int = 10_000, max_runs: int = 100):
        self.max_history = max_history
        self.max_runs = max_runs
        self.store: Optional[MetricsStore] = None
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        """Add the routes and replay metrics published before the plugin existed.

        Nothing here awaits, so no event can slip in between the replay and the scheduler adding the
        plugin to its list (after which ``log_event`` sees every new event).
        """
        self.scheduler = scheduler
        self.store = MetricsStore(max_history=self.max_history, max_runs=self.max_runs)
        events = scheduler.get_events()
        replay = sorted((
            (timestamp, topic, message)
            for topic, topic_events in events.items()
            if topic == EVENT_TOPIC or topic.startswith(LEARNER_TOPIC_PREFIX)
            for timestamp, message in topic_events
        ), key=lambda event: event[0]) if events else []
        for timestamp, topic, message in replay:
            self._handle(topic, message, timestamp)
        app = getattr(scheduler, "http_application", None)
        if app is None:
            logger.warning("The scheduler runs no HTTP server; the dlearner dashboard page is not served.")
            return
        if app in _APPS_WITH_ROUTES:
            return
        prefix = _http_prefix(app)
        kwargs = {"scheduler": scheduler}
        app.add_handlers(
            r".*$",
            [
                (prefix + PAGE_PATH, DashboardPageHandler, kwargs),
                # The page's links are relative to ".../dlearner", so ".../dlearner/" redirects there.
                (prefix + PAGE_PATH + "/", web.RedirectHandler, {"url": prefix + PAGE_PATH}),
                (prefix + PAGE_PATH + r"/metrics\.json", DashboardJSONHandler, kwargs),
            ],
        )
        _APPS_WITH_ROUTES.add(app)

    def log_event(self, topic: str, msg: Any) -> None:
        """Scheduler hook, called for every logged event: keep ours and the learner groups'."""
        self._handle(topic, msg, time.time())

    def _handle(self, topic: str, msg: Any, timestamp: float) -> None:
        if self.store is None:
            return
        if topic == EVENT_TOPIC:
            self.store.add(msg, timestamp)
        elif topic.startswith(LEARNER_TOPIC_PREFIX) and isinstance(msg, Mapping):
            # The message's request number also counts non-update requests, so the page numbers the
            # updates it receives instead.
            try:
                result = _sanitize(msg.get("result")) if isinstance(msg.get("result"), Mapping) else None
            except (TypeError, ValueError) as err:  # not metrics: the store logs and ignores the message
                logger.warning("Ignoring a %r event whose result is not metrics: %s", topic, err)
                result = None
            self.store.add({
                "run_id": "learner-group-" + topic[len(LEARNER_TOPIC_PREFIX):],
                "kind": _KIND_LEARNER,
                "time": timestamp,
                "result": result,
            }, timestamp)


def dask_setup(scheduler: Any) -> None:
    """Preload hook: ``dask scheduler --preload dlearner.dashboard`` serves the page from the start."""
    scheduler.add_plugin(DashboardPlugin(), name=PLUGIN_NAME, idempotent=True)


def _http_prefix(app: web.Application) -> str:
    """The dashboard's URL prefix (``dask scheduler --dashboard-prefix``), ``/`` by default.

    The scheduler does not keep the prefix it was started with, but every route it installed carries
    it; ``/health`` is always there (distributed.http.health), so its pattern gives the prefix.
    """
    for rule in list(app.wildcard_router.rules):
        pattern = getattr(getattr(rule.matcher, "regex", None), "pattern", "")
        if pattern.endswith("health$"):
            return pattern[: -len("health$")]
    return "/"


class _Handler(web.RequestHandler):
    def initialize(self, scheduler: Any) -> None:
        self.dask_scheduler = scheduler

    def _store(self) -> Optional[MetricsStore]:
        plugin = self.dask_scheduler.plugins.get(PLUGIN_NAME)
        return plugin.store if isinstance(plugin, DashboardPlugin) else None

    def _run_filter(self) -> Optional[str]:
        run_id = self.get_query_argument("run", default=None)
        return run_id or None


class DashboardJSONHandler(_Handler):
    """``GET /dlearner/metrics.json[?run=ID]``: every run's latest metrics and curve as JSON."""

    def get(self) -> None:
        store = self._store()
        if store is None:
            raise web.HTTPError(404, reason="The dlearner dashboard plugin is not registered on this scheduler")
        run_id = self._run_filter()
        data = store.to_json(run_id)
        if run_id is not None and not data["runs"]:
            raise web.HTTPError(404, reason=f"No dlearner run {run_id!r} on this scheduler")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(data, allow_nan=False))


class DashboardPageHandler(_Handler):
    """``GET /dlearner[?run=ID]``: the HTML page."""

    def get(self) -> None:
        store = self._store()
        if store is None:
            raise web.HTTPError(404, reason="The dlearner dashboard plugin is not registered on this scheduler")
        run_id = self._run_filter()
        runs = store.to_json(run_id)["runs"]
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(render_page(runs, selected=run_id))


# ------------------------------------------------------------------------------------ HTML
_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.3em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { background: #f3f3f3; }
.muted { color: #777; font-size: 0.85em; } .row { display: flex; flex-wrap: wrap; gap: 2em; }
svg text { font-size: 11px; fill: #444; }
"""


def render_page(runs: List[Dict[str, Any]], *, selected: Optional[str] = None) -> str:
    """The HTML page for runs as :meth:`MetricsStore.to_json` returns them (no scripts, no external files)."""
    esc = html.escape
    json_link = f"{PAGE_PATH}/metrics.json"
    if selected is not None:
        json_link += "?run=" + urllib.parse.quote(selected, safe="")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta http-equiv='refresh' content='5'>",
        "<title>dlearner</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>dlearner training</h1>",
        # Links are relative to the page (".../dlearner"), so they keep working under a
        # --dashboard-prefix or behind a proxy.
        f"<p class='muted'>{len(runs)} run(s) on this cluster &middot; refreshes every 5 s &middot; "
        f"<a href='{html.escape(json_link, quote=True)}'>JSON</a> &middot; "
        "<a href='status'>Dask dashboard</a></p>",
    ]
    if selected is not None:
        parts.append(f"<p><a href='{PAGE_PATH}'>&larr; all runs</a></p>")
    if not runs:
        parts.append(
            "<p>No metrics yet. They appear here once a driver publishes them "
            "(<code>dlearner train</code> does each iteration).</p>"
        )
    elif len(runs) > 1:
        parts.append("<ul>")
        for run in runs:
            rid = run["run_id"]
            parts.append(
                f"<li><a href='#run-{esc(rid, quote=True)}'>{esc(rid)}</a> "
                f"<span class='muted'>step {esc(_fmt(run['step']))}, updated {_age(run['updated'])} ago</span></li>"
            )
        parts.append("</ul>")
    for run in runs:
        parts.append(_render_run(run))
    parts.append("</body></html>")
    return "".join(parts)


def _render_run(run: Dict[str, Any]) -> str:
    esc = html.escape
    rid = run["run_id"]
    link = f"{PAGE_PATH}?run={urllib.parse.quote(rid, safe='')}"
    out = [
        f"<h2 id='run-{esc(rid, quote=True)}'><a href='{esc(link, quote=True)}'>{esc(rid)}</a></h2>",
        f"<p class='muted'>updated {_age(run['updated'])} ago &middot; "
        f"{'training iteration' if run['kind'] == _KIND_TRAIN else 'learner update'} {esc(_fmt(run['step']))}</p>",
    ]
    summary = run["summary"]
    if summary:
        out.append("<h3>Run</h3>" + _table(["metric", "value"], [[k, v] for k, v in sorted(summary.items())]))
    out.append("<div class='row'><div>")
    out.append(f"<h3>Curve: {esc(run['y_label'])}</h3>")
    out.append(render_svg_curve(run["history"], x_label=run["x_label"], y_label=run["y_label"]))
    out.append("</div>")
    if run["env_runners"]:
        out.append("<div><h3>Env runners</h3>")
        out.append(_table(["metric", "value"], [[k, v] for k, v in sorted(run["env_runners"].items())]))
        out.append("</div>")
    out.append("</div>")
    learners = run["learners"]
    if learners:
        modules = sorted(learners, key=lambda m: (m == _ALL_MODULES, m))
        metrics = sorted({name for m in modules for name in learners[m]})
        rows = [[name] + [learners[m].get(name, "") for m in modules] for name in metrics]
        out.append("<h3>Learners (latest update)</h3>" + _table(["metric"] + modules, rows))
    return "".join(out)


def _table(header: List[str], rows: List[List[Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_svg_curve(
    history: List[Mapping[str, Any]], *, x_label: str, y_label: str, width: int = 560, height: int = 260
) -> str:
    """An inline SVG line chart of ``history`` (``[{"x": .., "y": ..}, ...]``); points without y are skipped."""
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
    x_lo, x_hi = _padded_range(min(xs), max(xs))
    y_lo, y_hi = _padded_range(min(ys), max(ys))

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return top + (1.0 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
        f"aria-label='{esc(y_label, quote=True)} over {esc(x_label, quote=True)}'>",
        f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_h}' fill='#fafafa' stroke='#bbb'/>",
    ]
    for i in range(5):  # horizontal grid lines with y tick labels
        value = y_lo + (y_hi - y_lo) * i / 4
        y = sy(value)
        out.append(f"<line x1='{left}' y1='{y:.1f}' x2='{left + plot_w}' y2='{y:.1f}' stroke='#e4e4e4'/>")
        out.append(f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{esc(_fmt_tick(value))}</text>")
    for i in range(5):
        value = x_lo + (x_hi - x_lo) * i / 4
        x = sx(value)
        out.append(f"<text x='{x:.1f}' y='{top + plot_h + 15}' text-anchor='middle'>{esc(_fmt_tick(value))}</text>")
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


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.4f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def _fmt_tick(value: float) -> str:
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
        return f"{value:.3g}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _age(timestamp: float) -> str:
    seconds = max(0.0, time.time() - float(timestamp))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
