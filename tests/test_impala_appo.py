"""IMPALA and APPO: configs, learners, checkpoints, and the asynchronous ``algo.train()`` on Dask actors.

Dask tests share one LocalCluster of worker processes (module fixture); algorithms attach to it
with ``.cluster(client=...)``, so they start actors but never a cluster of their own.
"""

from __future__ import annotations

import logging

import distributed
import gymnasium as gym
import numpy as np
import pytest
from conftest import SMALL_MODEL, ppo_batch

from dlearner import (
    ALL_MODULES,
    APPOConfig,
    Columns,
    IMPALAConfig,
    PPOConfig,
)
from dlearner.checkpoint.store import load_state_tree
from dlearner.env_runner import NEXT_VF_PREDS

SPACES = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))


def fragments_batch(num_fragments=4, length=10, seed=0):
    """Rollout fragments as an env runner makes them, laid out fragment after fragment."""
    rng = np.random.default_rng(seed)
    rows = num_fragments * length
    terminated = rng.random(rows) < 0.05
    return {
        Columns.OBS: rng.normal(size=(rows, 4)).astype(np.float32),
        Columns.ACTIONS: rng.integers(0, 2, rows),
        Columns.ACTION_LOGP: np.log(rng.uniform(0.3, 0.7, rows)).astype(np.float32),
        Columns.REWARDS: np.ones(rows, np.float32),
        Columns.TERMINATEDS: terminated,
        Columns.TRUNCATEDS: np.zeros(rows, bool),
        NEXT_VF_PREDS: np.where(terminated, 0.0, rng.normal(size=rows)).astype(np.float32),
    }


def small(config_class, **training):
    return (
        config_class()
        .environment("CartPole-v1")
        .rl_module(model_config=SMALL_MODEL)
        # Per-batch iterations (not the 5 s default): tests count iterations of a few batches.
        .training(**{"rollout_fragment_length": 10, "train_batch_size": 40, "min_time_s_per_iteration": None, **training})
        .debugging(seed=1)
    )


def leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from leaves(value)
        else:
            yield value


def count_arrays(tree):
    return sum(isinstance(leaf, np.ndarray) for leaf in leaves(tree))


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "setting, value",
    [
        ("tau", -0.5),
        ("tau", 1.5),
        ("target_network_update_freq", 0),
        ("rollout_fragment_length", 0),
        ("broadcast_interval", 0),
        ("learner_queue_size", 0),
        ("vtrace_clip_rho_threshold", -1.0),
        ("vtrace_clip_pg_rho_threshold", 0.0),
        ("clip_param", 0.0),
        ("kl_target", -1.0),
        ("entropy_coeff", -0.1),
        ("min_time_s_per_iteration", -1.0),
    ],
)
def test_bad_settings_raise_naming_them_at_the_fluent_call(setting, value):
    with pytest.raises(ValueError, match=setting):
        APPOConfig().training(**{setting: value})


def test_impala_settings_are_checked_too_and_minibatches_must_be_whole_fragments():
    with pytest.raises(ValueError, match="rollout_fragment_length"):
        IMPALAConfig().env_runners(rollout_fragment_length=-3)
    with pytest.raises(ValueError, match="minibatch_size=25 must be a multiple of rollout_fragment_length=10"):
        small(IMPALAConfig, minibatch_size=25).build_learner(spaces=SPACES)
    with pytest.raises(TypeError):
        IMPALAConfig().training(tau=0.5)  # an APPO setting


@pytest.mark.parametrize("config_class", [IMPALAConfig, APPOConfig])
def test_learners_update_on_fragments_and_hold_numpy_only_state(config_class):
    learner = small(config_class).build_learner(spaces=SPACES)
    learner.build()
    result = learner.update(fragments_batch())
    for name in ("policy_loss", "vf_loss", "entropy", "total_loss", "default_optimizer_learning_rate"):
        assert isinstance(result["default_policy"][name], float)
    assert result[ALL_MODULES]["num_env_steps_trained"] == 40
    for leaf in leaves(learner.get_state()):
        assert isinstance(leaf, (np.ndarray, int, float, str, bool, list, type(None))), type(leaf)


def test_a_batch_of_partial_fragments_is_refused_and_changes_nothing():
    learner = small(IMPALAConfig).build_learner(spaces=SPACES)
    learner.build()
    before = learner.get_state()
    partial = {k: v[:35] for k, v in fragments_batch().items()}
    with pytest.raises(ValueError, match="whole rollout fragments of rollout_fragment_length=10"):
        learner.update(partial)
    after = learner.get_state()
    for a, b in zip(leaves(before), leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_appo_target_network_follows_every_target_network_update_freq_updates():
    learner = small(APPOConfig, target_network_update_freq=2, tau=1.0).build_learner(spaces=SPACES)
    learner.build()

    def target():
        return learner.get_state()["learner_state"]["appo"]["target_networks"]["default_policy"]

    initial = target()
    learner.update(fragments_batch(seed=1))
    unchanged = target()  # one update: not yet
    learner.update(fragments_batch(seed=2))
    copied = target()  # two updates: a hard copy (tau=1)
    weights = learner.module["default_policy"].get_state()
    for name in initial:
        np.testing.assert_array_equal(unchanged[name], initial[name])
        np.testing.assert_array_equal(copied[name], weights[name])
    assert learner.get_state()["learner_state"]["appo"]["num_target_updates"] == 1


def test_appo_checkpoint_holds_the_target_network_and_restores_exactly(tmp_path):
    config = small(APPOConfig, target_network_update_freq=3, tau=0.5, use_kl_loss=True)
    saved = config.build_learner(spaces=SPACES)
    saved.build()
    for seed in range(4):  # 4 updates: one target update done, the counter mid-way to the next
        saved.update(fragments_batch(seed=seed))
    saved.save_to_path(tmp_path / "appo")

    ppo = PPOConfig().rl_module(model_config=SMALL_MODEL).build_learner(spaces=SPACES)
    ppo.build()
    ppo.update(ppo_batch())  # so its optimizer holds its moments, as APPO's does
    ppo.save_to_path(tmp_path / "ppo")
    appo_tree, _ = load_state_tree(tmp_path / "appo")
    ppo_tree, _ = load_state_tree(tmp_path / "ppo")
    num_weights = len(saved.module["default_policy"].get_state())
    # One more copy of each weight (the target network); optimizer slots and the rest are PPO's.
    assert count_arrays(appo_tree) == count_arrays(ppo_tree) + num_weights

    restored = config.build_learner(spaces=SPACES)
    restored.build()
    restored.restore_from_path(tmp_path / "appo")
    for seed in range(10, 13):  # crosses the next target update
        saved.update(fragments_batch(seed=seed))
        restored.update(fragments_batch(seed=seed))
    for a, b in zip(leaves(saved.get_state()), leaves(restored.get_state())):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b


def kl_adapting_appo():
    """An APPO learner whose KL coefficient moved: a target update after every update, any KL too low."""
    config = small(APPOConfig, use_kl_loss=True, kl_coeff=0.2, kl_target=1e3, target_network_update_freq=1)
    learner = config.build_learner(spaces=SPACES)
    learner.build()
    for seed in range(2):
        learner.update(fragments_batch(seed=seed))
    assert learner.curr_kl_coeffs["default_policy"] == pytest.approx(0.2 * 0.5**2)
    return config, learner


def test_ppo_and_appo_keep_the_kl_coefficients_at_the_same_state_path():
    _, appo = kl_adapting_appo()
    ppo = PPOConfig().rl_module(model_config=SMALL_MODEL).training(kl_coeff=0.2, kl_target=1e3).build_learner(spaces=SPACES)
    ppo.build()
    ppo.update(ppo_batch())
    for learner, expected in ((ppo, 0.2 * 0.5), (appo, 0.2 * 0.5**2)):
        assert learner.get_state()["learner_state"]["curr_kl_coeffs"] == {"default_policy": pytest.approx(expected)}
    assert "curr_kl_coeffs" not in appo.get_state()["learner_state"]["appo"]


def test_appo_state_with_the_kl_coefficients_at_their_old_path_still_restores():
    config, saved = kl_adapting_appo()
    # As earlier versions wrote it: the coefficients inside APPO's own section.
    old_state = saved.get_state()
    old_state["learner_state"]["appo"]["curr_kl_coeffs"] = old_state["learner_state"].pop("curr_kl_coeffs")
    restored = config.build_learner(spaces=SPACES)
    restored.build()
    restored.set_state(old_state)
    assert restored.curr_kl_coeffs == saved.curr_kl_coeffs
    for a, b in zip(leaves(saved.get_state()), leaves(restored.get_state()), strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b

    old_state["learner_state"]["appo"]["curr_kl_coeffs"]["default_policy"] = float("nan")
    with pytest.raises(ValueError, match="learner_state/appo/curr_kl_coeffs/default_policy must be a finite number"):
        restored.set_state(old_state)
    assert restored.curr_kl_coeffs == saved.curr_kl_coeffs


def test_appo_restores_refuse_a_target_network_of_another_shape():
    learner = small(APPOConfig).build_learner(spaces=SPACES)
    learner.build()
    state = learner.get_state()
    bad = state["learner_state"]["appo"]["target_networks"]["default_policy"]
    name = next(iter(bad))
    bad[name] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=f"Weight {name} of the target network of module 'default_policy' has shape"):
        learner.set_state(state)


def test_appo_restores_refuse_a_target_network_with_nan_and_change_nothing():
    learner = small(APPOConfig).build_learner(spaces=SPACES)
    learner.build()
    before = learner.get_state()
    state = learner.get_state()
    bad = state["learner_state"]["appo"]["target_networks"]["default_policy"]
    name = next(iter(bad))
    bad[name] = np.full_like(bad[name], np.nan)
    with pytest.raises(ValueError, match="not finite"):
        learner.set_state(state)
    after = learner.get_state()["learner_state"]["appo"]["target_networks"]["default_policy"]
    for key, value in before["learner_state"]["appo"]["target_networks"]["default_policy"].items():
        np.testing.assert_array_equal(after[key], value)


def test_appo_trains_in_one_process_restores_and_continues(tmp_path):
    config = small(APPOConfig).env_runners(num_env_runners=0, num_envs_per_env_runner=2)
    with config.build_algo() as algo:
        for _ in range(3):
            result = algo.train()
        assert result["num_env_steps_trained_lifetime"] >= 120
        assert result["num_env_steps_dropped_lifetime"] == 0
        algo.save_to_path(tmp_path / "run")
        saved_state = algo.learner_group.get_state()
        saved_counters = algo.get_counters()
    with config.build_algo() as algo:
        algo.restore_from_path(tmp_path / "run")
        restored = algo.learner_group.get_state()
        for a, b in zip(leaves(saved_state), leaves(restored)):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)
        result = algo.train()
        assert result["training_iteration"] == saved_counters["iteration"] + 1
        assert result["num_env_steps_trained_lifetime"] > saved_counters["num_env_steps_trained_lifetime"]


def test_min_time_s_per_iteration_makes_an_iteration_last_that_long():
    config = small(IMPALAConfig, min_time_s_per_iteration=0.5).env_runners(num_envs_per_env_runner=2)
    with config.build_algo() as algo:
        result = algo.train()
    assert result["time_this_iter_s"] >= 0.5
    assert result["num_learner_updates"] >= 1


def test_iterations_last_5_s_by_default_and_count_samples_once_you_give_train_batch_size():
    # A long run's progress lines, metrics lines and dashboard points each stand for 5 s of work.
    assert IMPALAConfig().min_time_s_per_iteration == APPOConfig().min_time_s_per_iteration == 5.0
    # Whichever setting you give decides: train_batch_size counts samples, min_time_s_per_iteration time.
    assert APPOConfig().training(train_batch_size=400).min_time_s_per_iteration is None
    assert APPOConfig().training(train_batch_size=400, min_time_s_per_iteration=2.0).min_time_s_per_iteration == 2.0
    assert APPOConfig().training(min_time_s_per_iteration=2.0).training(lr=1e-3).min_time_s_per_iteration == 2.0
    config = (
        APPOConfig()
        .environment("CartPole-v1")
        .rl_module(model_config=SMALL_MODEL)
        .env_runners(num_envs_per_env_runner=2, rollout_fragment_length=10)
        .debugging(seed=1)
    )
    with config.build_algo() as algo:
        result = algo.train()
    assert result["time_this_iter_s"] >= 5.0


# ------------------------------------------------------------------------------- on Dask actors
@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=4, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.mark.parametrize("config_class", [IMPALAConfig, APPOConfig])
@pytest.mark.parametrize("num_learners, num_env_runners", [(0, 0), (1, 1), (2, 2), (2, 0), (0, 2)])
def test_async_train_reports_lag_and_counts_every_sample(client, config_class, num_learners, num_env_runners):
    config = (
        small(config_class, broadcast_interval=1)
        .env_runners(num_env_runners=num_env_runners, num_envs_per_env_runner=2)
        .learners(num_learners=num_learners)
        .cluster(client=client)
    )
    with config.build_algo() as algo:
        results = [algo.train() for _ in range(3)]
        last = results[-1]
        assert last["num_env_steps_trained_lifetime"] >= 3 * 40
        assert last["num_env_steps_sampled_lifetime"] >= last["num_env_steps_trained_lifetime"]
        assert last["num_env_steps_dropped_lifetime"] == 0
        # Lag is bounded by the queue: the learner queue plus the updates in flight, in updates.
        assert 0 <= last["policy_lag_mean"] <= last["policy_lag_max"] <= 12
        assert last["num_env_steps_trained_throughput"] > 0
        assert isinstance(last["learners"]["default_policy"]["total_loss"], float)
        if num_learners == 2 and config_class is APPOConfig:
            # Target networks and counters are the same on every learner.
            states = algo.learner_group.foreach_learner(lambda learner: learner.get_state()["learner_state"]["appo"])
            assert states[0]["num_target_updates"] == states[1]["num_target_updates"] > 0
            for name, value in states[0]["target_networks"]["default_policy"].items():
                np.testing.assert_allclose(value, states[1]["target_networks"]["default_policy"][name], atol=1e-6)


def test_two_learners_make_the_update_of_one_learner_on_the_whole_batch(client):
    config = small(IMPALAConfig).cluster(client=client)
    batch = fragments_batch(num_fragments=6)
    local = config.build_learner_group(spaces=SPACES)
    remote = config.copy().learners(num_learners=2).build_learner_group(spaces=SPACES)
    try:
        remote.set_state(local.get_state())
        expected, got = local.update(batch), remote.update(batch)
        assert got["default_policy"]["total_loss"] == pytest.approx(expected["default_policy"]["total_loss"], rel=1e-5)
        a, b = local.get_weights()["default_policy"], remote.get_weights()["default_policy"]
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=1e-6)
    finally:
        local.shutdown()
        remote.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("config_class, target", [(APPOConfig, 300.0), (IMPALAConfig, 200.0)])
def test_learns_cartpole_on_dask_actors(client, config_class, target):
    config = (
        config_class()
        .environment("CartPole-v1")
        .env_runners(num_env_runners=1)
        .learners(num_learners=1)
        .cluster(client=client)
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        returns = []
        # Asynchronous: how far a fixed number of env steps gets depends on the machine's load (policy
        # lag) and on the run, so the budget is generous. An iteration lasts 5 s (~65k steps on a quiet
        # 2-core machine): APPO mostly reaches its target after the first or second, but about one run
        # in ten is still short of it at 150k steps and needs another iteration or two.
        while not returns or (returns[-1] < target and algo.num_env_steps_sampled_lifetime < 300_000):
            result = algo.train()
            returns.append(result["env_runners"]["episode_return_mean"])
        assert returns[-1] >= target, returns[::10]
        assert result["policy_lag_max"] <= 12
