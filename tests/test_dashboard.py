"""The dlearner page in the Dask dashboard: a real LocalCluster, real HTTP GETs of its dashboard port."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from dlearner import PPOConfig
from dlearner.dashboard import (
    MetricsStore,
    publish_learner_results,
    publish_metrics,
    register_dashboard,
    render_page,
    render_svg_curve,
)

SMALL = {"fcnet_hiddens": [16, 16]}


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read().decode("utf-8")


def get_json(url: str) -> dict:
    return json.loads(get(url))


def wait_for_run(url: str, run_id: str, *, step: int, timeout: float = 20.0) -> dict:
    """Poll metrics.json until ``run_id`` reached ``step`` (publishing is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = {r["run_id"]: r for r in get_json(url + "/metrics.json")["runs"]}
        if run_id in runs and runs[run_id]["step"] is not None and runs[run_id]["step"] >= step:
            return runs[run_id]
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id!r} did not reach step {step}: {runs.get(run_id)}")
        time.sleep(0.1)


def train_result(iteration: int, ret: float) -> dict:
    return {
        "training_iteration": iteration,
        "num_env_steps_sampled_lifetime": 1000 * iteration,
        "time_this_iter_s": np.float32(0.25),
        "env_runners": {"episode_return_mean": ret, "episode_len_mean": float("nan"), "episode_returns": [1.0, 2.0]},
        "learners": {
            "default_policy": {"total_loss": np.float64(1.0 / iteration), "policy_loss": -0.01},
            "__all_modules__": {"num_env_steps_trained": 6000},
        },
    }


def test_page_serves_published_metrics_from_the_dashboard_port(client):
    # Published before the page is registered: the plugin replays it from the scheduler's event log.
    publish_metrics(client, "early-run", train_result(1, 11.0), wait=True)
    url = register_dashboard(client)
    assert url == client.dashboard_link.replace("/status", "/dlearner")
    assert register_dashboard(client) == url  # idempotent
    assert client.run_on_scheduler(lambda dask_scheduler: "dlearner-dashboard" in dask_scheduler.plugins)

    for i in range(1, 4):
        publish_metrics(client, "run-a", train_result(i, 20.0 * i))  # fire and forget
    publish_metrics(client, "run-a", train_result(3, 60.0))  # the same iteration again replaces it
    publish_learner_results(
        client, "bare-group", {"default_policy": {"total_loss": 0.5}, "__all_modules__": {"num_env_steps_trained": 64}}
    )

    run = wait_for_run(url, "run-a", step=3)
    assert run["learners"]["default_policy"]["total_loss"] == pytest.approx(1 / 3)
    assert run["learners"]["__all_modules__"]["num_env_steps_trained"] == 6000
    assert run["env_runners"]["episode_return_mean"] == 60.0
    assert run["env_runners"]["episode_len_mean"] is None  # NaN -> null
    assert "episode_returns" not in run["env_runners"]  # lists are not metrics
    assert [p["x"] for p in run["history"]] == [1000, 2000, 3000]
    assert [p["y"] for p in run["history"]] == [20.0, 40.0, 60.0]
    assert wait_for_run(url, "early-run", step=1)["env_runners"]["episode_return_mean"] == 11.0
    assert wait_for_run(url, "bare-group", step=1)["learners"]["default_policy"]["total_loss"] == 0.5

    page = get(url)
    for text in ("run-a", "early-run", "bare-group", "total_loss", "policy_loss", "default_policy",
                 "episode_return_mean", "<svg", "<polyline"):
        assert text in page, text
    assert "<script" not in page and "http://cdn" not in page and "https://" not in page  # works offline

    only = get_json(url + "/metrics.json?run=run-a")
    assert [r["run_id"] for r in only["runs"]] == ["run-a"]
    assert "early-run" not in get(url + "?run=run-a")
    with pytest.raises(urllib.error.HTTPError) as err:
        get(url + "/metrics.json?run=no-such-run")
    assert err.value.code == 404
    with urllib.request.urlopen(url + "/", timeout=30) as response:  # trailing slash redirects to the page
        assert response.geturl() == url


def test_training_on_the_cluster_shows_learner_metrics(client):
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
        for _ in range(2):
            result = algo.train()
            publish_metrics(client, "ppo-on-cluster", result)
        group_run = "learner-group-" + algo.learner_group.metrics_topic.rpartition("-")[2]
    run = wait_for_run(url, "ppo-on-cluster", step=2)
    learner = run["learners"]["default_policy"]
    for metric in ("total_loss", "policy_loss", "vf_loss", "entropy", "default_optimizer_learning_rate"):
        assert isinstance(learner[metric], float), metric
    assert learner["total_loss"] == pytest.approx(result["learners"]["default_policy"]["total_loss"])
    assert run["summary"]["num_env_steps_sampled_lifetime"] == result["num_env_steps_sampled_lifetime"]
    assert len(run["history"]) == 2
    # The learner actor's own events (rank 0 logs every update) show up as a run of their own.
    actor_run = wait_for_run(url, group_run, step=2)
    assert "total_loss" in actor_run["learners"]["default_policy"]
    page = get(url)
    assert "ppo-on-cluster" in page and "vf_loss" in page and group_run in page
    assert client.status == "running"  # the cluster we brought stays ours


def test_publish_rejects_bad_arguments(client):
    with pytest.raises(ValueError, match="run_id"):
        publish_metrics(client, "", {})
    with pytest.raises(TypeError, match="result"):
        publish_metrics(client, "run", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        publish_learner_results(client, "run", {}, step=-1)


def test_store_keeps_latest_values_and_orders_late_points():
    store = MetricsStore(max_history=3)
    for i in (1, 3, 2, 4, 5):  # iteration 2 arrives late
        store.add({"run_id": "r", "kind": "train", "result": {
            "training_iteration": i, "num_env_steps_sampled_lifetime": 10 * i,
            "env_runners": {"episode_return_mean": float(i)}, "learners": {"m": {"total_loss": float(i)}},
        }})
    store.add("not a message")  # ignored (logged)
    (run,) = store.to_json()["runs"]
    assert run["step"] == 5 and run["learners"]["m"]["total_loss"] == 5.0
    assert [p["step"] for p in run["history"]] == [3, 4, 5]  # sorted, trimmed to max_history


def test_svg_curve_and_page_render_without_data():
    assert "no episode return yet" in render_svg_curve([], x_label="env steps", y_label="episode return")
    one = render_svg_curve([{"x": 5, "y": 1.0}, {"x": 6, "y": None}], x_label="x", y_label="y")
    assert "<polyline" in one and "<circle" in one
    assert "No metrics yet" in render_page([])
    assert "&lt;b&gt;" in render_page([{  # run ids are escaped
        "run_id": "<b>", "kind": "train", "updated": time.time(), "step": 1, "summary": {}, "learners": {},
        "env_runners": {}, "history": [], "x_label": "x", "y_label": "y",
    }])


def test_scheduler_preload_serves_the_page_from_the_start(tmp_path):
    beside_python = Path(sys.executable).with_name("dask")
    dask_cli = str(beside_python) if beside_python.is_file() else shutil.which("dask")
    assert dask_cli is not None, "the `dask` command is needed"
    scheduler_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [dask_cli, "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0",
         "--dashboard-address", ":0", "--preload", "dlearner.dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() or not scheduler_file.read_text().strip():
            assert proc.poll() is None, "the scheduler exited"
            assert time.monotonic() < deadline, "no scheduler file after 60 s"
            time.sleep(0.1)
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            url = client.dashboard_link.replace("/status", "/dlearner")
            assert "No metrics yet" in get(url)  # served before any client registered anything
            publish_metrics(client, "preloaded", train_result(1, 5.0), wait=True)
            assert wait_for_run(url, "preloaded", step=1)["env_runners"]["episode_return_mean"] == 5.0
            assert register_dashboard(client) == url  # registering again keeps the preloaded plugin
    finally:
        proc.terminate()
        proc.wait(timeout=30)
