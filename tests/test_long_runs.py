"""What a long run keeps stays the same size however many updates it makes (issue 22).

Things that grew with every update of a long run: the scheduler's spans and task groups (one more
per ``update_async`` task once the previous one was forgotten), the profiles that Dask's statistical
profiler keeps in each worker process of the embedded cluster, the hour of system-monitor samples
and the 1,000 entries of each low-level log (events per topic among them) that Dask keeps in every
process, and the dashboard's curve of a learner group that a run claimed (never shown, filled by
every update). Episode windows and the metrics file have bounds of their own, tested with them;
the dashboard's default bound on a run's curve is tested here.
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest
from conftest import SMALL_MODEL, ppo_batch

from dlearner import PPOConfig
from dlearner.backends.dask.cluster import _DASK_LOG_ENTRIES, _SYSTEM_MONITOR_SAMPLES
from dlearner.dashboard.plugin import DashboardPlugin
from dlearner.dashboard.store import GROUP_RUN_PREFIX, MAX_HISTORY, MetricsStore

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


def test_embedded_scheduler_and_workers_keep_a_minute_of_system_monitor_samples(group):
    client = group.client
    assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.monitor.maxlen) == _SYSTEM_MONITOR_SAMPLES
    worker_maxlens = client.run(lambda dask_worker: dask_worker.monitor.maxlen)
    assert len(worker_maxlens) == 2 and set(worker_maxlens.values()) == {_SYSTEM_MONITOR_SAMPLES}


def dask_log_lengths_on_scheduler(dask_scheduler) -> set:
    """Runs on the scheduler: the bounds of its event topics, transition log and connections' logs."""
    streams = [*dask_scheduler.stream_comms.values(), *dask_scheduler.client_comms.values()]
    topic = dask_scheduler._broker._topics["a-new-topic"]  # a topic made now gets the bound too
    return {topic.events.maxlen, dask_scheduler.transition_log.maxlen, *(s.recent_message_log.maxlen for s in streams)}


def dask_log_lengths_on_worker(dask_worker) -> set:
    return {
        dask_worker.state.log.maxlen,
        dask_worker.state.stimulus_log.maxlen,
        dask_worker.batched_stream.recent_message_log.maxlen,
        dask_worker.transfer_outgoing_log.maxlen,
    }


def test_embedded_cluster_keeps_the_last_hundred_entries_of_dasks_logs(group):
    client = group.client
    assert client.run_on_scheduler(dask_log_lengths_on_scheduler) == {_DASK_LOG_ENTRIES}
    assert list(client.run(dask_log_lengths_on_worker).values()) == [{_DASK_LOG_ENTRIES}] * 2
    for i in range(_DASK_LOG_ENTRIES + 20):  # a topic keeps its last entries, e.g. a group's metrics
        client.log_event("many-events", i)
    deadline = time.monotonic() + 20
    while not client.get_events("many-events") or client.get_events("many-events")[-1][1] != _DASK_LOG_ENTRIES + 19:
        assert time.monotonic() < deadline, "the events did not reach the scheduler"
        time.sleep(0.05)
    assert len(client.get_events("many-events")) == _DASK_LOG_ENTRIES


def test_dashboard_keeps_no_curve_for_a_learner_group_its_run_claimed():
    store = MetricsStore(max_history=100)
    store.add_group_result("early", {"m": {"total_loss": 1.0}}, received=1.0)  # before its run said it owns it
    store.add({"run_id": "run", "kind": "status", "status": "running", "time": 2.0, "learner_groups": ["early", "g"]})
    for update in range(500):  # an asynchronous run's group: several updates per iteration
        store.add_group_result("g", {"m": {"total_loss": float(update)}}, received=3.0 + update)
        store.add_group_result("unclaimed", {"m": {"total_loss": float(update)}}, received=3.0 + update)
    assert f"{GROUP_RUN_PREFIX}g" not in store.runs and f"{GROUP_RUN_PREFIX}early" not in store.runs
    assert len(store.runs[f"{GROUP_RUN_PREFIX}unclaimed"].history) <= 100  # a bare group's curve, bounded


def test_dashboard_keeps_at_most_max_history_points_of_a_run_by_default():
    store = MetricsStore()  # the defaults the scheduler's plugin uses
    for iteration in range(1, 2 * MAX_HISTORY + 2):
        result = {"training_iteration": iteration, "env_runners": {"episode_return_mean": float(iteration)}}
        store.add({"run_id": "day-long", "kind": "train", "result": result}, received=float(iteration))
    steps = list(store.runs["day-long"].history)
    assert len(steps) <= MAX_HISTORY
    assert steps[0] == 1 and steps[-1] == 2 * MAX_HISTORY + 1  # the whole run's shape
    assert DashboardPlugin().max_history == MAX_HISTORY
