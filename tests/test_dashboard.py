"""The dlearner page in the Dask dashboard: a real LocalCluster, real HTTP GETs, a real headless Chromium.

One cluster serves the whole module (its scheduler starts after ``dlearner.dashboard`` is imported,
so it has the Bokeh page); a second, worker-less one starts without the page to show the plain
fallback route.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from dlearner import APPOConfig, PPOConfig
from dlearner.dashboard import (
    FOLD_AFTER_S,
    MetricsStore,
    publish_learner_results,
    publish_metrics,
    publish_status,
    register_dashboard,
    render_page,
    render_svg_curve,
)
from dlearner.dashboard.app import DISCONNECTED_ID
from dlearner.dashboard.formatting import nice_ticks
from dlearner.dashboard.html import STATUS_COLORS, env_runners_table, learner_ranks_table, summary_table

SMALL = {"fcnet_hiddens": [16, 16]}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: install Debian's `chromium` package to check the page in a real browser"
)
#: No CartPole-v1 run on this machine samples or trains a million env steps per second.
PHYSICAL_BOUND_STEPS_PER_S = 1e6


@pytest.fixture(scope="module")
def cluster():
    # Three workers: an APPO run's learner and its two env runners, each in a process of its own.
    with LocalCluster(n_workers=3, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster) as client:
        yield client


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read().decode("utf-8")


def runs_by_id(url: str) -> dict:
    return {r["run_id"]: r for r in json.loads(get(url + "/metrics.json"))["runs"]}


def wait_for(url: str, run_id: str, *, step: int = 0, status: str = "", timeout: float = 20.0) -> dict:
    """Poll metrics.json until ``run_id`` reached ``step`` and ``status`` (publishing is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        run = runs_by_id(url).get(run_id)
        if run and (run["step"] or 0) >= step and (not status or run["status"] == status):
            return run
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id!r} did not reach step {step} / status {status!r}: {run}")
        time.sleep(0.1)


def assert_404(url: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        get(url)
    assert err.value.code == 404


def train_result(iteration: int, ret: float) -> dict:
    return {
        "training_iteration": iteration,
        "num_env_steps_sampled_lifetime": 1000 * iteration,
        "time_this_iter_s": np.float32(0.25),
        "env_steps_per_s": 4000.0,
        "env_runners": {"episode_return_mean": ret, "episode_len_mean": float("nan"), "episode_returns": [1.0, 2.0]},
        "learners": {
            "default_policy": {"total_loss": np.float64(1.0 / iteration), "policy_loss": -0.01},
            "__all_modules__": {"num_env_steps_trained": 6000},
        },
    }


def publish_runs_in_each_status(client, prefix: str = "run") -> None:
    """Four runs, oldest first: ``<prefix>-finished``, ``-failed``, ``-stopped`` (by a signal), ``-running``."""
    for suffix, status, error in (
        ("finished", "finished", None),
        ("failed", "failed", ValueError("loss is NaN\nTraceback ...")),
        ("stopped", "stopped", "SIGTERM received after iteration 2"),
        ("running", "running", None),
    ):
        run_id = f"{prefix}-{suffix}"
        publish_status(client, run_id, "running", wait=True)
        for i in (1, 2):
            publish_metrics(client, run_id, train_result(i, 10.0 * i), wait=True)
        if status != "running":
            publish_status(client, run_id, status, error, wait=True)


def test_json_serves_each_status_newest_first(client):
    # Published before the page is registered: the plugin replays it from the scheduler's event log.
    publish_metrics(client, "early-run", train_result(1, 11.0), wait=True)
    url = register_dashboard(client)
    assert url == client.dashboard_link.replace("/status", "/dlearner")
    assert register_dashboard(client) == url  # idempotent
    publish_runs_in_each_status(client)

    runs = runs_by_id(url)
    assert list(runs)[:4] == ["run-running", "run-stopped", "run-failed", "run-finished"]  # by start, newest first
    assert [runs[r]["status"] for r in runs] == ["running", "stopped", "failed", "finished", "running"]
    assert runs["run-failed"]["error"] == "ValueError: loss is NaN"  # the first line only
    assert runs["run-stopped"]["error"] == "SIGTERM received after iteration 2"
    assert runs["early-run"]["env_runners"]["episode_return_mean"] == 11.0
    run = runs["run-running"]
    assert run["learners"]["default_policy"]["total_loss"] == pytest.approx(0.5)
    assert run["env_runners"]["episode_len_mean"] is None  # NaN -> null
    assert "episode_returns" not in run["env_runners"]  # lists are not metrics
    assert [(p["x"], p["y"]) for p in run["history"]] == [(1000, 10.0), (2000, 20.0)]
    assert run["history"][-1]["losses"]["total_loss"] == pytest.approx(0.5)
    assert run["history"][-1]["throughput"]["env steps trained/s"] == pytest.approx(6000 / 0.25)
    publish_metrics(client, "run-running", train_result(3, 30.0))  # more: the order stays
    wait_for(url, "run-running", step=3)
    assert list(runs_by_id(url))[:4] == ["run-running", "run-stopped", "run-failed", "run-finished"]

    assert [r["run_id"] for r in json.loads(get(url + "/metrics.json?run=run-failed"))["runs"]] == ["run-failed"]
    assert_404(url + "/metrics.json?run=no-such-run")
    assert_404(url + "?run=no-such-run")  # the page too
    with urllib.request.urlopen(url + "/", timeout=30) as response:  # a trailing slash redirects to the page
        assert response.geturl() == url


def test_page_is_a_dashboard_page_with_a_section_per_run(client, cluster):
    from bokeh.document import Document

    from dlearner.dashboard.app import dlearner_doc

    url = register_dashboard(client)
    publish_runs_in_each_status(client, "page")
    wait_for(url, "page-running", step=2)
    page = get(url)
    assert 'id="myTopnav"' in page and 'href="dlearner"' in page  # the dashboard's template and nav
    assert 'href="dlearner"' in get(url.replace("/dlearner", "/status"))  # Dask's own pages link to it
    # What a browser session of the Bokeh application holds: one header per run, in order, with status.
    doc = Document()
    dlearner_doc(cluster.scheduler, {"prefix": "/"}, doc)
    (root,) = doc.roots
    headers = [section.children[0].text for section in root.children[1:]]  # the first child is the intro
    names = ("page-running", "page-stopped", "page-failed", "page-finished")
    order = [next(name for name in names if name in h) for h in headers if any(name in h for name in names)]
    assert order == list(names)
    joined = "".join(headers)
    for text in (">running<", ">finished<", ">failed<", "ValueError: loss is NaN", ">stopped<", "SIGTERM received"):
        assert text in joined, text


def test_plain_page_where_the_scheduler_started_without_dlearner():
    from distributed.dashboard import scheduler as dask_dashboard

    page = dask_dashboard.applications.pop("/dlearner")  # as if dlearner was not imported before the start
    try:
        with LocalCluster(n_workers=0, dashboard_address=":0") as cluster, Client(cluster) as client:
            url = register_dashboard(client)
            publish_runs_in_each_status(client)
            wait_for(url, "run-running", step=2)
            html = get(url)
            assert html.index("run-running") < html.index("run-stopped") < html.index("run-failed")
            for text in (
                "ValueError: loss is NaN",
                ">finished<",
                ">stopped<",
                "<polyline",
                "statics/css/base.css",
                "href='dlearner'",
                "href='status'",
            ):
                assert text in html, text
            assert "<script" not in html  # works without JavaScript
            assert "run-failed" in get(url + "?run=run-failed") and "run-running" not in get(url + "?run=run-failed")
            assert_404(url + "?run=no-such-run")
            assert 'href="dlearner"' in get(url.replace("/dlearner", "/status"))
    finally:
        dask_dashboard.applications["/dlearner"] = page


def test_training_shows_one_section_with_each_learner(client):
    url = register_dashboard(client)
    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=4)
        .learners(num_learners=1)
        .training(train_batch_size=256, minibatch_size=64, num_epochs=1)
        .rl_module(model_config=SMALL)
        .cluster(client=client)
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        algo.dashboard_run_name = "ppo-on-cluster"
        for _ in range(2):
            result = algo.train()
        group_id = algo.learner_group.metrics_topic.rpartition("-")[2]
        run = wait_for(url, "ppo-on-cluster", step=2, status="running")
        deadline = time.monotonic() + 20
        while not (run["learner_ranks"] and run["learner_ranks"][0]["updates"] >= 2):
            assert time.monotonic() < deadline, run["learner_ranks"]
            time.sleep(0.1)
            run = runs_by_id(url)["ppo-on-cluster"]
    (learner,) = run["learner_ranks"]
    assert learner["rank"] == 0 and learner["healthy"] is True and learner["restarts"] == 0
    assert learner["worker"] in client.scheduler_info()["workers"] and learner["device"] == "cpu"
    assert learner["update_s"] > 0 and learner["compute_s"] > 0 and learner["waiting_s"] >= 0
    assert learner["rows_per_s"] > 0
    assert run["learners"]["default_policy"]["total_loss"] == pytest.approx(result["learners"]["default_policy"]["total_loss"])
    assert run["summary"]["num_healthy_learners"] == 1 and run["algorithm"] == "PPO"
    # Its learner group is part of the run, not a section of its own.
    assert f"learner-group-{group_id}" not in runs_by_id(url)
    wait_for(url, "ppo-on-cluster", status="finished")  # algo.stop() said so
    deadline = time.monotonic() + 20
    while runs_by_id(url)["ppo-on-cluster"]["learner_ranks"][0]["healthy"]:  # Dask releases the actor soon after
        assert time.monotonic() < deadline, "the stopped learner still shows as healthy"
        time.sleep(0.1)


def test_publish_rejects_bad_arguments(client):
    with pytest.raises(ValueError, match="run_id"):
        publish_metrics(client, "", {})
    with pytest.raises(TypeError, match="result"):
        publish_metrics(client, "run", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        publish_learner_results(client, "run", {}, step=-1)
    with pytest.raises(ValueError, match="status must be one of"):
        publish_status(client, "run", "done")


def test_store_orders_by_start_folds_finished_runs_and_hides_claimed_groups():
    store = MetricsStore(max_history=3)
    for i in (1, 3, 2, 4, 5):  # iteration 2 arrives late
        store.add(
            {
                "run_id": "r",
                "kind": "train",
                "time": 100.0,
                "result": {
                    "training_iteration": i,
                    "num_env_steps_sampled_lifetime": 10 * i,
                    "env_runners": {"episode_return_mean": float(i)},
                    "learners": {"m": {"total_loss": float(i)}},
                },
            },
            received=100.0,
        )
    store.add("not a message")  # ignored (logged)
    store.add_group_result("g1", {"m": {"total_loss": 1.0}}, received=200.0)
    store.add({"run_id": "owner", "kind": "status", "status": "finished", "time": 300.0, "learner_groups": ["g1"]})
    runs = store.to_json(now=300.0 + FOLD_AFTER_S + 1)["runs"]
    assert [r["run_id"] for r in runs] == ["owner", "r"]  # learner-group-g1 belongs to "owner"
    owner, r = runs
    assert owner["status"] == "finished" and owner["folded"]
    assert r["status"] == "running" and not r["folded"]
    assert r["step"] == 5 and r["learners"]["m"]["total_loss"] == 5.0
    assert [p["step"] for p in r["history"]] == [1, 4, 5]  # sorted; past max_history the older half is thinned


def test_a_long_run_keeps_its_whole_curve_in_a_bounded_number_of_points():
    store = MetricsStore(max_history=1000)
    for i in range(1, 100_001):  # ~3 hours of APPO at 10 iterations/s before the iteration floor
        result = {"training_iteration": i, "num_env_steps_sampled_lifetime": 500 * i, "env_runners": {"episode_return_mean": 1.0}}
        store.add({"run_id": "long", "kind": "train", "result": result}, received=float(i))
    steps = [p["step"] for p in store.to_json()["runs"][0]["history"]]
    assert len(steps) <= 1000 and steps == sorted(steps)
    assert steps[0] == 1 and steps[-1] == 100_000
    assert steps[-500:] == list(range(100_001 - 500, 100_001))  # the latest iterations in full
    deciles = {step * 10 // 100_001 for step in steps}
    assert deciles == set(range(10))  # and the whole run's shape: every tenth of it has points


def test_curves_have_round_ticks_and_pages_render_without_data():
    assert nice_ticks(25.9, 194.0) == [0, 50, 100, 150, 200]
    assert nice_ticks(0.0, 1.75) == [0, 0.5, 1.0, 1.5, 2.0]
    svg = render_svg_curve([{"x": 26, "y": 1.0}, {"x": 194, "y": 1.75}], x_label="x", y_label="y")
    assert ">50<" in svg and ">1.2<" in svg and "25.9" not in svg
    assert "no episode return yet" in render_svg_curve([], x_label="env steps", y_label="episode return")
    assert "No metrics yet" in render_page([])
    assert "&lt;b&gt;" in render_page(
        [
            {  # run ids are escaped
                "run_id": "<b>",
                "kind": "train",
                "status": "running",
                "error": None,
                "updated": time.time(),
                "first_seen": time.time(),
                "step": 1,
                "summary": {},
                "learners": {},
                "env_runners": {},
                "history": [],
                "x_label": "x",
                "y_label": "y",
                "folded": False,
            }
        ]
    )


# ------------------------------------------------------------------------------ in a browser
class Chromium:
    """Headless Chromium driven over the DevTools protocol (tornado's websocket client)."""

    def __init__(self, executable: str, width: int = 1400, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="dlearner-chromium-")
        self.proc = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = ""
        while "DevTools listening on" not in line:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("chromium exited before it listened for DevTools")
        self.port = line.rsplit(":", 1)[1].split("/")[0]
        self._id = 0

    async def open(self, url: str) -> None:
        from tornado.websocket import websocket_connect

        targets = json.loads(get(f"http://127.0.0.1:{self.port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        self.conn = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 * 2**20)
        await self.call("Page.navigate", url=url)

    async def call(self, method: str, **params) -> dict:
        self._id += 1
        await self.conn.write_message(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.conn.read_message())
            if message.get("id") == self._id:
                return message.get("result", {})

    async def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
            value = result.get("result", {}).get("value")
            if value:
                return value
            await asyncio.sleep(0.2)
        raise AssertionError(f"in the browser, never true: {expression}")

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


@needs_chromium
def test_page_in_a_real_browser_has_the_nav_link_and_draws_the_curve(client):
    url = register_dashboard(client)
    publish_status(client, "browser-run", "running", wait=True)
    for i in range(1, 6):
        publish_metrics(client, "browser-run", train_result(i, 5.0 * i), wait=True)
    browser = Chromium(CHROMIUM)
    try:

        async def check() -> int:
            # This run's page: the whole page also draws every run the module's other tests published.
            await browser.open(f"{url}?run=browser-run")
            assert await browser.wait_for("!!document.querySelector('.navbar a[href=\"dlearner\"]')")
            # The curve's data arrived in the browser and Bokeh drew its plot (a canvas with pixels).
            points = await browser.wait_for(
                "(() => { const d = window.Bokeh && Bokeh.documents[0]; if (!d) return 0;"
                " const s = d.get_model_by_name('return-source-browser-run'); if (!s) return 0;"
                " return s.data.x.length; })()"
            )
            publish_metrics(client, "browser-run", train_result(6, 30.0))  # it updates live
            await browser.wait_for("Bokeh.documents[0].get_model_by_name('return-source-browser-run').data.x.length == 6")
            png = await browser.screenshot()
            assert len(png) > 10_000  # a drawn page, not a blank one
            return points

        assert asyncio.run(check()) == 5
    finally:
        browser.close()


def test_scheduler_preload_serves_the_page_from_the_start(tmp_path):
    beside_python = Path(sys.executable).with_name("dask")
    dask_cli = str(beside_python) if beside_python.is_file() else shutil.which("dask")
    assert dask_cli is not None, "the `dask` command is needed"
    scheduler_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [
            dask_cli,
            "scheduler",
            "--scheduler-file",
            str(scheduler_file),
            "--port",
            "0",
            "--dashboard-address",
            ":0",
            "--preload",
            "dlearner.dashboard",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() or not scheduler_file.read_text().strip():
            assert proc.poll() is None, "the scheduler exited"
            assert time.monotonic() < deadline, "no scheduler file after 60 s"
            time.sleep(0.1)
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            url = client.dashboard_link.replace("/status", "/dlearner")
            assert 'id="myTopnav"' in get(url)  # the Bokeh page, before any client registered anything
            assert (
                client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins["dlearner-dashboard"].served_by) == "bokeh"
            )
            publish_metrics(client, "preloaded", train_result(1, 5.0), wait=True)
            assert wait_for(url, "preloaded", step=1)["env_runners"]["episode_return_mean"] == 5.0
            assert register_dashboard(client) == url  # registering again keeps the preloaded plugin
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_each_env_runner_actor_has_its_own_row_with_throughput_episodes_and_policy_lag():
    store = MetricsStore()
    store.add(
        {
            "run_id": "appo",
            "kind": "status",
            "status": "running",
            "time": 10.0,
            "env_runner_keys": ("env-runner-0-x", "env-runner-1-x"),
        }
    )  # Dask's events decode lists as tuples
    store.add(
        {
            "run_id": "appo",
            "kind": "train",
            "time": 11.0,
            "result": {
                "training_iteration": 1,
                "num_env_steps_sampled_lifetime": 800,
                "env_runners": {
                    "runners": {
                        "1": {"env_steps_per_s": 900.0, "num_episodes_lifetime": 12},
                        "2": {"env_steps_per_s": 700.0, "num_episodes_lifetime": 9},
                    }
                },
                "policy_lag_mean_by_runner": {"1": 1.5, "2": 2.0},
            },
        },
        received=11.0,
    )
    (run,) = store.to_json(now=12.0)["runs"]
    rows = run["env_runner_actors"]
    assert [(r["index"], r["env_steps_per_s"], r["episodes"], r["policy_lag_mean"]) for r in rows] == [
        (0, 900.0, 12, 1.5),
        (1, 700.0, 9, 2.0),
    ]
    assert "policy lag" in env_runners_table(run) and "900" in env_runners_table(run)

    # A runner that delivered nothing in the latest iteration keeps its row, with how old it is.
    store.add(
        {
            "run_id": "appo",
            "kind": "train",
            "time": 12.0,
            "result": {
                "training_iteration": 2,
                "num_env_steps_sampled_lifetime": 1600,
                "env_runners": {"runners": {"1": {"env_steps_per_s": 950.0, "num_episodes_lifetime": 20}}},
                "policy_lag_mean_by_runner": {"1": 1.0},
            },
        },
        received=12.0,
    )
    (run,) = store.to_json(now=13.0)["runs"]
    rows = run["env_runner_actors"]
    assert [(r["env_steps_per_s"], r["episodes"], r["policy_lag_mean"], r["figures_iteration"]) for r in rows] == [
        (950.0, 20, 1.0, 2),
        (700.0, 9, 2.0, 1),
    ]
    table_html = env_runners_table(run)
    assert "iteration 2 (latest)" in table_html and "iteration 1 (1 earlier)" in table_html and "700" in table_html


class GoneActors:
    """A scheduler on which every actor is gone and every driver disconnected (a run after stop())."""

    def client_connected(self, client_id):
        return False

    def actor(self, key):
        return None


def test_a_stopped_run_is_not_painted_as_a_failure_and_says_its_health_is_of_the_last_iteration():
    assert STATUS_COLORS["stopped"] != STATUS_COLORS["failed"] and STATUS_COLORS["finished"] != STATUS_COLORS["failed"]
    store = MetricsStore()
    store.add({"run_id": "r", "kind": "status", "status": "running", "time": 1.0, "env_runner_keys": ["env-runner-0-x"]})
    result = {**train_result(3, 1.0), "num_healthy_learners": 2, "num_healthy_env_runners": 1}
    store.add({"run_id": "r", "kind": "train", "time": 2.0, "result": result}, received=2.0)
    store.add_timing({"group": "g", "rank": 0, "learner": "learner-0", "update_s": 0.1, "world_size": 1}, received=2.0)
    store.add({"run_id": "r", "kind": "status", "status": "stopped", "time": 3.0, "error": "SIGTERM", "learner_groups": ["g"]})
    (run,) = store.to_json(liveness=GoneActors(), now=4.0)["runs"]
    assert run["status"] == "stopped"
    page = summary_table(run) + env_runners_table(run) + learner_ranks_table(run)
    assert "num_healthy_learners (at iteration 3)" in page and "healthy env runners (at iteration 3)" in page
    assert "gone" not in page and page.count("run ended") == 2  # the learner's row and the env runner's


def test_the_plain_page_draws_losses_and_throughput_too_with_legends_below_the_plots():
    store = MetricsStore()
    for i in (1, 2, 3):
        result = {**train_result(i, 10.0 * i), "num_env_steps_trained_throughput": 24000.0}
        store.add({"run_id": "r", "kind": "train", "time": float(i), "result": result}, received=float(i))
    html = render_page(store.to_json()["runs"])
    for text in (
        "losses (mean over modules)",
        "throughput (env steps/s)",
        ">total_loss<",
        ">policy_loss<",
        ">sampled<",
        ">trained<",
    ):
        assert text in html, text
    assert html.count("<polyline") == 5  # return; total and policy loss; sampled and trained
    assert html.count("class='chart'") == 3 and "viewBox=" in html  # charts scale down with the window


async def legends_and_frames(browser: "Chromium", run_id: str) -> list:
    """``[figure name, plot frame box, [legend boxes]]`` of each visible figure of ``run_id``'s section, as drawn."""
    result = await browser.call(
        "Runtime.evaluate",
        returnByValue=True,
        expression="""(() => {
          const views = [];
          const walk = (v) => { views.push(v); for (const c of (v.child_views ?? [])) walk(c); };
          for (const v of Bokeh.index) walk(v);
          const box = (b) => [b.left, b.top, b.right, b.bottom];
          return views.filter((v) => v.frame !== undefined && v.model.visible).map((v) => [
            v.model.name, box(v.frame.bbox),
            [...v.renderer_views.values()].filter((r) => r.model.type == "Legend").map((r) => box(r.bbox)),
          ]);
        })()""",
    )
    return result["result"]["value"]


def overlaps(a: list, b: list) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@needs_chromium
def test_the_plain_page_fits_a_narrow_window(tmp_path):
    store = MetricsStore()
    store.add({"run_id": "a-run-with-a-long-name-" + "x" * 40, "kind": "status", "status": "running", "time": 1.0})
    for i in (1, 2, 3):
        result = {**train_result(i, 10.0 * i), "policy_lag_mean": 1.5, "num_env_steps_trained_throughput": 24000.0}
        store.add({"run_id": "a-run-with-a-long-name-" + "x" * 40, "kind": "train", "time": 2.0, "result": result})
    page = tmp_path / "page.html"
    page.write_text(render_page(store.to_json()["runs"]))
    browser = Chromium(CHROMIUM, width=700, height=900)
    try:

        async def check() -> list:
            await browser.open(page.as_uri())
            await browser.wait_for("document.querySelectorAll('svg.chart').length == 3")
            return await browser.wait_for(
                "[document.documentElement.scrollWidth, window.innerWidth,"
                " Math.max(...[...document.querySelectorAll('svg.chart')].map((e) => e.getBoundingClientRect().right))]"
            )

        scroll_width, window_width, rightmost_chart = asyncio.run(check())
    finally:
        browser.close()
    assert scroll_width <= window_width and rightmost_chart <= window_width


@needs_chromium
def test_an_open_page_says_disconnected_when_its_cluster_goes_away():
    cluster = LocalCluster(n_workers=0, dashboard_address=":0")
    client = Client(cluster)
    browser = Chromium(CHROMIUM)
    try:
        url = register_dashboard(client)
        publish_metrics(client, "short-lived", train_result(1, 1.0), wait=True)

        def close_the_cluster() -> None:  # as an embedded cluster closes when `dlearner train` ends
            client.close()
            cluster.close()

        async def check() -> str:
            await browser.open(url)
            source = "Bokeh.documents[0].get_model_by_name('return-source-short-lived')"
            await browser.wait_for(f"!!(window.Bokeh && Bokeh.documents[0] && {source})")
            assert not await browser.evaluate(f"!!document.getElementById('{DISCONNECTED_ID}')")
            await asyncio.to_thread(close_the_cluster)
            return await browser.wait_for(f"document.getElementById('{DISCONNECTED_ID}')?.textContent")

        banner = asyncio.run(check())
    finally:
        browser.close()
        client.close()
        cluster.close()
    assert "disconnected" in banner and "metrics.jsonl" in banner


@needs_chromium
def test_an_appo_run_in_a_real_browser_shows_true_throughputs_legends_beside_the_plots_and_every_runner(client, tmp_path):
    url = register_dashboard(client)
    config = (
        APPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=2, num_envs_per_env_runner=2)
        .learners(num_learners=1)
        .training(rollout_fragment_length=10, train_batch_size=40, min_time_s_per_iteration=None)
        .rl_module(model_config=SMALL)
        .cluster(client=client)
        .debugging(seed=0)
    )
    run_id = "appo-in-a-browser"
    with config.build_algo() as algo:
        algo.dashboard_run_name = run_id
        results = []
        for iteration in range(1, 9):
            results.append(algo.train())
            if iteration % 3 == 0:  # checkpoints, as `dlearner train --checkpoint-every` writes them
                algo.save_to_path(tmp_path / f"checkpoint-{iteration}")
        wait_for(url, run_id, step=len(results))
        browser = Chromium(CHROMIUM)
        try:

            async def look() -> tuple:
                await browser.open(f"{url}?run={run_id}")
                source = f"Bokeh.documents[0].get_model_by_name('throughput-source-{run_id}')"
                await browser.wait_for(
                    f"window.Bokeh && Bokeh.documents[0] && {source} && {source}.data.step.length == {len(results)}"
                )
                throughput = await browser.wait_for(f"[{source}.data.sampled, {source}.data.trained]")
                rows = await browser.wait_for(
                    f"(() => {{ const div = Bokeh.documents[0].get_model_by_name('tables-{run_id}');"
                    " const doc = new DOMParser().parseFromString(div.text, 'text/html');"
                    " const table = [...doc.querySelectorAll('table')].find((t) => t.rows[0].cells[0].textContent == 'env runner');"
                    " return table && [...table.tBodies[0].rows].map((r) => [...r.cells].map((c) => c.textContent)); })()"
                )
                return throughput, rows, await legends_and_frames(browser, run_id)

            (sampled, trained), rows, figures = asyncio.run(look())
        finally:
            browser.close()
    for result in results:  # what the file and the progress line get
        assert 0 < result["env_steps_per_s"] < PHYSICAL_BOUND_STEPS_PER_S
        assert 0 < result["num_env_steps_trained_throughput"] < PHYSICAL_BOUND_STEPS_PER_S
    # What a person sees: every throughput the page drew is within physical bounds ...
    assert len(sampled) == len(trained) == len(results)
    assert all(0 < value < PHYSICAL_BOUND_STEPS_PER_S for value in sampled + trained), (sampled, trained)
    # ... every env runner's row has figures ...
    assert len(rows) == 2, rows
    header = ["env runner", "worker", "health", "restarts", "env steps/s", "episodes", "policy lag", "figures as of"]
    for row in rows:
        figures_of = dict(zip(header, row))
        assert figures_of["health"] == "healthy" and figures_of["figures as of"].startswith("iteration"), row
        assert float(figures_of["env steps/s"].replace(",", "")) > 0, row
    # ... and no legend sits on a plot area.
    with_legends = [f for f in figures if f[2]]
    assert len(with_legends) >= 2, figures  # losses and throughput (the timing chart once a learner timed)
    for name, frame, legends in with_legends:
        assert frame[2] > frame[0] and frame[3] > frame[1], (name, frame)
        for legend in legends:
            assert not overlaps(frame, legend), (name, frame, legend)
