"""A dlearner page inside the Dask dashboard: every run's status, learners, env runners and live curves.

The page is served by the scheduler's own HTTP server, on the same port as the Dask dashboard's
``/status``, and linked from its navigation bar::

    http://<scheduler host>:8787/dlearner              # the page (Bokeh, live; or plain HTML)
    http://<scheduler host>:8787/dlearner?run=<run id> # one run (404 for an unknown run)
    http://<scheduler host>:8787/dlearner/metrics.json # the same data as JSON, for scripts

How it works:

* Importing this module adds the ``/dlearner`` Bokeh application (:mod:`.app`) to the applications
  of dashboards of schedulers started afterwards in this process (embedded clusters, and
  ``dask scheduler --preload dlearner.dashboard``, whose :func:`dask_setup` also installs the plugin).
* :func:`register_dashboard` registers :class:`DashboardPlugin` (a Dask ``SchedulerPlugin``) on the
  scheduler. It keeps every run's data and adds ``/dlearner/metrics.json``, the navigation link and,
  on a scheduler started without the Bokeh application, a plain-HTML ``/dlearner`` route.
* Drivers send results with :func:`publish_metrics` and the run's status with :func:`publish_status`
  as scheduler events on :data:`EVENT_TOPIC`; learner actors log their update results and timings as
  events too. Events logged before the plugin was registered are replayed when it starts.

Example::

    from distributed import Client
    from dlearner.dashboard import publish_metrics, publish_status, register_dashboard

    client = Client("tcp://scheduler:8786")
    print("dlearner dashboard:", register_dashboard(client))
    publish_status(client, "ppo-cartpole", "running", algorithm=algo)
    for _ in range(10):
        publish_metrics(client, "ppo-cartpole", algo.train())
    publish_status(client, "ppo-cartpole", "finished", wait=True)

The scheduler must be able to import ``dlearner`` (install it in the scheduler's environment); it
needs neither torch nor gymnasium for this.
"""

from __future__ import annotations

from dlearner.dashboard.app import install_bokeh_page
from dlearner.dashboard.html import render_page
from dlearner.dashboard.plugin import DashboardPlugin, dask_setup
from dlearner.dashboard.protocol import PAGE_PATH, PLUGIN_NAME, STATUSES
from dlearner.dashboard.publish import (
    dashboard_url,
    error_line,
    publish_learner_results,
    publish_metrics,
    publish_status,
    register_dashboard,
)
from dlearner.dashboard.store import FOLD_AFTER_S, MetricsStore
from dlearner.dashboard.svg import render_svg_curve
from dlearner.events import EVENT_TOPIC, LEARNER_TOPIC_PREFIX, TIMING_TOPIC

__all__ = [
    "EVENT_TOPIC",
    "FOLD_AFTER_S",
    "LEARNER_TOPIC_PREFIX",
    "PAGE_PATH",
    "PLUGIN_NAME",
    "STATUSES",
    "TIMING_TOPIC",
    "DashboardPlugin",
    "MetricsStore",
    "dashboard_url",
    "dask_setup",
    "error_line",
    "install_bokeh_page",
    "publish_learner_results",
    "publish_metrics",
    "publish_status",
    "register_dashboard",
    "render_page",
    "render_svg_curve",
]

# Schedulers started in this process from now on serve the page as part of their dashboard (a
# preload module is imported before its scheduler builds the dashboard).
install_bokeh_page()
