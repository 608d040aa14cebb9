"""End-to-end training in one process: PPO solves CartPole and learns Pendulum's continuous actions."""

from __future__ import annotations

import logging

import distributed
import numpy as np
import pytest

from dlearner import PPOConfig


def train_until(algo, *, stop_return: float, max_env_steps: int) -> list:
    returns = []
    while True:
        result = algo.train()
        returns.append(result["env_runners"]["episode_return_mean"])
        if returns[-1] >= stop_return or result["num_env_steps_sampled_lifetime"] >= max_env_steps:
            return returns


@pytest.mark.slow
def test_ppo_solves_cartpole_in_one_process():
    config = PPOConfig().environment("CartPole-v1").env_runners(num_env_runners=0, num_envs_per_env_runner=8).debugging(seed=0)
    with config.build_algo() as algo:
        returns = train_until(algo, stop_return=450, max_env_steps=80_000)
        assert returns[-1] >= 450, returns
        assert algo.evaluate(5)["env_runners"]["episode_return_mean"] >= 450


@pytest.mark.slow
def test_ppo_improves_on_pendulum_with_continuous_actions():
    config = (
        PPOConfig()
        .environment("Pendulum-v1")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=8)
        .training(lr=1e-3, gamma=0.95, lambda_=0.9, num_epochs=10, train_batch_size=4000)
        .rl_module(model_config={"fcnet_hiddens": [64, 64]})
        .reporting(metrics_num_episodes_for_smoothing=16)
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        returns = [algo.train()["env_runners"]["episode_return_mean"] for _ in range(15)]
    # A random policy scores about -1200; a clear margin is several hundred better.
    assert np.mean(returns[-2:]) > returns[0] + 300, returns


def test_train_result_has_the_promised_keys():
    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .training(train_batch_size=256, minibatch_size=64, num_epochs=1)
        .rl_module(model_config={"fcnet_hiddens": [16]})
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        result = algo.train()
        assert result["num_env_steps_sampled_lifetime"] >= 256
        assert isinstance(result["env_runners"]["episode_return_mean"], float)
        assert isinstance(result["learners"]["default_policy"]["total_loss"], float)
        assert result["time_this_iter_s"] > 0
        # Each env runner's own figures, keyed by its index ("0": sampling in the driver).
        runner = result["env_runners"]["runners"]["0"]
        assert runner["env_steps_per_s"] > 0 and runner["env_steps_this_iter"] >= 256
        evaluation = algo.evaluate(2)
        assert evaluation["env_runners"]["num_episodes"] == 2


def test_build_algo_without_an_environment_says_what_to_do():
    with pytest.raises(ValueError, match="environment"):
        PPOConfig().build_algo()


@pytest.mark.slow
def test_ppo_solves_cartpole_with_env_runner_and_learner_actors_on_a_local_cluster():
    config = (
        PPOConfig()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=1, num_envs_per_env_runner=8)
        .learners(num_learners=1)
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        cluster_client = algo.client
        assert cluster_client is not None
        actor_keys = [str(k) for k in cluster_client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))]
        assert any("env-runner" in k for k in actor_keys) and any("learner" in k for k in actor_keys)
        returns = train_until(algo, stop_return=450, max_env_steps=80_000)
        assert returns[-1] >= 450, returns
        assert set(algo.train()["env_runners"]["runners"]) == {"1"}  # the one env-runner actor
    assert cluster_client.status == "closed"  # the algorithm's embedded cluster is gone


@pytest.mark.slow
def test_algorithm_checkpoint_continues_counters_and_weights(tmp_path):
    # One cluster of two worker processes for both algorithms, one after the other.
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        config = (
            PPOConfig()
            .environment("CartPole-v1")
            .env_runners(num_env_runners=1, num_envs_per_env_runner=4)
            .learners(num_learners=1)  # the learner actor writes its state straight to the store
            .training(train_batch_size=512, minibatch_size=128, num_epochs=1)
            .rl_module(model_config={"fcnet_hiddens": [16]})
            .cluster(client=client)
            .debugging(seed=0)
        )
        with config.build_algo() as algo:
            algo.train()
            algo.train()
            algo.save_to_path(tmp_path / "run")
            weights = algo.learner_group.get_weights()
        with config.build_algo() as resumed:
            resumed.restore_from_path(tmp_path / "run")
            assert resumed.iteration == 2
            restored = resumed.learner_group.get_weights()
            for name, value in weights["default_policy"].items():
                np.testing.assert_array_equal(restored["default_policy"][name], value)
            result = resumed.train()
            assert result["training_iteration"] == 3
            assert result["num_env_steps_sampled_lifetime"] >= 3 * 512


def test_the_ppo_cartpole_example_runs():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "ppo_cartpole.py"
    spec = importlib.util.spec_from_file_location("ppo_cartpole", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(max_iters=2, stop_return=1e9)
    assert result["training_iteration"] == 2
