"""Scheduler side: the plugin that keeps the store, and the routes that serve it.

Two ways the page is served (see docs/dashboard.md):

* **Bokeh application** (:mod:`dlearner.dashboard.app`), when ``dlearner.dashboard`` was imported
  in the scheduler's process before the scheduler started: an embedded ``LocalCluster`` that
  dlearner starts, or ``dask scheduler --preload dlearner.dashboard``. Dask builds its dashboard's
  Bokeh server from ``distributed.dashboard.scheduler.applications`` when the scheduler starts, so
  only an application in that dict by then becomes part of the dashboard.
* **Tornado route** (:func:`dlearner.dashboard.html.render_page`) otherwise: a scheduler that was
  already running when a client registered the plugin. Same data, plain HTML, 5 s refresh.

Either way the plugin adds ``/dlearner/metrics.json`` and a ``Dlearner`` link to the navigation bar
of Dask's own pages.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from typing import Any, Mapping, Optional

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web
from tornado.routing import PathMatches, Rule

from dlearner.dashboard.html import render_page
from dlearner.dashboard.protocol import PAGE_PATH, PLUGIN_NAME, sanitize
from dlearner.dashboard.store import MAX_HISTORY, MetricsStore, SchedulerLiveness
from dlearner.events import EVENT_TOPIC, LEARNER_TOPIC_PREFIX, TIMING_TOPIC

logger = logging.getLogger(__name__)

# Applications that already carry our routes: a plugin unregistered and registered again must not add
# them twice. Handlers look the current plugin up by name, so they serve whichever one is installed.
_APPS_WITH_ROUTES: "weakref.WeakSet[web.Application]" = weakref.WeakSet()


class DashboardPlugin(SchedulerPlugin):
    """Scheduler plugin behind the dlearner page: keeps every run's metrics, serves the routes.

    Register it with :func:`dlearner.dashboard.register_dashboard` (or
    ``dask scheduler --preload dlearner.dashboard``).
    """

    name = PLUGIN_NAME
    idempotent = True  # registering again (another client or run) keeps the existing plugin and its data

    def __init__(self, *, max_history: int = MAX_HISTORY, max_runs: int = 100):
        self.max_history = max_history
        self.max_runs = max_runs
        self.store: Optional[MetricsStore] = None
        self.scheduler: Any = None
        #: "bokeh" or "tornado": how this scheduler serves the page (see the module docstring).
        self.served_by: Optional[str] = None

    async def start(self, scheduler: Any) -> None:
        """Add the routes and replay metrics published before the plugin existed.

        Nothing here awaits, so no event can slip in between the replay and the scheduler adding the
        plugin to its list (after which ``log_event`` sees every new event).
        """
        self.scheduler = scheduler
        self.store = MetricsStore(max_history=self.max_history, max_runs=self.max_runs)
        events = scheduler.get_events() or {}
        replay = sorted(
            (
                (timestamp, topic, message)
                for topic, topic_events in events.items()
                if _is_ours(topic)
                for timestamp, message in topic_events
            ),
            key=lambda event: event[0],
        )
        for timestamp, topic, message in replay:
            self._handle(topic, message, timestamp)
        app = getattr(scheduler, "http_application", None)
        if app is None:
            logger.warning("The scheduler runs no HTTP server; the dlearner dashboard page is not served.")
            return
        self.served_by = "bokeh" if bokeh_page_served(app) else "tornado"
        add_nav_link(scheduler)
        if app in _APPS_WITH_ROUTES:
            return
        prefix = http_prefix(app)
        kwargs = {"scheduler": scheduler}
        page = prefix + PAGE_PATH
        routes: list = [
            (page + r"/metrics\.json", DashboardJSONHandler, kwargs),
            # The page's links are relative to ".../dlearner", so ".../dlearner/" redirects there.
            (page + "/", web.RedirectHandler, {"url": page}),
        ]
        if self.served_by == "bokeh":
            # The Bokeh application answers /dlearner; this rule only claims "?run=<unknown>" to say 404
            # (a Bokeh session cannot), and lets every other request fall through to the application.
            routes.append(Rule(_UnknownRunMatcher(page, scheduler), UnknownRunHandler, kwargs))
        else:
            routes.append((page, DashboardPageHandler, kwargs))
        app.add_handlers(r".*$", routes)
        _APPS_WITH_ROUTES.add(app)

    def log_event(self, topic: str, msg: Any) -> None:
        """Scheduler hook, called for every logged event: keep ours and the learner groups'."""
        self._handle(topic, msg, time.time())

    def _handle(self, topic: str, msg: Any, timestamp: float) -> None:
        if self.store is None or not _is_ours(topic):
            return
        if topic == EVENT_TOPIC:
            self.store.add(msg, timestamp)
        elif topic == TIMING_TOPIC:
            self.store.add_timing(msg, timestamp)
        elif isinstance(msg, Mapping):  # learner-metrics-<group id>: a learner group's rank-0 results
            try:
                result = sanitize(msg.get("result")) if isinstance(msg.get("result"), Mapping) else None
            except (TypeError, ValueError) as err:  # not metrics: ignored
                logger.warning("Ignoring a %r event whose result is not metrics: %s", topic, err)
                result = None
            self.store.add_group_result(topic[len(LEARNER_TOPIC_PREFIX) :], result, timestamp)

    def runs_json(self, run_id: Optional[str] = None) -> dict:
        """What ``metrics.json`` serves (liveness read from this scheduler)."""
        assert self.store is not None, "the plugin has not started"
        return self.store.to_json(run_id, liveness=SchedulerLiveness(self.scheduler))


def _is_ours(topic: Any) -> bool:
    return isinstance(topic, str) and (topic in (EVENT_TOPIC, TIMING_TOPIC) or topic.startswith(LEARNER_TOPIC_PREFIX))


def current_plugin(scheduler: Any) -> Optional[DashboardPlugin]:
    """The plugin installed on ``scheduler`` (``None`` before any client registered it)."""
    plugin = scheduler.plugins.get(PLUGIN_NAME)
    return plugin if isinstance(plugin, DashboardPlugin) and plugin.store is not None else None


def dask_setup(scheduler: Any) -> None:
    """Preload hook: ``dask scheduler --preload dlearner.dashboard`` serves the page from the start."""
    scheduler.add_plugin(DashboardPlugin(), name=PLUGIN_NAME, idempotent=True)


def bokeh_page_served(app: web.Application) -> bool:
    """Whether one of the scheduler's Bokeh servers has the dlearner application."""
    return any("/" + PAGE_PATH in getattr(sub, "app_paths", ()) for sub in getattr(app, "applications", ()))


def add_nav_link(scheduler: Any) -> None:
    """Add ``dlearner`` to the navigation bar of Dask's pages.

    Dask's pages render their navigation from ``template_variables(scheduler)["pages"]``, one list
    per scheduler (memoized) that every page shares, read when a page is opened: appending to it
    adds the link everywhere, even on a scheduler that started without dlearner.
    """
    try:
        from distributed.dashboard.scheduler import template_variables
    except ImportError:  # no bokeh: Dask serves no pages to link from
        return
    pages = template_variables(scheduler).get("pages")
    if isinstance(pages, list) and PAGE_PATH not in pages:
        pages.append(PAGE_PATH)


def http_prefix(app: web.Application) -> str:
    """The dashboard's URL prefix (``dask scheduler --dashboard-prefix``), ``/`` by default.

    The scheduler does not keep the prefix it was started with, but every route it installed carries
    it; ``/health`` is always there (distributed.http.health), so its pattern gives the prefix.
    """
    for rule in list(app.wildcard_router.rules):
        pattern = getattr(getattr(rule.matcher, "regex", None), "pattern", "")
        if pattern.endswith("health$"):
            return pattern[: -len("health$")]
    return "/"


class _UnknownRunMatcher(PathMatches):
    """Matches ``<page>?run=<id>`` only when no run ``id`` is known."""

    def __init__(self, page: str, scheduler: Any):
        super().__init__(page)
        self.scheduler = scheduler

    def match(self, request: Any) -> Optional[dict]:
        found = super().match(request)
        if found is None:
            return None
        run_id = (request.query_arguments.get("run") or [b""])[0].decode("utf-8", "replace")
        plugin = current_plugin(self.scheduler)
        if not run_id or plugin is None or plugin.store.has_run(run_id):
            return None
        return found


class _Handler(web.RequestHandler):
    def initialize(self, scheduler: Any) -> None:
        self.dask_scheduler = scheduler

    def _plugin(self) -> DashboardPlugin:
        plugin = current_plugin(self.dask_scheduler)
        if plugin is None:
            raise web.HTTPError(404, reason="The dlearner dashboard plugin is not registered on this scheduler")
        return plugin

    def _run_filter(self) -> Optional[str]:
        return self.get_query_argument("run", default=None) or None

    def _runs(self) -> tuple:
        plugin = self._plugin()
        run_id = self._run_filter()
        data = plugin.runs_json(run_id)
        if run_id is not None and not data["runs"]:
            raise web.HTTPError(404, reason=f"No dlearner run {run_id!r} on this scheduler")
        return run_id, data


class DashboardJSONHandler(_Handler):
    """``GET /dlearner/metrics.json[?run=ID]``: every run's status, metrics, learners and curves."""

    def get(self) -> None:
        _, data = self._runs()
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(data, allow_nan=False))


class DashboardPageHandler(_Handler):
    """``GET /dlearner[?run=ID]``: the plain-HTML page (schedulers started without dlearner)."""

    def get(self) -> None:
        run_id, data = self._runs()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        pages = None
        try:
            from distributed.dashboard.scheduler import template_variables

            pages = list(template_variables(self.dask_scheduler).get("pages") or [])
        except ImportError:  # no bokeh: Dask serves no pages, the page draws Dask's usual navigation
            pass
        self.write(render_page(data["runs"], selected=run_id, nav_pages=pages))


class UnknownRunHandler(_Handler):
    """``GET /dlearner?run=<unknown>`` next to the Bokeh application: a 404 naming the run."""

    def get(self) -> None:
        self._runs()  # raises the 404
