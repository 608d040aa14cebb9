"""Fault tolerance: learners and env runners whose worker processes are killed (real SIGKILLs).

With ``config.fault_tolerance(restart_failed_learners=True)`` a lost learner is replaced, the
process group re-forms and the interrupted update is retried once, so training goes on exactly as
if nothing had happened; with too few workers the group goes on with fewer learners and grows back
when workers join. Env runners are replaced the same way. Without fault tolerance, losses are
errors that say what to do.
"""

from __future__ import annotations

import logging
import threading
import time

import dask
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

from dlearner import PPOConfig
from dlearner.errors import EnvRunnerDiedError

SPACES = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def client():
    # Three worker processes: two learners and a spare. A killed worker is restarted by its nanny.
    with killable_cluster(3) as client:
        yield client


def ft_config(client, **fault_tolerance):
    # Generous bounds: a restarted worker imports torch and dlearner first, slowly on a loaded machine.
    settings = dict(restart_failed_learners=True, learner_restart_timeout_s=60)
    settings.update(fault_tolerance)
    return (
        PPOConfig()
        .learners(num_learners=2, learner_startup_timeout_s=60)
        .training(minibatch_size=32, num_epochs=2, learner_class=SleepyPPOLearner)
        .rl_module(model_config={"fcnet_hiddens": [16, 16]})
        .fault_tolerance(**settings)
        .cluster(client=client)
        .debugging(seed=11)
    )


BATCHES = [ppo_batch(96, seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def uninterrupted(client):
    """The weights after the three updates with no loss: what every recovery must end at."""
    with ft_config(client).build_learner_group(spaces=SPACES) as group:
        for batch in BATCHES:
            group.update(batch)
        return identical_weights(group)


def test_a_learner_killed_between_updates_is_replaced_and_training_goes_on_identically(client, uninterrupted):
    with ft_config(client).build_learner_group(spaces=SPACES) as group:
        group.update(BATCHES[0])
        lost = group.learner_workers[1]
        kill_worker(client, lost)
        group.update(BATCHES[1])
        group.update(BATCHES[2])
        assert group.num_learner_restarts == 1
        assert group.num_healthy_learners == 2 and len(group.learner_workers) == 2
        assert lost not in group.learner_workers
        assert_close_weights(identical_weights(group), uninterrupted)
    wait_for_workers(client, 3)


def test_a_learner_killed_during_an_update_makes_the_update_retry_once(client, uninterrupted):
    with ft_config(client).build_learner_group(spaces=SPACES) as group:
        group.update(BATCHES[0])
        killer = threading.Timer(0.5, kill_worker, (client, group.learner_workers[0]))  # rank 0: the store's host too
        killer.start()
        result = group.update(BATCHES[1], timesteps={"sleep_s": 2})
        killer.join()
        assert result["__all_modules__"]["num_env_steps_trained"] == 96 * 2  # one update, not two
        group.update(BATCHES[2])
        assert group.num_learner_restarts == 1
        assert_close_weights(identical_weights(group), uninterrupted)
    wait_for_workers(client, 3)


def test_without_a_free_worker_the_group_goes_on_with_fewer_learners_and_grows_back(uninterrupted):
    # Exactly two workers: a killed learner has no replacement until its nanny restarts the worker.
    with killable_cluster(2) as client, dask.config.set({"dlearner.learner-group.grow-back-interval": "0.5s"}):
        with ft_config(client, learner_restart_timeout_s=0).build_learner_group(spaces=SPACES) as group:
            group.update(BATCHES[0])
            kill_worker(client, group.learner_workers[1])
            group.update(BATCHES[1])  # batch sizes are global: the same update on one learner
            assert group.num_healthy_learners == 1 and len(group.learner_workers) == 1
            wait_for_workers(client, 2)
            time.sleep(1.0)
            group.update(BATCHES[2])  # a worker joined: back to two learners first
            assert group.num_healthy_learners == 2 and group.num_learner_restarts == 1
            assert_close_weights(identical_weights(group), uninterrupted)


def test_without_fault_tolerance_a_lost_learner_is_an_error_that_says_what_to_do(client):
    config = ft_config(client, restart_failed_learners=False)
    with config.build_learner_group(spaces=SPACES) as group:
        group.update(BATCHES[0])
        kill_worker(client, group.learner_workers[1])
        with pytest.raises(Exception, match="fault_tolerance\\(restart_failed_learners=True\\)"):
            group.update(BATCHES[1])
    wait_for_workers(client, 3)


def env_runner_worker(algo):
    return algo.env_runner_group.workers[0]


def test_a_lost_env_runner_is_replaced_and_its_lost_samples_are_counted(client, caplog):
    algo = ppo_algo_config(client, restart_failed_env_runners=True).build_algo()
    try:
        algo.train()
        kill_worker(client, env_runner_worker(algo))
        with caplog.at_level(logging.WARNING, logger="dlearner"):
            result = algo.train()
        assert result["num_env_runner_restarts"] == 1
        assert result["num_healthy_env_runners"] == 1
        assert result["num_env_steps_lost"] == 200
        assert result["num_env_steps_sampled_lifetime"] >= 400
    finally:
        algo.stop()
    # The log says what happens: a replacement, not the advice for a run without fault tolerance.
    said = [record.getMessage() for record in caplog.records if "Env runner 0" in record.getMessage()]
    assert any("is gone" in line and "A new env runner replaces it" in line for line in said), said
    assert any("replaces the lost" in line for line in said), said
    assert not any("cannot go on" in line or "enable config.fault_tolerance" in line for line in said), said
    wait_for_workers(client, 3)


def test_without_restarts_a_lost_env_runner_is_named_and_stop_still_releases_everything(client):
    def actors_of_this_run(dask_scheduler, names):
        """Actor tasks the scheduler still has whose key names this run's learner group or env runners."""
        return sorted(
            str(key) for key, task in dask_scheduler.tasks.items() if task.actor and any(name in str(key) for name in names)
        )

    algo = ppo_algo_config(client).build_algo()
    names = (algo.learner_group.group_id, algo.env_runner_group.run_id)
    try:
        algo.train()
        assert any(key.startswith("learner-") for key in client.run_on_scheduler(actors_of_this_run, names=names))
        kill_worker(client, env_runner_worker(algo))
        with pytest.raises(EnvRunnerDiedError, match=r"Env runner 0 .* is gone.*--resume"):
            algo.train()
    finally:
        algo.stop()  # must not raise, and must release the learner actors
    assert client.status == "running"
    wait_for_workers(client, 3)
    # The scheduler forgets released actors shortly after stop() (the release travels asynchronously).
    deadline = time.monotonic() + 30
    while left := client.run_on_scheduler(actors_of_this_run, names=names):
        assert time.monotonic() < deadline, f"algo.stop() left these actors on the scheduler: {left}"
        time.sleep(0.1)


def test_without_fault_tolerance_every_update_async_future_in_flight_fails_within_seconds(client):
    config = ft_config(client, restart_failed_learners=False)
    with config.build_learner_group(spaces=SPACES) as group:
        futures = [group.update_async(BATCHES[0], timesteps={"sleep_s": 1}) for _ in range(3)]
        time.sleep(0.3)
        kill_worker(client, group.learner_workers[1])
        started = time.monotonic()
        for future in futures:
            with pytest.raises(Exception, match="rank 1"):
                future.result(timeout=60)
        assert time.monotonic() - started < 20  # event-driven: seconds even on a loaded machine, not the 60 s above
    wait_for_workers(client, 3)


def test_a_lost_env_runner_of_an_asynchronous_algorithm_is_replaced_while_sampling_goes_on(client):
    from dlearner import APPOConfig

    config = (
        APPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=1)
        .learners(num_learners=1, learner_startup_timeout_s=60)
        .rl_module(model_config={"fcnet_hiddens": [16, 16]})
        .training(min_time_s_per_iteration=None)
        .fault_tolerance(restart_failed_env_runners=True)
        .cluster(client=client)
    )
    algo = config.build_algo()
    try:
        algo.train()
        kill_worker(client, env_runner_worker(algo))
        result = algo.train()
        result = algo.train()
        assert result["num_env_runner_restarts"] == 1 and result["num_healthy_env_runners"] == 1
        assert result["num_env_steps_lost"] > 0
    finally:
        algo.stop()
    wait_for_workers(client, 3)


# -------------------------------------------------------------------------------- multi-agent
def test_a_multi_agent_run_with_env_runner_actors_survives_lost_env_runners_and_learners(client):
    from dlearner.envs import MultiAgentCartPole

    config = (
        ppo_algo_config(client, num_learners=2, restart_failed_env_runners=True, restart_failed_learners=True)
        .environment(MultiAgentCartPole, env_config={"num_agents": 2})
        .multi_agent(policy_mapping_fn="per-agent")
        .fault_tolerance(learner_restart_timeout_s=60)
    )
    with config.build_algo() as algo:
        algo.train()
        kill_worker(client, env_runner_worker(algo))
        result = algo.train()
        assert result["num_env_runner_restarts"] == 1
        kill_worker(client, algo.learner_group.learner_workers[1])
        result = algo.train()
        assert result["num_learner_restarts"] == 1
        assert {"agent_0", "agent_1"} <= set(result["learners"])
        assert result["env_runners"]["module_episode_returns_mean"].keys() == {"agent_0", "agent_1"}
        identical_weights(algo.learner_group)
    wait_for_workers(client, 3)


def test_two_learners_train_several_modules_exactly_as_one(client):
    """Batch sizes are global: modules with uneven row counts, sharded over two learners, end where one
    learner ends (so a multi-agent run's curve does not depend on num_learners)."""
    from dlearner import LearnerGroup, MultiRLModuleSpec, RLModuleSpec

    specs = MultiRLModuleSpec(
        rl_module_specs={m: RLModuleSpec(observation_space=SPACES[0], action_space=SPACES[1]) for m in ("p0", "p1")}
    )
    batch = {"p0": ppo_batch(96, seed=1), "p1": ppo_batch(62, seed=2)}
    weights = []
    for num_learners in (0, 2):
        config = ft_config(client).learners(num_learners=num_learners).training(learner_class=None, minibatch_size=None)
        with LearnerGroup(config=config, module_spec=specs) as group:
            group.update(batch)
            weights.append(identical_weights(group) if num_learners else group.get_weights())
    assert_close_weights(weights[1], weights[0])


def test_sac_survives_lost_env_runners_and_learners_with_identical_replay_buffers(client):
    from dlearner import SACConfig

    config = (
        SACConfig()
        .environment("Pendulum-v1")
        .env_runners(num_env_runners=1)
        .learners(num_learners=2, learner_startup_timeout_s=60)
        .rl_module(model_config={"fcnet_hiddens": [16, 16]})
        .training(
            num_steps_sampled_before_learning_starts=100,
            min_sample_timesteps_per_iteration=200,
            train_batch_size=64,
            replay_buffer_config={"type": "prioritized", "capacity": 10_000},
        )
        .fault_tolerance(restart_failed_env_runners=True, restart_failed_learners=True, learner_restart_timeout_s=60)
        .cluster(client=client)
        .debugging(seed=5)
    )
    with config.build_algo() as algo:
        algo.train()
        kill_worker(client, env_runner_worker(algo))
        result = algo.train()
        assert result["num_env_runner_restarts"] == 1
        kill_worker(client, algo.learner_group.learner_workers[1])
        # The group knows the learner is gone before the next call: the call replaces it (it once raised).
        deadline = time.monotonic() + 30
        while algo.learner_group.num_healthy_learners != 1:
            assert time.monotonic() < deadline, "the group did not notice its lost learner"
            time.sleep(0.05)
        result = algo.train()
        assert result["num_learner_restarts"] == 1
        assert result["replay_buffer_size"] == result["num_env_steps_sampled_lifetime"]  # every delivered step, once
        # The replacement learner got the survivor's buffer: every learner samples the same batches.
        buffers = algo.learner_group.foreach_learner(lambda learner: learner.replay_buffer.get_state())
        for name, value in buffers[0].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(buffers[1][name], value, err_msg=name)
        identical_weights(algo.learner_group)
    wait_for_workers(client, 3)
