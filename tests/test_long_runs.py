"""What a long run keeps stays the same size however many updates it makes (issue 22).

Two things in Dask grew with every update of a long run: the scheduler's spans and task groups (one
more per ``update_async`` task once the previous one was forgotten), and the profiles that Dask's
statistical profiler keeps in each worker process of the embedded cluster. The dashboard's curves,
episode windows and metrics file have bounds of their own, tested with them.
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest
from conftest import SMALL_MODEL, ppo_batch

from dlearner import PPOConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SPACES = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))


@pytest.fixture(scope="module")
def group():
    """Two learners on the embedded LocalCluster (no client named: dlearner starts its own)."""
    config = (
        PPOConfig()
        .learners(num_learners=2, learner_startup_timeout_s=60)
        .rl_module(model_config=SMALL_MODEL)
        .training(minibatch_size=32, num_epochs=1)
    )
    with config.build_learner_group(spaces=SPACES) as lg:
        yield lg


def scheduler_spans_and_task_groups(dask_scheduler) -> tuple:
    """Runs on the scheduler: what Dask keeps for the scheduler's life about finished tasks."""
    spans = dask_scheduler.extensions["spans"].spans.values()
    return len(spans), sum(len(span.groups) for span in spans)


def test_update_tasks_add_no_span_or_task_group_however_many_updates(group):
    client = group.client
    batch = ppo_batch(32)
    group.update_async(batch).result()
    before = client.run_on_scheduler(scheduler_spans_and_task_groups)
    for _ in range(4):
        future = group.update_async(batch)
        future.result()
        key = future.key
        del future
        # Forgotten before the next update: without the pool's anchor, the next one started a new span.
        deadline = time.monotonic() + 30
        while key in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks)):
            assert time.monotonic() < deadline, f"the scheduler did not forget {key}"
            time.sleep(0.05)
    assert client.run_on_scheduler(scheduler_spans_and_task_groups) == before


def test_embedded_worker_processes_run_without_dasks_profiler(group):
    profiling = group.client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    assert len(profiling) == 2 and not any(profiling.values())
