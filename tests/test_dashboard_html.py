"""The dashboard's markup, without a cluster: the templates escape what runs send (a run name is
whatever a driver chose), and they ship with the package."""

from __future__ import annotations

import math
import pathlib
import tomllib
import weakref
from html.parser import HTMLParser

from bokeh.document import Document

from dlearner.dashboard import DashboardPlugin, MetricsStore, render_page
from dlearner.dashboard.app import dlearner_doc
from dlearner.dashboard.html import json_link, run_link
from dlearner.dashboard.store import MAX_MODULE_CURVES
from dlearner.dashboard.templating import TEMPLATES

ROOT = pathlib.Path(__file__).resolve().parent.parent
HOSTILE = "<script>alert(1)</script>' onmouseover='alert(2)"


class Elements(HTMLParser):
    """Every element and attribute name of a page, and its text."""

    def __init__(self, markup: str):
        super().__init__()
        self.tags: set = set()
        self.attributes: set = set()
        self.images: list = []
        self.text = ""
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)
        if tag == "img":
            self.images.append(dict(attrs).get("src"))

    def handle_data(self, data):
        self.text += data


def hostile_store() -> MetricsStore:
    store = MetricsStore()
    store.add(
        {
            "run_id": HOSTILE,
            "kind": "status",
            "status": "running",
            "time": 1.0,
            "algorithm": "<u>PPO</u>",
            "env": "<img src=x onerror=alert(3)>",
        }
    )
    store.add(
        {
            "run_id": HOSTILE,
            "kind": "train",
            "time": 2.0,
            "result": {
                "training_iteration": 1,
                "num_env_steps_sampled_lifetime": 100,
                "env_runners": {"episode_return_mean": 1.0},
                "learners": {"<i>module</i>": {"total_loss": 0.5, "<u>metric</u>": 1.0}},
            },
        },
        received=2.0,
    )
    store.add(
        {
            "run_id": "failed <em>run</em>",
            "kind": "status",
            "status": "failed",
            "time": 3.0,
            "error": "ValueError: <script>alert(4)</script>",
        }
    )
    return store


def assert_escaped(markup: str, *, with_failed_run: bool = True) -> None:
    page = Elements(markup)
    assert not page.tags & {"script", "i", "u", "em"}, page.tags  # elements the runs sent (pages use none)
    assert set(page.images) <= {"statics/images/dask-logo.svg"}, page.images
    assert not any(name.startswith("on") for name in page.attributes), page.attributes
    texts = [HOSTILE, "<u>PPO</u>", "<img src=x onerror=alert(3)>", "<i>module</i>", "<u>metric</u>"]
    if with_failed_run:
        texts += ["failed <em>run</em>", "ValueError: <script>alert(4)</script>"]
    for text in texts:
        assert text in page.text, text  # shown as text, not dropped


def test_the_plain_page_shows_hostile_names_as_text():
    runs = hostile_store().to_json()["runs"]
    assert_escaped(render_page(runs))
    hostile_only = [run for run in runs if run["run_id"] == HOSTILE]
    assert_escaped(render_page(hostile_only, selected=HOSTILE), with_failed_run=False)


class BrowserSession:
    """What the Bokeh application reads of a browser's request: the query arguments of its URL."""

    def __init__(self, **arguments: str):
        self.request = type("Request", (), {"arguments": {k: [v.encode()] for k, v in arguments.items()}})()


def bokeh_page_texts(store: MetricsStore, session: BrowserSession) -> str:
    """The HTML of every Div of one browser session of the Bokeh page."""
    plugin = DashboardPlugin()
    plugin.store = store

    class Scheduler:  # what the page reads from the scheduler: its plugins, clients and tasks
        plugins = {plugin.name: plugin}
        clients: dict = {}
        tasks: dict = {}

    plugin.scheduler = Scheduler()
    doc = Document()
    doc._session_context = weakref.ref(session)  # as Bokeh's server sets it for a browser session
    dlearner_doc(Scheduler(), {"prefix": "/"}, doc)
    (root,) = doc.roots
    texts = [root.children[0].text]
    for section in root.children[1:]:
        texts += [child.text for child in section.children if hasattr(child, "text")]
    return "".join(texts)


def test_the_bokeh_page_shows_hostile_names_as_text():
    assert_escaped(bokeh_page_texts(hostile_store(), BrowserSession()))
    session = BrowserSession(run=HOSTILE)  # the page of that one run: its name is in the links too
    assert_escaped(bokeh_page_texts(hostile_store(), session), with_failed_run=False)


def test_links_to_a_run_quote_its_name():
    assert run_link("a b&c'd") == "dlearner?run=a%20b%26c%27d"
    assert json_link("a/b?") == "dlearner/metrics.json?run=a%2Fb%3F"
    assert json_link(None) == "dlearner/metrics.json"


def test_the_templates_are_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dlearner"]
    package = ROOT / "dlearner"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    templates = {path for path in TEMPLATES.iterdir() if path.is_file()}
    assert templates and templates <= shipped, sorted(str(p) for p in templates - shipped)


# ------------------------------------------------------------------------- multi-agent runs
def multi_agent_result(iteration: int, modules=("agent_0", "agent_1")) -> dict:
    """A multi-agent PPO iteration as ``algo.train()`` reports it: the summed return, and per module."""
    return {
        "training_iteration": iteration,
        "num_env_steps_sampled_lifetime": 1000 * iteration,
        "num_agent_steps_sampled_lifetime": 1900 * iteration,
        "env_runners": {
            "episode_return_mean": 30.0 * iteration,
            "agent_episode_returns_mean": {m: 15.0 * iteration for m in modules},
            "module_episode_returns_mean": {m: (14.0 + n) * iteration for n, m in enumerate(modules)},
        },
        "learners": {
            **{m: {"total_loss": (n + 1.0) / iteration} for n, m in enumerate(modules)},
            "__all_modules__": {"num_env_steps_trained": 1900},
        },
    }


def single_agent_result(iteration: int) -> dict:
    return {
        "training_iteration": iteration,
        "num_env_steps_sampled_lifetime": 1000 * iteration,
        "num_agent_steps_sampled_lifetime": 1000 * iteration,
        "env_runners": {"episode_return_mean": 10.0 * iteration},
        "learners": {"default_policy": {"total_loss": 1.0 / iteration}},
    }


def store_of(results: list, run_id: str = "run") -> MetricsStore:
    store = MetricsStore()
    for result in results:
        time = float(result["training_iteration"])
        store.add({"run_id": run_id, "kind": "train", "time": time, "result": result}, received=time)
    return store


def test_a_multi_agent_run_keeps_a_return_and_a_loss_per_module_in_each_point():
    (run,) = store_of([multi_agent_result(1), multi_agent_result(2)]).to_json()["runs"]
    assert run["history"][-1]["module_returns"] == {"agent_0": 28.0, "agent_1": 30.0}
    assert run["history"][-1]["module_losses"] == {"agent_0": 0.5, "agent_1": 1.0}
    (single,) = store_of([single_agent_result(1)]).to_json()["runs"]
    assert "module_returns" not in single["history"][0] and "module_losses" not in single["history"][0]


def test_per_module_curves_are_bounded_like_the_history():
    many = [f"p{n:02d}" for n in range(MAX_MODULE_CURVES + 5)]
    store = MetricsStore(max_history=3)
    for i in range(1, 6):
        store.add({"run_id": "league", "kind": "train", "result": multi_agent_result(i, many)}, received=float(i))
    (run,) = store.to_json()["runs"]
    assert [p["step"] for p in run["history"]] == [1, 4, 5]
    assert sorted(run["history"][-1]["module_returns"]) == many[:MAX_MODULE_CURVES]  # the first modules by id


def test_the_plain_page_of_a_multi_agent_run_draws_one_line_per_module_with_a_legend():
    html = render_page(store_of([multi_agent_result(i) for i in (1, 2, 3)]).to_json()["runs"])
    charts = Elements(html)
    assert "episode return (sum over agents)" in charts.text
    assert "episode return per module" in charts.text and "total_loss per module" in charts.text
    # the summed return; agent_0's and agent_1's returns; the total loss (mean); agent_0's and agent_1's losses
    assert html.count("<polyline") == 6
    assert charts.text.count("agent_0") >= 2 and charts.text.count("agent_1") >= 2  # in both legends
    assert "episode return (mean), module agent_1" in charts.text  # the latest values in the env runners' table
    assert "num_agent_steps_sampled_lifetime" in charts.text


def test_a_shared_module_gets_its_return_curve_but_no_second_loss_chart():
    html = render_page(store_of([multi_agent_result(i, ("default_policy",)) for i in (1, 2)]).to_json()["runs"])
    assert "episode return per module" in html and "total_loss per module" not in html


def test_a_single_agent_page_has_no_per_module_charts():
    html = render_page(store_of([single_agent_result(i) for i in (1, 2)]).to_json()["runs"])
    for text in ("per module", "sum over agents", "num_agent_steps_sampled_lifetime", ", module "):
        assert text not in html, text
    assert html.count("<polyline") == 2  # the return and the total loss


def bokeh_document(store: MetricsStore) -> Document:
    """The Bokeh page as one browser session builds it."""
    plugin = DashboardPlugin()
    plugin.store = store

    class Scheduler:
        plugins = {plugin.name: plugin}
        clients: dict = {}
        tasks: dict = {}

    doc = Document()
    doc._session_context = weakref.ref(BrowserSession())
    dlearner_doc(Scheduler(), {"prefix": "/"}, doc)
    return doc


def figures_of(doc: Document) -> dict:
    """The figures of a Bokeh page, by name."""
    from bokeh.models import Plot

    return {plot.name: plot for plot in doc.select({"type": Plot}) if plot.name}


def bokeh_figures(store: MetricsStore) -> dict:
    return figures_of(bokeh_document(store))


def legend_labels(figure) -> list:
    return [item.label.value for legend in figure.legend for item in legend.items]


def test_the_bokeh_page_of_a_multi_agent_run_draws_a_line_per_module():
    figures = bokeh_figures(store_of([multi_agent_result(i) for i in (1, 2)]))
    returns, losses = figures["module-returns-figure-run"], figures["module-losses-figure-run"]
    assert returns.visible and losses.visible
    assert legend_labels(returns) == ["agent_0", "agent_1"] and legend_labels(losses) == ["agent_0", "agent_1"]
    assert figures["return-figure-run"].title.text == "episode return (sum over agents)"


def test_the_bokeh_page_of_a_single_agent_run_hides_the_per_module_figures():
    figures = bokeh_figures(store_of([single_agent_result(i) for i in (1, 2)]))
    assert not figures["module-returns-figure-run"].visible and not figures["module-losses-figure-run"].visible
    assert figures["return-figure-run"].title.text == "episode return (mean)"


def test_a_module_added_during_a_run_gets_its_own_line_on_the_bokeh_page():
    store = store_of([multi_agent_result(1, ("p0", "p1"))])
    doc = bokeh_document(store)
    for i in (2, 3):  # Algorithm.add_module("p2", ...) after the first iteration
        store.add({"run_id": "run", "kind": "train", "result": multi_agent_result(i, ("p0", "p1", "p2"))}, received=float(i))
    (refresh,) = doc.session_callbacks  # the page's periodic redraw
    refresh.callback()
    returns = figures_of(doc)["module-returns-figure-run"]
    assert legend_labels(returns) == ["p0", "p1", "p2"]
    (source,) = {renderer.data_source for renderer in returns.renderers}
    assert len(source.data["m2"]) == 3 and math.isnan(source.data["m2"][0])  # p2 has no point before it joined
