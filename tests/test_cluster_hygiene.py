"""A long-lived cluster looks the same after a hundred jobs: learner groups that shut down, and
groups whose driver was killed (a real SIGKILL), leave no thread, socket or actor on the workers."""

from __future__ import annotations

import gc
import logging
import pathlib
import signal
import subprocess
import sys
import time

import distributed
import gymnasium as gym
import numpy as np
import psutil
import pytest
from conftest import SMALL_MODEL, ppo_batch

from dlearner import PPOConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPACES = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def worker_facts(dask_worker):
    gc.collect()
    process = psutil.Process()
    listening = sorted(c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
    return {"threads": process.num_threads(), "listening": listening, "actors": sorted(dask_worker.state.actors)}


def settled_facts(client, timeout=10.0):
    """The workers' facts once Dask has released every actor (shutdown releases them asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        facts = client.run(worker_facts)
        if all(not f["actors"] for f in facts.values()) or time.monotonic() > deadline:
            return facts
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield cluster, client


def group_config():
    return PPOConfig().learners(num_learners=2).rl_module(model_config=SMALL_MODEL)


def test_groups_that_shut_down_leave_the_workers_as_they_found_them(cluster):
    _, client = cluster
    after_each = []
    for _ in range(4):
        with group_config().cluster(client=client).build_learner_group(spaces=SPACES) as group:
            group.update(ppo_batch(32))
        after_each.append(settled_facts(client))
    # The first group may start threads every later one reuses (torch's, Dask's executors); after it,
    # nothing grows.
    assert after_each[-1] == after_each[0]
    assert all(not facts["actors"] for facts in after_each[-1].values())


DRIVER = """
import sys, time
import gymnasium as gym, numpy as np
sys.path.insert(0, {tests!r})
from conftest import SMALL_MODEL, ppo_batch
from dlearner import PPOConfig
spaces = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))
config = PPOConfig().learners(num_learners=2).rl_module(model_config=SMALL_MODEL).cluster(address=sys.argv[1])
group = config.build_learner_group(spaces=spaces)
group.update(ppo_batch(32))
print("trained", flush=True)
time.sleep(600)
"""


def test_a_group_whose_driver_was_killed_is_cleaned_up_by_the_workers(cluster):
    local_cluster, client = cluster
    before = settled_facts(client)
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(tests=str(ROOT / "tests")), local_cluster.scheduler_address],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert driver.stdout.readline().strip() == "trained"
        running = client.run(worker_facts)
        assert all(any("learner" in key for key in facts["actors"]) for facts in running.values())
        assert any(len(running[w]["listening"]) > len(before[w]["listening"]) for w in running)  # store + gloo
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        driver.stdout.close()
    deadline = time.monotonic() + 20
    while True:
        now = client.run(worker_facts)
        clean = all(now[w]["listening"] == before[w]["listening"] and not now[w]["actors"] for w in now)
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert clean, f"listening ports before: {before}, after the driver was killed: {now}"
    # The workers are free for the next job.
    with group_config().cluster(client=client).build_learner_group(spaces=SPACES) as group:
        group.update(ppo_batch(32))
