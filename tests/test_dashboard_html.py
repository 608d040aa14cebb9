"""The dashboard's markup, without a cluster: the templates escape what runs send (a run name is
whatever a driver chose), and they ship with the package."""

from __future__ import annotations

import pathlib
import tomllib
import weakref
from html.parser import HTMLParser

from bokeh.document import Document

from dlearner.dashboard import DashboardPlugin, MetricsStore, render_page
from dlearner.dashboard.app import dlearner_doc
from dlearner.dashboard.html import json_link, run_link
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
