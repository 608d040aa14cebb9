"""IMPALA and APPO on multi-agent envs: train batches of whole per-agent fragments, padding rows
that train nothing, frozen modules that never change, and env steps counted as env steps.

Everything runs in this process (no env runner or learner actors): the asynchronous pipeline
treats 0 and N actors alike, and the batch composition for N learners is a pure function.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL

from dlearner import DEFAULT_MODULE_ID, APPOConfig, Columns, IMPALAConfig
from dlearner.algorithms.async_pipeline import select_train_batch
from dlearner.env_runner import NEXT_VF_PREDS
from dlearner.envs import MultiAgentCartPole

FRAGMENT_LENGTH = 10


def two_policies(config_class, **multi_agent):
    """MultiAgentCartPole with agent_0 -> p0 and agent_1 -> p1, small enough to train in seconds."""
    return (
        config_class()
        .environment(MultiAgentCartPole, env_config={"num_agents": 2})
        .multi_agent(
            policies={"p0", "p1"}, policy_mapping_fn=lambda agent_id, episode, **kwargs: f"p{agent_id[-1]}", **multi_agent
        )
        .rl_module(model_config=SMALL_MODEL)
        .env_runners(num_env_runners=0, num_envs_per_env_runner=2)
        .training(rollout_fragment_length=FRAGMENT_LENGTH, train_batch_size=60, min_time_s_per_iteration=None)
        .debugging(seed=0)
    )


def module_state(state, module_id):
    """A module's weights, optimizer state and (APPO) target network, from ``learner_group.get_state()``."""
    learner = state["learner"]
    return {
        "weights": learner["rl_module"][module_id],
        "optimizer": learner["optimizer"][f"{module_id}_default_optimizer"],
        "target": learner["learner_state"]["appo"]["target_networks"][module_id],
    }


def leaves(tree, path=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, path + (key,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from leaves(value, path + (i,))
    else:
        yield path, tree


def assert_bit_identical(a, b):
    a, b = dict(leaves(a)), dict(leaves(b))
    assert a.keys() == b.keys()
    for path, value in a.items():
        np.testing.assert_array_equal(value, b[path], err_msg=str(path))


# ------------------------------------------------------------------------- batch composition
def test_a_train_batch_takes_the_oldest_fragments_with_each_modules_count_a_multiple_of_the_learners():
    queue = [("p0", 5.0), ("p1", 5.0), ("p1", 5.0), ("p0", 5.0), ("p1", 5.0)]
    # p1's third fragment would leave it with an odd count on two learners: it waits for a fourth.
    assert select_train_batch(queue, train_batch_size=20, num_shards=2) == [0, 1, 2, 3]
    # With one learner the oldest fragments that reach train_batch_size env steps make the batch.
    assert select_train_batch(queue, train_batch_size=12, num_shards=1) == [0, 1, 2]


def test_no_train_batch_until_whole_groups_of_fragments_hold_train_batch_size_env_steps():
    queue = [("p0", 10.0), ("p1", 10.0), ("p0", 10.0)]
    assert select_train_batch(queue, train_batch_size=20, num_shards=2) == [0, 2]
    assert select_train_batch(queue, train_batch_size=21, num_shards=2) is None


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_random_queues_make_batches_of_whole_fragment_groups_oldest_first(num_shards):
    rng = np.random.default_rng(num_shards)
    for _ in range(200):
        queue = [(f"p{rng.integers(3)}", float(rng.integers(1, 11)) / 2) for _ in range(rng.integers(1, 30))]
        positions = select_train_batch(queue, train_batch_size=15, num_shards=num_shards)
        if positions is None:
            continue
        assert positions == sorted(positions)
        assert sum(queue[p][1] for p in positions) >= 15
        for module_id in {m for m, _ in queue}:
            in_queue = [p for p, (m, _) in enumerate(queue) if m == module_id]
            chosen = [p for p in positions if queue[p][0] == module_id]
            assert len(chosen) % num_shards == 0
            assert chosen == in_queue[: len(chosen)]  # a module's oldest fragments go first


def test_single_agent_batches_keep_their_size_whole_fragments_a_multiple_of_the_learners():
    # train_batch_size 45 with fragments of 10 rows: 5 fragments, rounded up to 6 on two learners.
    queue = [(DEFAULT_MODULE_ID, 10.0)] * 9
    assert select_train_batch(queue, train_batch_size=45, num_shards=2) == list(range(6))
    assert select_train_batch(queue, train_batch_size=45, num_shards=1) == list(range(5))


# -------------------------------------------------------------------------------- loss masks
def learner_for(config_class):
    spaces = (gym.spaces.Box(-np.inf, np.inf, (4,), np.float32), gym.spaces.Discrete(2))
    training = {"rollout_fragment_length": FRAGMENT_LENGTH, "train_batch_size": 20, "entropy_coeff": 0.01}
    if config_class is APPOConfig:
        training["use_kl_loss"] = True  # its KL term is a mean over rows too
    learner = (
        config_class().rl_module(model_config=SMALL_MODEL).training(**training).debugging(seed=0).build_learner(spaces=spaces)
    )
    learner.build()
    return learner


def fragments(num_fragments, seed, *, real_rows=FRAGMENT_LENGTH):
    """Fragments as a multi-agent env runner sends them: the rows after ``real_rows`` of the last
    fragment are padding (masked out, terminated, reward 0) after a terminated real row."""
    rng = np.random.default_rng(seed)
    rows = num_fragments * FRAGMENT_LENGTH
    batch = {
        Columns.OBS: rng.normal(size=(rows, 4)).astype(np.float32),
        Columns.ACTIONS: rng.integers(0, 2, rows),
        Columns.ACTION_LOGP: np.log(rng.uniform(0.3, 0.7, rows)).astype(np.float32),
        Columns.REWARDS: np.ones(rows, np.float32),
        Columns.TERMINATEDS: rng.random(rows) < 0.1,
        Columns.TRUNCATEDS: np.zeros(rows, bool),
        NEXT_VF_PREDS: rng.normal(size=rows).astype(np.float32),
        Columns.LOSS_MASK: np.ones(rows, bool),
    }
    first_pad = rows - FRAGMENT_LENGTH + real_rows
    batch[Columns.TERMINATEDS][max(first_pad - 1, 0) :] = True
    batch[Columns.LOSS_MASK][first_pad:] = False
    batch[Columns.REWARDS][first_pad:] = 0.0
    batch[NEXT_VF_PREDS][np.flatnonzero(batch[Columns.TERMINATEDS])] = 0.0
    return batch


def with_padding_from(batch, other):
    """``batch`` whose padding rows hold ``other``'s values (anything at all)."""
    pad = ~batch[Columns.LOSS_MASK]
    out = {k: v.copy() for k, v in batch.items()}
    for column in (Columns.OBS, Columns.ACTIONS, Columns.ACTION_LOGP, NEXT_VF_PREDS):
        out[column][pad] = other[column][pad]
    return out


def loss_and_gradients(learner, batch):
    module = learner.module[DEFAULT_MODULE_ID]
    tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
    fwd_out = module.forward_train(tensors)
    loss = learner.compute_loss_for_module(module_id=DEFAULT_MODULE_ID, config=learner.config, batch=tensors, fwd_out=fwd_out)
    gradients = torch.autograd.grad(loss, [p for p in module.parameters() if p.requires_grad])
    return loss.item(), [g.numpy() for g in gradients]


@pytest.mark.parametrize("config_class", [IMPALAConfig, APPOConfig])
def test_whatever_the_padding_rows_hold_the_loss_and_gradients_stay_the_same(config_class):
    learner = learner_for(config_class)
    batch = fragments(3, seed=0, real_rows=4)
    loss, gradients = loss_and_gradients(learner, batch)
    other_loss, other_gradients = loss_and_gradients(learner, with_padding_from(batch, fragments(3, seed=1)))
    assert other_loss == loss
    for a, b in zip(gradients, other_gradients):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config_class", [IMPALAConfig, APPOConfig])
def test_a_fragment_of_padding_trains_nothing_and_a_batch_without_mask_trains_every_row(config_class):
    learner = learner_for(config_class)
    real = fragments(2, seed=0)
    without_mask = {k: v for k, v in real.items() if k != Columns.LOSS_MASK}
    padding = fragments(1, seed=1, real_rows=0)
    padded = {k: np.concatenate([real[k], padding[k]]) for k in real}
    loss, gradients = loss_and_gradients(learner, without_mask)
    padded_loss, padded_gradients = loss_and_gradients(learner, padded)
    assert padded_loss == pytest.approx(loss, rel=1e-5)
    for a, b in zip(gradients, padded_gradients):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ training
def test_appo_trains_one_module_per_agent_and_counts_env_steps_not_agent_rows():
    with two_policies(APPOConfig).build_algo() as algo:
        results = [algo.train() for _ in range(4)]
    last = results[-1]
    assert {"p0", "p1"} <= set(last["learners"])
    module_rows = sum(r["learners"][m].get("num_module_steps_trained", 0) for r in results for m in ("p0", "p1"))
    assert module_rows > 0
    assert set(last["env_runners"]["module_episode_returns_mean"]) == {"p0", "p1"}
    assert isinstance(last["learners"]["p0"]["total_loss"], float)
    # Two agents act in most env steps: the agent rows trained outnumber the env steps they stand for,
    # which is what the lifetime counter counts.
    assert 0 < last["num_env_steps_trained_lifetime"] < module_rows
    assert last["num_env_steps_trained_lifetime"] <= last["num_env_steps_sampled_lifetime"]
    assert last["num_agent_steps_sampled_lifetime"] > last["num_env_steps_sampled_lifetime"]
    assert last["num_env_steps_dropped_lifetime"] == 0
    assert 0 <= last["policy_lag_mean"] <= last["policy_lag_max"]


def test_a_module_left_out_of_policies_to_train_keeps_its_weights_and_optimizer_state_bit_identical():
    # tau < 1 every update: a polyak step of an unchanged network could still move it by rounding.
    config = two_policies(APPOConfig, policies_to_train=["p0"]).training(tau=0.1, target_network_update_freq=1)
    with config.build_algo() as algo:
        before = algo.learner_group.get_state()
        results = [algo.train() for _ in range(3)]
        after = algo.learner_group.get_state()
    assert_bit_identical(module_state(before, "p1"), module_state(after, "p1"))
    assert any(
        not np.array_equal(value, after["learner"]["rl_module"]["p0"][name])
        for name, value in before["learner"]["rl_module"]["p0"].items()
    )
    assert all("p1" not in r["learners"] for r in results)
    assert "p1" in results[-1]["env_runners"]["module_episode_returns_mean"]  # it still acts


def test_policies_to_train_naming_no_module_is_refused_before_sampling_forever():
    with two_policies(IMPALAConfig, policies_to_train=[]).build_algo() as algo:
        with pytest.raises(ValueError, match=r"policies_to_train=\[\] names none of the modules \['p0', 'p1'\]"):
            algo.train()


def test_impala_multi_agent_restores_and_continues(tmp_path):
    config = two_policies(IMPALAConfig)
    with config.build_algo() as algo:
        algo.train()
        algo.save_to_path(tmp_path / "run")
        trained = algo.num_env_steps_trained_lifetime
        algo.restore_from_path(tmp_path / "run")  # what was queued came from the replaced weights
        result = algo.train()
    assert result["num_env_steps_trained_lifetime"] > trained
    assert isinstance(result["num_env_steps_dropped_lifetime"], int)
    assert {"p0", "p1"} <= set(result["learners"])


def test_a_module_removed_mid_run_leaves_the_queue_and_training_goes_on():
    with two_policies(APPOConfig).build_algo() as algo:
        algo.train()
        algo.remove_module("p1", new_agent_to_module_mapping_fn=lambda agent_id, episode, **kwargs: "p0")
        results = [algo.train() for _ in range(2)]
    # The first iteration after the change may report updates that finished before it.
    assert "p1" not in results[-1]["learners"]
    assert results[-1]["learners"]["p0"]["num_module_steps_trained"] > 0
