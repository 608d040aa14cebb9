"""Multi-agent training: envs, the policy mapping, per-agent trajectories, policies_to_train, modules
added and removed, checkpoints, PettingZoo, and env-runner actors on a real LocalCluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

from dlearner import DEFAULT_MODULE_ID, MultiAgentEnv, PPOConfig, RLModuleSpec
from dlearner.envs import MultiAgentCartPole
from dlearner.multi_agent.env_runner import MultiAgentEnvRunner

SMALL = {"fcnet_hiddens": [16]}


def p_of_agent(agent_id, episode, **kwargs):
    return f"p{agent_id[-1]}"


class Staggered(MultiAgentEnv):
    """Agent ``a0`` acts for 2 steps, ``a1`` joins at step 1 and acts until step 4: agents that
    finish early and join late. An observation is ``[agent number, step]`` and each reward is
    ``10 * agent number + step``, so every row says whose and which step it is."""

    def __init__(self, config=None):
        super().__init__()
        self.possible_agents = ["a0", "a1"]
        box = spaces.Box(-1e6, 1e6, (2,), np.float32)
        self.observation_spaces = {a: box for a in self.possible_agents}
        self.action_spaces = {a: spaces.Discrete(2) for a in self.possible_agents}
        self.t = 0

    def _obs(self, agent):
        return np.array([float(agent[-1]), float(self.t)], np.float32)

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return {"a0": self._obs("a0")}, {}

    def step(self, action_dict):
        rewards = {a: 10.0 * int(a[-1]) + self.t for a in action_dict}
        self.t += 1
        acting = [a for a, (start, end) in {"a0": (0, 2), "a1": (1, 4)}.items() if start <= self.t < end]
        obs = {a: self._obs(a) for a in acting}
        terminateds = {a: True for a in action_dict if a not in acting}
        terminateds["__all__"] = not acting
        return obs, rewards, terminateds, {"__all__": False}, {}


def staggered_config(**multi_agent):
    return (
        PPOConfig()
        .environment(Staggered)
        .env_runners(num_envs_per_env_runner=1)
        .rl_module(model_config=SMALL)
        .multi_agent(**multi_agent)
        .debugging(seed=0)
    )


def test_each_agent_keeps_its_own_trajectory_when_agents_join_late_and_leave_early():
    config = staggered_config(policies={"p0", "p1"}, policy_mapping_fn=p_of_agent)
    runner = MultiAgentEnvRunner(config, module_spec=config.get_multi_rl_module_spec())
    segments = runner.sample(8)  # two whole episodes of 4 env steps
    for module_id, agent_number, steps in (("p0", 0, [0, 1]), ("p1", 1, [1, 2, 3])):
        (segment,) = segments[module_id]  # one slot: both episodes, in order
        assert (segment["obs"][:, 0] == agent_number).all()
        assert list(segment["obs"][:, 1]) == steps * 2
        assert list(segment["rewards"]) == [10.0 * agent_number + t for t in steps] * 2
        assert list(segment["terminateds"]) == ([False] * (len(steps) - 1) + [True]) * 2
    metrics = runner.get_metrics()
    assert metrics["episode_lengths"] == [4, 4]
    assert metrics["episode_returns"] == [1.0 + 36.0] * 2  # 0+1 for a0, 11+12+13 for a1: summed over agents
    assert metrics["agent_episode_returns"] == {"a0": [1.0, 1.0], "a1": [36.0, 36.0]}
    assert metrics["module_episode_returns"] == {"p0": [1.0, 1.0], "p1": [36.0, 36.0]}
    assert metrics["num_env_steps_sampled_lifetime"] == 8
    assert metrics["num_agent_steps_sampled_lifetime"] == 10


def test_rows_count_env_steps_through_their_share_of_each_step():
    config = staggered_config()
    runner = MultiAgentEnvRunner(config, module_spec=config.get_multi_rl_module_spec())
    segments = runner.sample(8)
    assert list(segments) == [DEFAULT_MODULE_ID]  # without .multi_agent(...) every agent shares one module
    shares = np.concatenate([s["env_step_share"] for s in segments[DEFAULT_MODULE_ID]])
    assert shares.sum() == pytest.approx(8.0)


def test_gae_never_runs_across_agents_or_episodes():
    from dlearner.algorithms.ppo import postprocess_segments

    config = staggered_config(policies={"p0", "p1"}, policy_mapping_fn=p_of_agent)
    runner = MultiAgentEnvRunner(config, module_spec=config.get_multi_rl_module_spec())
    batch, env_steps = postprocess_segments([runner.sample(8)], gamma=0.5, lambda_=1.0, standardize=False)
    # lambda = 1: the advantage plus the value is the discounted return to the end of the agent's own episode.
    np.testing.assert_allclose(batch["p0"]["value_targets"], [0 + 0.5 * 1, 1] * 2, rtol=1e-5)
    np.testing.assert_allclose(batch["p1"]["value_targets"], [11 + 0.5 * 12 + 0.25 * 13, 12 + 0.5 * 13, 13] * 2, rtol=1e-5)
    assert sum(env_steps.values()) == pytest.approx(8.0)


def test_agents_with_different_spaces_cannot_share_a_module():
    class Mixed(Staggered):
        def __init__(self, config=None):
            super().__init__(config)
            self.action_spaces = {"a0": spaces.Discrete(2), "a1": spaces.Discrete(3)}

    config = PPOConfig().environment(Mixed)
    with pytest.raises(ValueError, match=r"'a0' and 'a1' both map to module 'default_policy'.*Discrete\(2\) and Discrete\(3\)"):
        config.build_algo()
    # Mapped to modules of their own, they train side by side.
    specs = config.multi_agent(policy_mapping_fn="per-agent").get_multi_rl_module_spec()
    assert specs.rl_module_specs["a1"].action_space == spaces.Discrete(3)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"policies": {"p0", "p1"}}, "no policy_mapping_fn"),
        ({"policies": {"p0"}, "policy_mapping_fn": p_of_agent}, "mapped agent 'a1' to module 'p1'"),
        ({"policies": {"p0"}, "policies_to_train": ["p9"]}, "policies_to_train names"),
    ],
)
def test_a_mapping_that_cannot_work_is_refused_before_anything_starts(settings, message):
    with pytest.raises(ValueError, match=message):
        staggered_config(**settings).build_algo()


def test_multi_agent_settings_need_a_multi_agent_env():
    with pytest.raises(ValueError, match="needs a multi-agent environment"):
        PPOConfig().environment("CartPole-v1").multi_agent(policies={"p0", "p1"}, policy_mapping_fn=p_of_agent).build_algo()


def test_bad_multi_agent_values_name_the_setting():
    with pytest.raises(ValueError, match="policies must be"):
        PPOConfig().multi_agent(policies="p0")
    with pytest.raises(ValueError, match="policies_to_train must be"):
        PPOConfig().multi_agent(policies_to_train="p0")
    with pytest.raises(ValueError, match="policy_mapping_fn must be"):
        PPOConfig().multi_agent(policy_mapping_fn="by-team")


def cartpoles_config(**multi_agent):
    return (
        PPOConfig()
        .environment(MultiAgentCartPole, env_config={"num_agents": 2})
        .training(train_batch_size=256, minibatch_size=64, num_epochs=1)
        .env_runners(num_envs_per_env_runner=2)
        .rl_module(model_config=SMALL)
        .multi_agent(policies={"p0", "p1"}, policy_mapping_fn=p_of_agent, **multi_agent)
        .debugging(seed=0)
    )


def learner_state(algo, module_id):
    learner = algo.learner_group._pool.learner
    weights = {k: v.clone() for k, v in learner.module[module_id].state_dict().items()}
    optimizer = learner.get_optimizer(module_id).state_dict()
    return weights, {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer["state"].items()}


def test_modules_outside_policies_to_train_act_but_never_change():
    with cartpoles_config(policies_to_train=["p0"]).build_algo() as algo:
        algo.train()  # the optimizer of p0 has state from here on
        p0_before, p1_before = learner_state(algo, "p0"), learner_state(algo, "p1")
        result = algo.train()
        p0_after, p1_after = learner_state(algo, "p0"), learner_state(algo, "p1")
    assert sorted(result["learners"]) == ["__all_modules__", "p0"]
    assert result["env_runners"]["module_episode_returns_mean"].keys() == {"p0", "p1"}  # p1 acted
    for name, value in p1_before[0].items():
        assert torch.equal(value, p1_after[0][name])
    assert p1_after[1] == {}  # p1's optimizer never stepped
    assert any(not torch.equal(value, p0_after[0][name]) for name, value in p0_before[0].items())


def test_results_report_summed_per_agent_and_per_module_returns():
    with cartpoles_config().build_algo() as algo:
        result = algo.train()
        evaluation = algo.evaluate(2, seed=0)["env_runners"]
    runners = result["env_runners"]
    assert runners["agent_episode_returns_mean"].keys() == {"agent_0", "agent_1"}
    assert runners["module_episode_returns_mean"].keys() == {"p0", "p1"}
    assert result["num_env_steps_sampled_lifetime"] == 256
    assert result["learners"]["__all_modules__"]["num_env_steps_trained"] == 256  # env steps, as the counters
    assert result["num_agent_steps_sampled_lifetime"] >= 256
    for module_id in ("p0", "p1"):
        assert result["learners"][module_id]["num_module_steps_trained"] > 0
    assert evaluation["episode_return_mean"] == pytest.approx(sum(evaluation["agent_episode_returns_mean"].values()))


def test_a_league_adds_a_frozen_copy_and_removes_it_again():
    def league(agent_id, episode, **kwargs):
        return "p0" if agent_id == "agent_0" else "p0_frozen"

    with cartpoles_config().build_algo() as algo:
        algo.train()
        p0_weights = algo.learner_group.get_weights(["p0"])["p0"]
        spec = algo.add_module("p0_frozen", new_agent_to_module_mapping_fn=league, new_should_module_be_updated=["p0", "p1"])
        assert set(spec.rl_module_specs) == {"p0", "p1", "p0_frozen"}
        algo.learner_group.set_weights({"p0_frozen": p0_weights})
        result = {}
        while "p0_frozen" not in result.get("env_runners", {}).get("module_episode_returns_mean", {}):
            result = algo.train()  # episodes that started after add_module map agent_1 to the copy
        frozen = algo.learner_group.get_weights(["p0_frozen"])["p0_frozen"]
        assert all(np.array_equal(frozen[name], value) for name, value in p0_weights.items())
        assert "p0_frozen" not in result["learners"]
        algo.remove_module("p0_frozen", new_agent_to_module_mapping_fn=p_of_agent)
        assert set(algo.module_spec.rl_module_specs) == {"p0", "p1"}
        algo.train()
        with pytest.raises(ValueError, match="not one of the policies"):
            algo.remove_module("p1", new_should_module_be_updated=["p0"])  # the mapping still sends agent_1 to p1
        assert set(algo.learner_group.module_spec.rl_module_specs) == {"p0", "p1"}


def test_a_checkpoint_holds_every_module_and_a_restored_run_goes_on(tmp_path):
    config = cartpoles_config()
    with config.build_algo() as algo:
        algo.train()
        path = algo.save_to_path(tmp_path / "run")
        saved = algo.learner_group.get_weights()
        counters = algo.get_counters()
    with config.build_algo() as restored:
        restored.restore_from_path(path)
        weights = restored.learner_group.get_weights()
        result = restored.train()
    assert weights.keys() == {"p0", "p1"}
    for module_id in saved:
        for name, value in saved[module_id].items():
            np.testing.assert_array_equal(weights[module_id][name], value)
    assert result["training_iteration"] == 2
    assert result["num_agent_steps_sampled_lifetime"] > counters["num_agent_steps_sampled_lifetime"]
    assert restored.episode_stats.module_returns.keys() == {"p0", "p1"}


def test_policy_specs_keep_their_own_model_config():
    config = cartpoles_config().multi_agent(policies={"p0": RLModuleSpec(model_config={"fcnet_hiddens": [8]}), "p1": None})
    specs = config.get_multi_rl_module_spec().rl_module_specs
    assert specs["p0"].model_config["fcnet_hiddens"] == [8]
    assert specs["p1"].model_config["fcnet_hiddens"] == SMALL["fcnet_hiddens"]


def test_a_pettingzoo_parallel_env_trains_as_it_is():
    from mpe2 import simple_spread_v3

    config = (
        PPOConfig()
        .environment(lambda cfg: simple_spread_v3.parallel_env(N=2, max_cycles=25))
        .training(train_batch_size=200, minibatch_size=100, num_epochs=1)
        .rl_module(model_config=SMALL)
        .debugging(seed=0)
    )
    with config.build_algo() as algo:
        result = algo.train()
    assert algo.is_multi_agent
    assert list(algo.module_spec.rl_module_specs) == [DEFAULT_MODULE_ID]  # the agents share one module
    assert result["env_runners"]["agent_episode_returns_mean"].keys() == {"agent_0", "agent_1"}
    assert result["env_runners"]["episode_len_mean"] == 25  # a PettingZoo episode ends when its agents are gone


def load_example(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_two_cartpoles_example_learns_both_policies():
    out = load_example("multi_agent_cartpole").main(num_env_runners=0, stop_return=150.0, max_iters=15)
    assert out["result"]["env_runners"]["episode_return_mean"] >= 150.0
    assert out["evaluation"]["agent_episode_returns_mean"].keys() == {"agent_0", "agent_1"}


def test_the_pettingzoo_example_runs():
    returns = load_example("pettingzoo_simple_spread").main(iterations=1)
    assert len(returns) == 1 and np.isfinite(returns[0])


def test_stored_multi_agent_settings_come_back_and_are_checked():
    from dlearner import AlgorithmConfig

    config = cartpoles_config().environment("dlearner.envs:MultiAgentCartPole")
    config.multi_agent(
        policies={"p0": RLModuleSpec(model_config={"fcnet_hiddens": [8]}), "p1": None},
        policy_mapping_fn="per-agent",
        policies_to_train=["p0"],
    )
    again = AlgorithmConfig.from_dict(config.to_dict())
    assert again.policies["p0"].model_config == {"fcnet_hiddens": [8]} and again.policies["p1"] is None
    assert (again.policy_mapping_fn, again.policies_to_train) == ("per-agent", ["p0"])
    assert again.env is None  # "module:creator" imports code: the user names it again
    with pytest.raises(ValueError, match="policy_mapping_fn was a Python callable"):
        AlgorithmConfig.from_dict({**config.to_dict(), "policy_mapping_fn": "<callable p_of_agent>"})
    with pytest.raises(ValueError, match="policy_mapping_fn must be"):
        AlgorithmConfig.from_dict({**config.to_dict(), "policy_mapping_fn": "by-team"})
    with pytest.raises(ValueError, match="module id"):
        AlgorithmConfig.from_dict({**config.to_dict(), "policies": {"": None}})


@pytest.mark.slow
def test_a_pettingzoo_env_trains_with_appo_on_env_runner_actors_and_two_learners():
    """The whole path on a real LocalCluster: an env-runner actor steps the PettingZoo env, APPO's
    asynchronous loop ships per-module fragments, two learner actors train them."""
    from conftest import identical_weights, killable_cluster

    from dlearner import APPOConfig

    def simple_spread(env_config):
        from mpe2 import simple_spread_v3

        return simple_spread_v3.parallel_env(N=2, max_cycles=25)

    with killable_cluster(3) as client:
        config = (
            APPOConfig()
            .environment(simple_spread)
            .env_runners(num_env_runners=1, num_envs_per_env_runner=2, rollout_fragment_length=25)
            .learners(num_learners=2, learner_startup_timeout_s=60)
            .training(train_batch_size=100, min_time_s_per_iteration=None)
            .rl_module(model_config=SMALL)
            .multi_agent(policy_mapping_fn="per-agent")
            .cluster(client=client)
            .debugging(seed=0)
        )
        with config.build_algo() as algo:
            for _ in range(3):
                result = algo.train()
            identical_weights(algo.learner_group)
    assert {"agent_0", "agent_1"} <= set(result["learners"])
    assert result["num_env_steps_sampled_lifetime"] >= 300
    assert result["env_runners"]["agent_episode_returns_mean"].keys() == {"agent_0", "agent_1"}
