"""Async updates survive a lost learner (real SIGKILLs of worker processes).

With ``config.fault_tolerance(restart_failed_learners=True)``, updates sent with ``update_async`` or
``update(async_update=True)`` that a lost learner interrupts are retried once, in submission order,
on the re-formed group: every future resolves, and every learner ends equal to one uninterrupted
run of the same updates. IMPALA and APPO train through those futures, so a lost learner costs an
asynchronous run some time, never the run. What was restarted and lost survives a checkpoint restore.
"""

from __future__ import annotations

import threading
import time

import gymnasium as gym
import numpy as np
import pytest
from conftest import (
    SleepyPPOLearner,
    assert_close_weights,
    identical_weights,
    kill_worker,
    killable_cluster,
    ppo_algo_config,
    ppo_batch,
    wait_for_workers,
)

from dlearner import ALL_MODULES, APPOConfig, PPOConfig
from dlearner.algorithm import Algorithm
from dlearner.checkpoint.inspect import read_metadata
from dlearner.errors import LearnerGroupError

SPACES = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))
FAULT_COUNTERS = ("num_learner_restarts", "num_env_runner_restarts", "num_env_steps_lost")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def client():
    # Four worker processes: two learners, an env runner and a spare. A killed worker is restarted by its nanny.
    with killable_cluster(4) as client:
        yield client


def group_config(client):
    return (
        PPOConfig()
        .learners(num_learners=2, learner_startup_timeout_s=60)
        .training(minibatch_size=32, num_epochs=2, learner_class=SleepyPPOLearner)
        .rl_module(model_config={"fcnet_hiddens": [16, 16]})
        .fault_tolerance(restart_failed_learners=True, learner_restart_timeout_s=60)
        .cluster(client=client)
        .debugging(seed=11)
    )


BATCHES = [ppo_batch(96, seed=i) for i in range(3)]
ROWS_TRAINED = 96 * 2  # one update of two epochs: applied once, never twice


@pytest.fixture(scope="module")
def uninterrupted(client):
    """The weights after the three updates with no loss: what every recovery must end at."""
    with group_config(client).build_learner_group(spaces=SPACES) as group:
        for batch in BATCHES:
            group.update(batch)
        return identical_weights(group)


def test_update_async_futures_in_flight_when_a_learner_is_killed_all_resolve_as_if_nothing_happened(client, uninterrupted):
    with group_config(client).build_learner_group(spaces=SPACES) as group:
        group.update(BATCHES[0])
        lost = group.learner_workers[1]
        futures = [group.update_async(BATCHES[1], timesteps={"sleep_s": 2})]
        killer = threading.Timer(0.5, kill_worker, (client, lost))  # in the first update's sleep
        killer.start()
        futures.append(group.update_async(BATCHES[2], timesteps={"sleep_s": 2}))
        results = [future.result(timeout=180) for future in futures]
        killer.join()
        assert [r[ALL_MODULES]["num_env_steps_trained"] for r in results] == [ROWS_TRAINED] * 2
        assert group.num_updates_retried >= 1
        assert group.num_learner_restarts == 1 and group.num_healthy_learners == 2
        assert lost not in group.learner_workers
        assert_close_weights(identical_weights(group), uninterrupted)
    wait_for_workers(client, 4)


def test_async_update_results_in_flight_when_rank_0_is_killed_are_all_reported_as_if_nothing_happened(client, uninterrupted):
    with group_config(client).build_learner_group(spaces=SPACES) as group:
        group.update(BATCHES[0])
        results = group.update(BATCHES[1], async_update=True, timesteps={"sleep_s": 2})
        # Rank 0: the process group's store host, and the rank whose result is reported.
        killer = threading.Timer(0.5, kill_worker, (client, group.learner_workers[0]))  # in the first update's sleep
        killer.start()
        results += group.update(BATCHES[2], async_update=True, timesteps={"sleep_s": 2})
        results += group.drain_async_results()
        killer.join()
        assert [r[ALL_MODULES]["num_env_steps_trained"] for r in results] == [ROWS_TRAINED] * 2
        assert group.num_updates_retried >= 1
        assert group.num_learner_restarts == 1 and group.num_healthy_learners == 2
        assert_close_weights(identical_weights(group), uninterrupted)
    wait_for_workers(client, 4)


def actors_of(dask_scheduler, names):
    """Actor tasks the scheduler still has whose key names one of ``names``."""
    return sorted(str(key) for key, task in dask_scheduler.tasks.items() if task.actor and any(n in str(key) for n in names))


def assert_actors_released(client, names, timeout=30):
    # The scheduler forgets released actors shortly after (the release travels asynchronously).
    deadline = time.monotonic() + timeout
    while left := client.run_on_scheduler(actors_of, names=names):
        assert time.monotonic() < deadline, f"these actors were never released: {left}"
        time.sleep(0.1)


def test_a_shutdown_while_a_lost_learner_is_replaced_ends_every_future_and_releases_every_actor(client):
    group = group_config(client).build_learner_group(spaces=SPACES)
    group.update(BATCHES[0])
    futures = [group.update_async(batch, timesteps={"sleep_s": 1}) for batch in BATCHES[1:]]
    time.sleep(0.3)
    kill_worker(client, group.learner_workers[1])
    started = time.monotonic()
    group.shutdown()
    assert time.monotonic() - started < 60
    for future in futures:
        try:
            # Retried before the shutdown, or ended by it: never left waiting.
            assert future.result(timeout=60)[ALL_MODULES]["num_env_steps_trained"] == ROWS_TRAINED
        except LearnerGroupError as err:
            assert "shut down" in str(err)
    assert_actors_released(client, [group.group_id])
    wait_for_workers(client, 4)


def appo_config(client):
    return (
        APPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=1, num_envs_per_env_runner=2)
        .learners(num_learners=2, learner_startup_timeout_s=60)
        .training(rollout_fragment_length=10, train_batch_size=40, min_time_s_per_iteration=None)
        .rl_module(model_config={"fcnet_hiddens": [16, 16]})
        .fault_tolerance(restart_failed_learners=True, restart_failed_env_runners=True, learner_restart_timeout_s=60)
        .cluster(client=client)
        .debugging(seed=3)
    )


def test_appo_training_goes_on_when_a_learner_is_killed_during_training(client):
    algo = appo_config(client).build_algo()
    names = (algo.learner_group.group_id, algo.env_runner_group.run_id)
    try:
        for _ in range(3):
            before = algo.train()
        lost = algo.learner_group.learner_workers[1]
        kill_worker(client, lost)  # updates and sample requests stay in flight between iterations
        results = [algo.train() for _ in range(4)]
        last = results[-1]
        assert last["num_learner_restarts"] == 1 and last["num_healthy_learners"] == 2
        assert lost not in algo.learner_group.learner_workers
        assert last["num_env_steps_trained_lifetime"] > before["num_env_steps_trained_lifetime"]
        assert all(r["num_learner_updates"] >= 1 for r in results)
        identical_weights(algo.learner_group)
    finally:
        algo.stop()
    assert_actors_released(client, names)
    wait_for_workers(client, 4)


def test_restart_counters_and_lost_env_steps_go_on_after_a_restore(client, tmp_path):
    config = ppo_algo_config(
        client, num_learners=2, restart_failed_learners=True, restart_failed_env_runners=True, learner_restart_timeout_s=60
    )
    algo = config.build_algo()
    try:
        algo.train()
        kill_worker(client, algo.env_runner_group.workers[0])
        algo.train()
        wait_for_workers(client, 4)
        kill_worker(client, algo.learner_group.learner_workers[1])  # last: its replacement may share a worker
        saved = algo.train()
        assert saved["num_learner_restarts"] == 1 and saved["num_env_runner_restarts"] == 1
        assert saved["num_env_steps_lost"] > 0
        algo.save_to_path(tmp_path / "run")
    finally:
        algo.stop()
    wait_for_workers(client, 4)
    restored = config.build_algo()
    try:
        restored.restore_from_path(tmp_path / "run")
        result = restored.train()
    finally:
        restored.stop()
    assert result["training_iteration"] == saved["training_iteration"] + 1
    assert {name: result[name] for name in FAULT_COUNTERS} == {name: saved[name] for name in FAULT_COUNTERS}


def test_a_checkpoint_written_before_restarts_were_saved_restores_with_none_counted(tmp_path, monkeypatch):
    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .training(train_batch_size=64, minibatch_size=32, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": [16, 16]})
    )
    with config.build_algo() as algo:
        algo.train()
        current = Algorithm.get_counters
        # What an older dlearner wrote: the counters without the fault-tolerance ones.
        monkeypatch.setattr(
            Algorithm, "get_counters", lambda self: {k: v for k, v in current(self).items() if k not in FAULT_COUNTERS}
        )
        algo.save_to_path(tmp_path / "old")
        monkeypatch.undo()
    assert not set(FAULT_COUNTERS) & set(read_metadata(tmp_path / "old")["algorithm_state"])
    with config.build_algo() as restored:
        restored.restore_from_path(tmp_path / "old")
        result = restored.train()
    assert result["training_iteration"] == 2
    assert [result[name] for name in FAULT_COUNTERS] == [0, 0, 0]
