"""SAC: the losses against the papers' equations, the target networks and temperature, replay on the
learners (N learners = 1 learner, prioritized priorities from TD errors), exact restores, bad
settings, and training end to end."""

from __future__ import annotations

import logging
import math

import distributed
import gymnasium as gym
import numpy as np
import pytest
import torch

from dlearner import ALL_MODULES, DEFAULT_MODULE_ID, Columns, RLModuleSpec, SACConfig
from dlearner.algorithms.n_step import N_STEP, n_step_transitions
from dlearner.algorithms.sac_module import DefaultSACRLModule

PENDULUM = (gym.spaces.Box(-np.inf, np.inf, (3,), np.float32), gym.spaces.Box(-2.0, 2.0, (1,), np.float32))
DISCRETE = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(3, start=1))
SMALL = {"fcnet_hiddens": [32, 32], "fcnet_activation": "relu"}


def config(num_learners=0, **training):
    return (
        SACConfig()
        .learners(num_learners=num_learners, learner_startup_timeout_s=60)
        .rl_module(model_config=SMALL)
        .training(**{"initial_alpha": 0.5, "tau": 0.1, "n_step": 1, **training})
        .debugging(seed=7)
    )


def transitions(spaces, rows=64, seed=0):
    rng = np.random.default_rng(seed)
    obs_space, action_space = spaces
    dim = obs_space.shape[0]
    if isinstance(action_space, gym.spaces.Discrete):
        actions = rng.integers(action_space.start, action_space.start + action_space.n, rows)
    else:
        actions = rng.uniform(-2.0, 2.0, (rows, 1)).astype(np.float32)
    return {
        Columns.OBS: rng.normal(size=(rows, dim)).astype(np.float32),
        Columns.ACTIONS: actions,
        Columns.REWARDS: rng.normal(size=rows).astype(np.float32),
        Columns.NEXT_OBS: rng.normal(size=(rows, dim)).astype(np.float32),
        Columns.TERMINATEDS: rng.random(rows) < 0.2,
        Columns.TRUNCATEDS: np.zeros(rows, bool),
        N_STEP: rng.integers(1, 4, rows).astype(np.int32),
    }


def build_learner(spaces, **training):
    learner = config(**training).build_learner(spaces=spaces)
    learner.build()
    return learner


def paper_losses_box(module, batch, noise, gamma, target_entropy):
    """Haarnoja et al. 2018 (eqs. 5, 7, 17 and 18) written out with plain torch ops."""
    t = {k: torch.as_tensor(v) for k, v in batch.items()}
    low, high = -2.0, 2.0
    alpha = module.log_alpha.exp()

    def policy(obs, eps):
        mean, raw = module.pi(obs).chunk(2, -1)
        log_std = -5.0 + 3.5 * (torch.tanh(raw) + 1.0)
        std = log_std.exp()
        u = mean + std * eps
        normal_logp = torch.distributions.Normal(mean, std).log_prob(u).sum(-1)
        # change of variables through tanh and the rescaling to [low, high]
        logp = normal_logp - torch.log((high - low) / 2 * (1 - torch.tanh(u) ** 2)).sum(-1)
        return (low + high) / 2 + (high - low) / 2 * torch.tanh(u), logp

    def q(net, obs, action):
        return net(obs, action / 2.0).squeeze(-1)

    with torch.no_grad():
        a_next, logp_next = policy(t[Columns.NEXT_OBS], noise[0])
        q_next = torch.min(q(module.qf1_target, t[Columns.NEXT_OBS], a_next), q(module.qf2_target, t[Columns.NEXT_OBS], a_next))
        y = t[Columns.REWARDS] + gamma ** t[N_STEP].float() * (1 - t[Columns.TERMINATEDS].float()) * (q_next - alpha * logp_next)
        qf = ((q(module.qf1, t[Columns.OBS], t[Columns.ACTIONS]) - y) ** 2).mean() + (
            (q(module.qf2, t[Columns.OBS], t[Columns.ACTIONS]) - y) ** 2
        ).mean()
        a, logp = policy(t[Columns.OBS], noise[1])
        pol = (alpha * logp - torch.min(q(module.qf1, t[Columns.OBS], a), q(module.qf2, t[Columns.OBS], a))).mean()
        alpha_loss = (-module.log_alpha * (logp + target_entropy)).mean()
    return float(qf), float(pol), float(alpha_loss)


def test_sac_box_losses_match_the_paper_equations():
    learner = build_learner(PENDULUM)
    batch = transitions(PENDULUM)
    module = learner.module[DEFAULT_MODULE_ID]
    generator = torch.Generator()
    generator.set_state(learner.noise_generator.get_state())
    noise = torch.randn((2, 64, 1), generator=generator)
    expected = paper_losses_box(module, batch, noise, gamma=0.99, target_entropy=-1.0)
    result = learner.update(batch, shuffle=False)[DEFAULT_MODULE_ID]  # row i gets noise[:, i]
    assert result["qf_loss"] == pytest.approx(expected[0], rel=1e-5)
    assert result["policy_loss"] == pytest.approx(expected[1], rel=1e-5)
    assert result["alpha_loss"] == pytest.approx(expected[2], rel=1e-5, abs=1e-7)
    assert result["alpha_value"] == pytest.approx(0.5, rel=1e-6)
    assert result["total_loss"] == pytest.approx(sum(expected), rel=1e-5)
    for name in ("qf_learning_rate", "policy_learning_rate", "alpha_learning_rate"):
        assert result[name] == pytest.approx(1e-3)


def test_sac_discrete_losses_take_exact_expectations_over_actions():
    learner = build_learner(DISCRETE)
    batch = transitions(DISCRETE)
    module = learner.module[DEFAULT_MODULE_ID]
    t = {k: torch.as_tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        alpha = module.log_alpha.exp()
        next_logp = torch.log_softmax(module.pi(t[Columns.NEXT_OBS]), -1)
        q_next = torch.min(module.qf1_target(t[Columns.NEXT_OBS]), module.qf2_target(t[Columns.NEXT_OBS]))
        v_next = (next_logp.exp() * (q_next - alpha * next_logp)).sum(-1)
        y = t[Columns.REWARDS] + 0.99 ** t[N_STEP].float() * (1 - t[Columns.TERMINATEDS].float()) * v_next
        index = (t[Columns.ACTIONS] - 1).long()[:, None]  # Discrete(3, start=1)
        q1_all, q2_all = module.qf1(t[Columns.OBS]), module.qf2(t[Columns.OBS])
        qf = ((q1_all.gather(1, index)[:, 0] - y) ** 2).mean() + ((q2_all.gather(1, index)[:, 0] - y) ** 2).mean()
        logp = torch.log_softmax(module.pi(t[Columns.OBS]), -1)
        pol = (logp.exp() * (alpha * logp - torch.min(q1_all, q2_all))).sum(-1).mean()
        alpha_loss = (-module.log_alpha * ((logp.exp() * logp).sum(-1) + 0.98 * math.log(3))).mean()
    result = learner.update(batch)[DEFAULT_MODULE_ID]
    assert result["qf_loss"] == pytest.approx(float(qf), rel=1e-5)
    assert result["policy_loss"] == pytest.approx(float(pol), rel=1e-5)
    assert result["alpha_loss"] == pytest.approx(float(alpha_loss), rel=1e-5, abs=1e-7)


def test_each_loss_moves_only_its_own_optimizers_parameters():
    learner = build_learner(PENDULUM)
    module = learner.module[DEFAULT_MODULE_ID]
    before = {k: v.copy() for k, v in module.get_state().items()}
    learner.update(transitions(PENDULUM))
    after = module.get_state()
    changed = {k.split(".")[0] for k in before if not np.array_equal(before[k], after[k])}
    # The targets move by polyak averaging after the update; every network and the temperature train.
    assert changed == {"pi", "qf1", "qf2", "qf1_target", "qf2_target", "log_alpha"}
    # With the policy optimizer's learning rate at 0 the Q networks' gradient alone would still move
    # pi if the policy loss leaked into other optimizers; it must not.
    learner = build_learner(PENDULUM, actor_lr=1e-12)
    module = learner.module[DEFAULT_MODULE_ID]
    pi_before = {k: v.copy() for k, v in module.get_state().items() if k.startswith("pi.")}
    learner.update(transitions(PENDULUM))
    for name, value in pi_before.items():
        np.testing.assert_allclose(module.get_state()[name], value, atol=1e-9)


def test_target_networks_follow_by_polyak_averaging_with_tau():
    learner = build_learner(PENDULUM, tau=0.25)
    module = learner.module[DEFAULT_MODULE_ID]
    target_before = {k: v.detach().clone() for k, v in module.qf1_target.state_dict().items()}
    learner.update(transitions(PENDULUM))
    for name, value in module.qf1_target.state_dict().items():
        expected = 0.75 * target_before[name] + 0.25 * module.qf1.state_dict()[name]
        torch.testing.assert_close(value, expected)


def test_sampled_actions_lie_inside_the_bounds_and_greedy_is_the_squashed_mean():
    learner = build_learner((PENDULUM[0], gym.spaces.Box(np.array([-1.0, 0.0], np.float32), np.array([3.0, 0.5], np.float32))))
    module = learner.module[DEFAULT_MODULE_ID]
    logits = module.forward_inference({Columns.OBS: torch.randn(500, 3) * 10})[Columns.ACTION_DIST_INPUTS] * 50
    dist = module.get_exploration_action_dist_cls().from_logits(logits)
    actions = dist.sample(torch.Generator().manual_seed(0))
    assert (actions[:, 0] >= -1.0).all() and (actions[:, 0] <= 3.0).all()
    assert (actions[:, 1] >= 0.0).all() and (actions[:, 1] <= 0.5).all()
    greedy = dist.deterministic_sample()
    torch.testing.assert_close(greedy, torch.tensor([1.0, 0.25]) + torch.tensor([2.0, 0.25]) * torch.tanh(dist.loc))


def test_n_step_returns_stop_at_episode_ends_and_fragment_ends():
    rewards = np.array([[1.0], [2.0], [4.0], [8.0]], np.float32)
    fragment = {
        Columns.OBS: np.arange(4, dtype=np.float32).reshape(4, 1, 1),
        Columns.NEXT_OBS: np.arange(1, 5, dtype=np.float32).reshape(4, 1, 1),
        Columns.ACTIONS: np.zeros((4, 1, 1), np.float32),
        Columns.REWARDS: rewards,
        Columns.TERMINATEDS: np.array([[False], [True], [False], [False]]),
        Columns.TRUNCATEDS: np.zeros((4, 1), bool),
    }
    rows = n_step_transitions(fragment, n_step=3, gamma=0.5)
    np.testing.assert_allclose(rows[Columns.REWARDS], [1 + 0.5 * 2, 2, 4 + 0.5 * 8, 8])
    np.testing.assert_array_equal(rows[N_STEP], [2, 1, 2, 1])
    np.testing.assert_array_equal(rows[Columns.NEXT_OBS][:, 0], [2, 2, 4, 4])
    np.testing.assert_array_equal(rows[Columns.TERMINATEDS], [True, True, False, False])


def test_prioritized_replay_takes_priorities_from_the_td_errors():
    import copy

    learner = build_learner(PENDULUM, replay_buffer_config={"type": "prioritized", "capacity": 1000, "alpha": 1.0, "beta": 0.5})
    learner.update_from_replay_buffer(
        transitions(PENDULUM, rows=300), row_batch_id="a", num_updates=0, batch_size=256, timesteps={}
    )
    indices, weights = copy.deepcopy(learner.replay_buffer).sample_indices(256)  # what the update will draw
    assert weights is not None and weights.max() == pytest.approx(1.0) and (weights > 0).all()
    result = learner.update_from_replay_buffer(None, row_batch_id="a", num_updates=1, batch_size=256, timesteps={})
    assert result[ALL_MODULES]["replay_buffer_size"] == 300
    td = learner.td_errors[DEFAULT_MODULE_ID].numpy()
    expected = np.ones(300)
    expected[indices] = td + 1e-6  # alpha = 1; the last of duplicate indices wins
    np.testing.assert_allclose(learner.replay_buffer.get_state()["priorities"], expected, rtol=1e-5)


def test_a_retried_call_adds_its_rows_once():
    learner = build_learner(PENDULUM)
    rows = transitions(PENDULUM, rows=10)
    for _ in range(2):
        learner.update_from_replay_buffer(rows, row_batch_id="g-0", num_updates=0, batch_size=256, timesteps={})
    assert len(learner.replay_buffer) == 10


@pytest.mark.parametrize("buffer_type", ["uniform", "prioritized"])
def test_a_restored_learner_makes_exactly_the_updates_the_saved_one_would_have(tmp_path, buffer_type):
    settings = dict(replay_buffer_config={"type": buffer_type, "capacity": 500}, store_buffer_in_checkpoints=True)
    learner = build_learner(PENDULUM, **settings)
    learner.update_from_replay_buffer(transitions(PENDULUM, 400), row_batch_id="0", num_updates=3, batch_size=64, timesteps={})
    learner.save_to_path(tmp_path / "ckpt")
    more = transitions(PENDULUM, 200, seed=1)
    expected = learner.update_from_replay_buffer(more, row_batch_id="1", num_updates=4, batch_size=64, timesteps={})
    restored = build_learner(PENDULUM, **settings)
    restored.restore_from_path(tmp_path / "ckpt")
    got = restored.update_from_replay_buffer(more, row_batch_id="1", num_updates=4, batch_size=64, timesteps={})
    for name, value in learner.module[DEFAULT_MODULE_ID].get_state().items():
        np.testing.assert_array_equal(restored.module[DEFAULT_MODULE_ID].get_state()[name], value, err_msg=name)
    assert got[DEFAULT_MODULE_ID]["qf_loss"] == expected[DEFAULT_MODULE_ID]["qf_loss"]


def test_the_buffer_stays_out_of_checkpoints_unless_asked(tmp_path):
    from dlearner.checkpoint.objects import load_learner_state

    learner = build_learner(PENDULUM)
    learner.update_from_replay_buffer(transitions(PENDULUM, 50), row_batch_id="0", num_updates=1, batch_size=32, timesteps={})
    learner.save_to_path(tmp_path / "without")
    state, _ = load_learner_state(str(tmp_path / "without"))
    assert "replay_buffer" not in state["learner_state"]
    restored = build_learner(PENDULUM)
    restored.restore_from_path(tmp_path / "without")
    assert len(restored.replay_buffer) == 0  # a fresh buffer, refilled by the run


@pytest.mark.parametrize(
    "training, message",
    [
        ({"replay_buffer_config": {"capacity": 100}}, "capacity"),
        ({"tau": 1.5}, "tau"),
        ({"replay_buffer_config": {"type": "reservoir"}}, "type"),
        ({"replay_buffer_config": {"type": "prioritized", "alpha": -1.0}}, "alpha"),
        ({"replay_buffer_config": {"type": "prioritized", "beta": 2.0}}, "beta"),
        ({"target_entropy": "high"}, "target_entropy"),
        ({"n_step": 0}, "n_step"),
        ({"training_intensity": -1}, "training_intensity"),
        ({"actor_lr": 0}, "actor_lr"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(training, message):
    with pytest.raises(ValueError, match=message):
        SACConfig().training(**training).validate()


def test_an_action_space_sac_cannot_handle_is_refused_before_anything_starts():
    def multi_discrete(_config):
        env = gym.make("CartPole-v1")
        env.action_space = gym.spaces.MultiDiscrete([2, 3])
        return env

    gym.register("dlearner-test/MultiDiscreteCartPole-v0", entry_point=lambda: multi_discrete(None))
    try:
        with pytest.raises(ValueError, match="MultiDiscrete"):
            SACConfig().environment("dlearner-test/MultiDiscreteCartPole-v0").learners(num_learners=1).build_algo()
    finally:
        gym.registry.pop("dlearner-test/MultiDiscreteCartPole-v0")


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


@pytest.mark.parametrize("buffer_type", ["uniform", "prioritized"])
def test_two_learners_train_from_their_buffers_as_one_learner_does(client, buffer_type):
    settings = dict(replay_buffer_config={"type": buffer_type, "capacity": 1000})
    rows = transitions(PENDULUM, rows=301)
    local = config(**settings).build_learner_group(spaces=PENDULUM)
    with config(num_learners=2, **settings).cluster(client=client).build_learner_group(spaces=PENDULUM) as group:
        group.set_weights(local.get_weights())
        for step in range(3):
            new = rows if step == 0 else None
            got = group.update_from_replay_buffer(new, num_updates=2, batch_size=64, timesteps={})
            expected = local.update_from_replay_buffer(new, num_updates=2, batch_size=64, timesteps={})
            for name in ("qf_loss", "policy_loss", "alpha_loss"):
                assert got[DEFAULT_MODULE_ID][name] == pytest.approx(expected[DEFAULT_MODULE_ID][name], rel=1e-4, abs=1e-6)
        for name, value in local.get_weights()[DEFAULT_MODULE_ID].items():
            np.testing.assert_allclose(group.get_weights()[DEFAULT_MODULE_ID][name], value, atol=1e-5, err_msg=name)
        assert got[ALL_MODULES]["replay_buffer_size"] == 301
    local.shutdown()


def test_sac_trains_pendulum_with_env_runner_and_learner_actors(client):
    algo = (
        config(num_learners=1, num_steps_sampled_before_learning_starts=200, min_sample_timesteps_per_iteration=300)
        .environment("Pendulum-v1")
        .env_runners(num_env_runners=1)
        .cluster(client=client)
        .build_algo()
    )
    try:
        first = algo.train()
        second = algo.train()
        assert first["replay_buffer_size"] == 300 and second["replay_buffer_size"] == 600
        assert second["num_env_steps_sampled_lifetime"] == 600
        # One update per env step once 200 were sampled: 400 updates of 256 rows.
        assert second["num_env_steps_trained_lifetime"] == 400 * 256
        learner = second["learners"][DEFAULT_MODULE_ID]
        assert {"qf_loss", "policy_loss", "alpha_loss", "alpha_value", "total_loss"} <= set(learner)
        greedy = algo.evaluate(2, seed=0)["env_runners"]["episode_returns"]
        assert len(greedy) == 2 and all(-2000 < r <= 0 for r in greedy)
        # Env runners act with the policy alone and hold exactly the learners' policy weights.
        runner_weights = algo.env_runner_group._all("get_weights", [()])[0][DEFAULT_MODULE_ID]
        policy = algo.learner_group.get_weights(inference_only=True)[DEFAULT_MODULE_ID]
        assert set(runner_weights) == set(policy) and all(name.startswith("pi.") for name in policy)
        for name, value in policy.items():
            np.testing.assert_array_equal(runner_weights[name], value)
    finally:
        algo.stop()


def test_env_runners_get_the_policy_weights_only():
    learner = build_learner(PENDULUM)
    whole = learner.module.get_state()[DEFAULT_MODULE_ID]
    sent = learner.module.get_state(inference_only=True)[DEFAULT_MODULE_ID]
    assert set(sent) == {name for name in whole if name.startswith("pi.")}
    assert sum(v.nbytes for v in sent.values()) < sum(v.nbytes for v in whole.values()) / 4
    acting = RLModuleSpec(module_class=DefaultSACRLModule, observation_space=PENDULUM[0], action_space=PENDULUM[1],
                          model_config=SMALL, inference_only=True).build()  # fmt: skip
    assert not hasattr(acting, "qf1") and set(acting.get_state()) == set(sent)
    acting.set_state(whole)  # a whole module's state fits: the policy part is taken
    for name, value in sent.items():
        np.testing.assert_array_equal(acting.get_state()[name], value)


@pytest.mark.slow
def test_the_pendulum_example_learns(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "sac_pendulum.py"
    spec = importlib.util.spec_from_file_location("sac_pendulum_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # Everything in this process; a random policy scores about -1200.
    out = example.main(num_learners=0, num_env_runners=0, stop_return=-600.0, max_iters=10, seed=1)
    assert out["result"]["env_runners"]["episode_return_mean"] >= -600.0
    assert "greedy evaluation over 5 episodes" in capsys.readouterr().out


def test_an_updates_snapshot_leaves_the_replay_buffer_out_but_keeps_the_noise_generator():
    learner = build_learner(PENDULUM)
    learner.update_from_replay_buffer(transitions(PENDULUM, 100), row_batch_id="a", num_updates=0, batch_size=32, timesteps={})
    snapshot = learner.take_snapshot()
    # Copying the buffer for every update would cost more than the update; no update changes it.
    assert "replay_buffer" not in snapshot.learner_state and "noise_generator" in snapshot.learner_state
    assert "replay_buffer" in learner.get_state()["learner_state"]  # checkpoints and new learners get it
    before = learner.get_state()
    learner.update_from_replay_buffer(None, row_batch_id="a", num_updates=1, batch_size=32, timesteps={})
    learner.restore_snapshot(snapshot)
    for name, value in before["rl_module"][DEFAULT_MODULE_ID].items():
        np.testing.assert_array_equal(learner.module[DEFAULT_MODULE_ID].get_state()[name], value)
    np.testing.assert_array_equal(learner.noise_generator.get_state().numpy(), before["learner_state"]["noise_generator"])


def test_a_restored_run_draws_the_same_n_step_spans():
    sac = config(n_step=[1, 3]).environment("Pendulum-v1").env_runners(num_env_runners=0)
    fragment = {Columns.REWARDS: np.zeros((50, 1), np.float32)}
    with sac.build_algo() as algo, sac.build_algo() as restored:
        algo._n_steps(fragment)  # the generator moved on since the start
        restored.set_counters(algo.get_counters())
        np.testing.assert_array_equal(restored._n_steps(fragment), algo._n_steps(fragment))
        counters = {**algo.get_counters(), "sac_n_step_rng": '{"bit_generator": "MT19937"}'}
        with pytest.raises(ValueError, match="sac_n_step_rng.*corrupted"):
            restored.set_counters(counters)
