"""EnvRunner with real gymnasium environments: action values, observation flattening, vector envs, episode stats."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from dlearner import Columns, PPOConfig
from dlearner.env_runner import NEXT_VF_PREDS, EnvRunner

TINY_MODEL = {"fcnet_hiddens": [16]}


class OffsetActionsEnv(gym.Env):
    """Eight-step episodes with actions -2, -1, 0 (``Discrete(3, start=-2)``); only action 0 earns a reward.

    It refuses actions outside its space, so a runner that sent logit indices (0, 1, 2) would fail.
    """

    observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(3, start=-2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.ones(2, np.float32), {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        self.t += 1
        return np.ones(2, np.float32), float(action == 0), self.t >= 8, False, {}


class DictObsEnv(gym.Env):
    """Observations ``{"target": Discrete(2), "noise": Box}``; the reward is 1 when the action equals the target."""

    observation_space = spaces.Dict({"target": spaces.Discrete(2), "noise": spaces.Box(-1.0, 1.0, (2,), np.float32)})
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observe(), {}

    def _observe(self):
        self.target = int(self.np_random.integers(2))
        return {"target": self.target, "noise": self.np_random.uniform(-1, 1, 2).astype(np.float32)}

    def step(self, action):
        reward = float(action == self.target)
        self.t += 1
        return self._observe(), reward, self.t >= 8, False, {}


class TupleObsEnv(gym.Env):
    """Observations ``(MultiDiscrete, Box)``, one-step episodes."""

    observation_space = spaces.Tuple([spaces.MultiDiscrete([2, 3], start=[1, -1]), spaces.Box(0.0, 1.0, (1,), np.float32)])
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 1.0, True, False, {}


class CounterEnv(gym.Env):
    """Observation ``[step in episode, episode number]``, reward 1 per step. Episode ``k`` lasts ``3 + k % 4``
    steps and ends in termination when ``k`` is even, truncation when it is odd."""

    observation_space = spaces.Box(0.0, np.inf, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self):
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._observe(), {}

    def _observe(self):
        return np.array([self.t, self.episode], np.float32)

    def step(self, action):
        self.t += 1
        done = self.t >= 3 + self.episode % 4
        return self._observe(), 1.0, done and self.episode % 2 == 0, done and self.episode % 2 == 1, {}


def _counter_vector_env(num_envs: int, **kwargs) -> gym.vector.VectorEnv:
    # An env-provided vector env that, like gymnasium's own (CartPoleVectorEnv), resets in the next step.
    return gym.vector.SyncVectorEnv([CounterEnv] * num_envs, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


COUNTER_ID = "dlearner-test/Counter-v0"
if COUNTER_ID not in gym.registry:
    gym.register(COUNTER_ID, entry_point=CounterEnv, vector_entry_point=_counter_vector_env)


def _config(env, *, num_envs: int = 4, vectorize_mode: str = "sync") -> PPOConfig:
    config = (
        PPOConfig()
        .environment(env)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=num_envs, gym_env_vectorize_mode=vectorize_mode)
        .rl_module(model_config=TINY_MODEL)
        .debugging(seed=0)
    )
    return config


def _runner(config: PPOConfig) -> EnvRunner:
    return EnvRunner(config, module_spec=config.get_multi_rl_module_spec())


# ------------------------------------------------------------------------ Discrete(n, start)
def test_discrete_start_fragments_carry_the_actions_the_env_received():
    runner = _runner(_config(lambda cfg: OffsetActionsEnv()))
    fragment = runner.sample(256)
    actions = fragment[Columns.ACTIONS]
    assert set(np.unique(actions)) <= {-2, -1, 0}
    assert len(np.unique(actions)) == 3
    # The env rewards exactly action 0, so rewards show which value it received.
    np.testing.assert_array_equal(fragment[Columns.REWARDS], (actions == 0).astype(np.float32))
    runner.stop()


def test_discrete_start_logp_in_fragments_is_that_of_the_env_action():
    runner = _runner(_config(lambda cfg: OffsetActionsEnv()))
    fragment = runner.sample(32)
    dist_cls = runner.module.get_train_action_dist_cls()
    logp = dist_cls.from_logits(torch.from_numpy(fragment[Columns.ACTION_DIST_INPUTS])).logp(
        torch.from_numpy(fragment[Columns.ACTIONS])
    )
    np.testing.assert_allclose(logp.numpy(), fragment[Columns.ACTION_LOGP], rtol=1e-6)
    runner.stop()


def test_ppo_learns_and_evaluates_with_discrete_start_actions():
    config = _config(lambda cfg: OffsetActionsEnv()).training(train_batch_size=256, minibatch_size=64, num_epochs=4, lr=3e-3)
    with config.build_algo() as algo:
        for _ in range(8):
            result = algo.train()
        assert np.isfinite(result["learners"]["default_policy"]["total_loss"])
        # Greedy evaluation sends the learned best action, 0, on every step.
        assert algo.evaluate(2)["env_runners"]["episode_return_mean"] == 8.0


def test_greedy_evaluation_runs_episodes_side_by_side_with_the_same_figures_as_one_by_one():
    one_env = _runner(_config("CartPole-v1", num_envs=1))
    four_envs = _runner(_config("CartPole-v1", num_envs=4))
    four_envs.module.load_state_dict(one_env.module.state_dict())
    try:
        alone = one_env.evaluate(6, seed=3)
        side_by_side = four_envs.evaluate(6, seed=3)
    finally:
        one_env.stop()
        four_envs.stop()
    # Episode i is reset with seed + i whichever env runs it, and greedy actions are deterministic.
    assert side_by_side == alone
    assert len(alone["episode_returns"]) == 6 and len(set(alone["episode_lengths"])) > 1


# ----------------------------------------------------------------------- Dict/Tuple observations
def test_dict_observations_reach_the_module_flattened_as_gymnasium_flattens_them():
    runner = _runner(_config(lambda cfg: DictObsEnv(), num_envs=2))
    fragment = runner.sample(16)
    obs = fragment[Columns.OBS]
    space = DictObsEnv.observation_space
    assert obs.shape == (8, 2, gym.spaces.flatdim(space)) and obs.dtype == np.float32
    # gymnasium orders Dict keys ("noise", then "target"); the target is one-hot.
    for row in obs.reshape(-1, gym.spaces.flatdim(space)):
        restored = gym.spaces.unflatten(space, row)
        np.testing.assert_array_equal(gym.spaces.flatten(space, restored), row)
        assert space["noise"].contains(restored["noise"]) and restored["target"] in (0, 1)
    runner.stop()


def test_tuple_observations_are_flattened_row_by_row():
    config = _config(lambda cfg: TupleObsEnv(), num_envs=2)
    runner = _runner(config)
    fragment = runner.sample(6)
    space = TupleObsEnv.observation_space
    assert fragment[Columns.OBS].shape == (3, 2, gym.spaces.flatdim(space))
    for row in fragment[Columns.OBS].reshape(-1, gym.spaces.flatdim(space)):
        restored = gym.spaces.unflatten(space, row.astype(np.float64))
        assert space.contains((restored[0], restored[1].astype(np.float32)))
    runner.stop()


def test_ppo_learns_from_dict_observations():
    config = _config(lambda cfg: DictObsEnv()).training(train_batch_size=256, minibatch_size=64, num_epochs=4, lr=3e-3)
    with config.build_algo() as algo:
        for _ in range(10):
            algo.train()
        # A policy that ignores the "target" entry scores 4 of 8; reading it scores 8.
        assert algo.evaluate(4)["env_runners"]["episode_return_mean"] >= 7.0


def test_observation_spaces_without_a_flat_form_raise_a_value_error_naming_the_alternative():
    class TextObsEnv(gym.Env):
        observation_space = spaces.Text(4)
        action_space = spaces.Discrete(2)

    config = _config(lambda cfg: TextObsEnv())
    with pytest.raises(ValueError, match="ObservationWrapper"):
        config.get_multi_rl_module_spec().rl_module_specs["default_policy"].build()


# --------------------------------------------------------------------------- vector envs
def test_env_provided_vector_env_is_used_with_vector_entry_point_mode():
    runner = _runner(_config("CartPole-v1", vectorize_mode="vector_entry_point"))
    assert isinstance(runner.env.unwrapped, gym.envs.classic_control.cartpole.CartPoleVectorEnv)
    fragment = runner.sample(400)
    assert fragment[Columns.OBS].shape == (100, 4, 4)
    metrics = runner.get_metrics()
    assert metrics["episode_returns"] and metrics["episode_returns"] == [float(n) for n in metrics["episode_lengths"]]
    runner.stop()


def _check_counter_fragment(fragment):
    obs, dones = fragment[Columns.OBS], fragment[Columns.TERMINATEDS] | fragment[Columns.TRUNCATEDS]
    step, episode = obs[..., 0], obs[..., 1]
    lengths = 3 + episode % 4
    # No reset step appears as a transition: every row is a real step of a running episode.
    assert np.all(step < lengths)
    np.testing.assert_array_equal(dones, step == lengths - 1)
    # Within a column, each row follows the one before: the next step, or step 0 of the next episode.
    for t in range(1, len(obs)):
        expected = np.where(dones[t - 1, :, None], [0.0, 1.0] + obs[t - 1] * [0, 1], obs[t - 1] + [1.0, 0.0])
        np.testing.assert_array_equal(obs[t], expected)


def test_next_step_autoreset_vector_envs_give_contiguous_fragments_without_reset_steps():
    runner = _runner(_config(COUNTER_ID, num_envs=3, vectorize_mode="vector_entry_point"))
    assert runner.env.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    first = runner.sample(60)
    assert first[Columns.OBS].shape == (20, 3, 2)
    _check_counter_fragment(first)
    second = runner.sample(60)
    _check_counter_fragment(second)
    # The fragments join up: the second starts right after the first ended.
    last, nxt = first[Columns.OBS][-1], second[Columns.OBS][0]
    ended = (first[Columns.TERMINATEDS] | first[Columns.TRUNCATEDS])[-1]
    np.testing.assert_array_equal(nxt, np.where(ended[:, None], [0.0, 1.0] + last * [0, 1], last + [1.0, 0.0]))
    runner.stop()


def test_next_step_autoreset_bootstrap_values_use_the_final_observation():
    runner = _runner(_config(COUNTER_ID, num_envs=2, vectorize_mode="vector_entry_point"))
    fragment = runner.sample(40)
    obs, next_vf = fragment[Columns.OBS], fragment[NEXT_VF_PREDS]
    terminated, truncated = fragment[Columns.TERMINATEDS], fragment[Columns.TRUNCATEDS]
    assert terminated.any() and truncated.any()
    np.testing.assert_array_equal(next_vf[terminated], 0.0)
    final_obs = obs[truncated] + [1.0, 0.0]
    np.testing.assert_allclose(next_vf[truncated], runner._values(final_obs), rtol=1e-5)
    running = ~(terminated | truncated)
    running[-1] = False
    np.testing.assert_allclose(next_vf[:-1][running[:-1]], fragment[Columns.VF_PREDS][1:][running[:-1]], rtol=1e-6)
    runner.stop()


def test_same_step_and_next_step_vector_envs_report_the_same_episodes():
    reports = []
    for mode in ("sync", "vector_entry_point"):
        runner = _runner(_config(COUNTER_ID, num_envs=2, vectorize_mode=mode))
        fragment = runner.sample(40)
        metrics = runner.get_metrics()
        num_done = int((fragment[Columns.TERMINATEDS] | fragment[Columns.TRUNCATEDS]).sum())
        assert metrics["num_episodes_lifetime"] == len(metrics["episode_lengths"]) == num_done
        reports.append(sorted(zip(metrics["episode_returns"], metrics["episode_lengths"])))
        runner.stop()
    assert reports[0] == reports[1]
    assert all(ret == float(length) and 3 <= length <= 6 for ret, length in reports[0])


def test_ppo_trains_on_an_env_provided_vector_env():
    config = _config("CartPole-v1", vectorize_mode="vector_entry_point").training(
        train_batch_size=256, minibatch_size=64, num_epochs=1
    )
    with config.build_algo() as algo:
        result = algo.train()
        assert result["num_env_steps_sampled_lifetime"] >= 256
        assert result["env_runners"]["episode_return_mean"] > 0


@pytest.mark.parametrize(
    "env, mode, message",
    [
        ("CartPole-v1", "async", "not supported"),
        ("Pendulum-v1", "vector_entry_point", "has no vector entry point"),
        (lambda cfg: OffsetActionsEnv(), "vector_entry_point", "needs a registered gymnasium env id"),
    ],
    ids=["async", "no-vector-entry-point", "env-creator"],
)
def test_unusable_vectorize_modes_raise_value_error_saying_what_to_use(env, mode, message):
    config = _config("CartPole-v1")
    config.environment(env)
    spec = config.get_multi_rl_module_spec()
    # Set behind the fluent method's back: the runner checks again what it is given.
    config.gym_env_vectorize_mode = mode
    with pytest.raises(ValueError, match=message):
        EnvRunner(config, module_spec=spec)


def test_the_fluent_method_refuses_async_vector_envs():
    with pytest.raises(ValueError, match="gym_env_vectorize_mode='async' is not supported"):
        PPOConfig().env_runners(gym_env_vectorize_mode="async")
