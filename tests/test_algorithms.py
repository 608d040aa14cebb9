"""PPO's loss, KL adaptation and GAE, and behaviour cloning, checked against hand computations."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_MODEL, ppo_batch
from dlearner import DEFAULT_MODULE_ID, BCConfig, Columns, PPOConfig
from dlearner.algorithms.ppo import compute_gae

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build(config, env):
    learner = config.rl_module(model_config=SMALL_MODEL).debugging(seed=0).build_learner(env=env)
    learner.build()
    return learner


def test_ppo_loss_matches_the_paper_equations(cartpole, batch):
    config = PPOConfig().training(clip_param=0.2, vf_clip_param=0.5, entropy_coeff=0.01, vf_loss_coeff=0.5,
                                  kl_coeff=0.3, minibatch_size=None, num_epochs=1)
    learner = build(config, cartpole)
    module = learner.module[DEFAULT_MODULE_ID]
    t = {k: torch.as_tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        out = module.forward_train(t)
        logp_all = F.log_softmax(out[Columns.ACTION_DIST_INPUTS], -1)
        logp = logp_all.gather(-1, t[Columns.ACTIONS].long()[:, None])[:, 0]
        ratio = torch.exp(logp - t[Columns.ACTION_LOGP])
        adv = t[Columns.ADVANTAGES]
        policy = -torch.min(adv * ratio, adv * ratio.clamp(0.8, 1.2)).mean()
        vf = ((out[Columns.VF_PREDS] - t[Columns.VALUE_TARGETS]) ** 2).clamp(0, 0.5).mean()
        entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        old = F.log_softmax(t[Columns.ACTION_DIST_INPUTS], -1)
        kl = (old.exp() * (old - logp_all)).sum(-1).mean()
        expected = policy + 0.5 * vf - 0.01 * entropy + 0.3 * kl
    result = learner.update(batch)[DEFAULT_MODULE_ID]
    assert result["total_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert result["policy_loss"] == pytest.approx(float(policy), rel=1e-5)
    assert result["vf_loss"] == pytest.approx(float(vf), rel=1e-5)
    assert result["entropy"] == pytest.approx(float(entropy), rel=1e-5)
    assert result["mean_kl_loss"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)


def test_ppo_honours_the_loss_mask(cartpole, batch):
    masked = dict(batch)
    masked[Columns.LOSS_MASK] = np.arange(len(batch[Columns.OBS])) < 100
    config = PPOConfig().training(minibatch_size=None, num_epochs=1, use_kl_loss=False)
    full = build(config, cartpole).update({k: v[:100] for k, v in batch.items()})
    with_mask = build(config, cartpole).update(masked)
    assert with_mask[DEFAULT_MODULE_ID]["total_loss"] == pytest.approx(full[DEFAULT_MODULE_ID]["total_loss"], rel=1e-5)


@pytest.mark.parametrize("target,expected_factor", [(1e-6, 1.5), (1e3, 0.5)])
def test_kl_coefficient_adapts_after_each_update(cartpole, target, expected_factor):
    # A tiny target makes any KL "too high" (x1.5); a huge one makes it "too low" (x0.5).
    config = PPOConfig().training(kl_coeff=0.2, kl_target=target, lr=1e-2)
    learner = build(config, cartpole)
    first = learner.update(ppo_batch())[DEFAULT_MODULE_ID]["curr_kl_coeff"]
    second = learner.update(ppo_batch(seed=1))[DEFAULT_MODULE_ID]["curr_kl_coeff"]
    assert first == pytest.approx(0.2 * expected_factor)
    assert second == pytest.approx(0.2 * expected_factor**2)
    assert learner.get_state()["learner_state"]["curr_kl_coeffs"][DEFAULT_MODULE_ID] == pytest.approx(second)


def test_kl_coefficient_is_restored_with_the_state(cartpole, batch):
    config = PPOConfig().training(kl_target=1e-6, lr=1e-2)
    learner = build(config, cartpole)
    learner.update(batch)
    twin = build(config, cartpole)
    twin.set_state(learner.get_state())
    assert twin.curr_kl_coeffs == learner.curr_kl_coeffs


def test_gae_bootstraps_on_truncation_but_not_on_termination():
    rewards = np.array([1.0, 1.0, 1.0, 1.0])
    values = np.array([0.5, 0.4, 0.3, 0.2])
    # Step 1 terminates; step 3 is truncated by a time limit (its final observation is worth 10).
    next_values = np.array([0.4, 99.0, 0.2, 10.0])
    terminateds = np.array([False, True, False, False])
    truncateds = np.array([False, False, False, True])
    gamma, lam = 0.9, 0.8
    adv, targets = compute_gae(rewards, values, next_values, terminateds, truncateds, gamma=gamma, lambda_=lam)
    d3 = 1.0 + gamma * 10.0 - 0.2           # bootstrapped from the final observation's value
    d2 = 1.0 + gamma * 0.2 - 0.3
    d1 = 1.0 - 0.4                          # terminal: no future value (the 99 is ignored)
    d0 = 1.0 + gamma * 0.4 - 0.5
    expected = [d0 + gamma * lam * d1, d1, d2 + gamma * lam * d3, d3]
    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    np.testing.assert_allclose(targets, np.array(expected) + values, rtol=1e-6)


def test_gae_works_on_time_major_vector_env_arrays():
    rng = np.random.default_rng(0)
    shape = (5, 3)
    args = [rng.normal(size=shape) for _ in range(3)] + [rng.random(shape) < 0.2, rng.random(shape) < 0.1]
    adv, _ = compute_gae(*args, gamma=0.99, lambda_=0.95)
    for env in range(3):
        single, _ = compute_gae(*[a[:, env] for a in args], gamma=0.99, lambda_=0.95)
        np.testing.assert_allclose(adv[:, env], single, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        compute_gae(args[0], args[1][:3], *args[2:], gamma=0.99, lambda_=0.95)


def test_bc_learner_imitates_a_fixed_expert(cartpole):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(2048, 4)).astype(np.float32)
    expert = (obs @ np.array([0.3, -1.0, 2.0, 0.5]) > 0).astype(np.int64)
    learner = build(BCConfig().training(lr=3e-3, minibatch_size=256, num_epochs=5), cartpole)
    for _ in range(20):
        learner.update({Columns.OBS: obs, Columns.ACTIONS: expert})
    test_obs = rng.normal(size=(1000, 4)).astype(np.float32)
    with torch.no_grad():
        logits = learner.module[DEFAULT_MODULE_ID].forward_inference({Columns.OBS: torch.from_numpy(test_obs)})
    accuracy = (logits[Columns.ACTION_DIST_INPUTS].argmax(-1).numpy() == (test_obs @ np.array([0.3, -1.0, 2.0, 0.5]) > 0)).mean()
    assert accuracy >= 0.95


def test_bc_needs_only_observations_and_actions(cartpole, batch):
    learner = build(BCConfig(), cartpole)
    with pytest.raises(ValueError, match="actions"):
        learner.update({Columns.OBS: batch[Columns.OBS]})


def test_custom_learner_example_reaches_95_percent_accuracy():
    spec = importlib.util.spec_from_file_location("custom_learner_bc", ROOT / "examples" / "custom_learner_bc.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(num_updates=60) >= 0.95
