"""PPO's loss, diagnostics, KL adaptation and GAE, and behaviour cloning, checked against hand computations."""

from __future__ import annotations

import datetime
import importlib.util
import pathlib
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MODEL, ppo_batch

from dlearner import DEFAULT_MODULE_ID, AlgorithmConfig, BCConfig, Columns, PPOConfig
from dlearner.algorithms.ppo import compute_gae
from dlearner.batch import as_multi_batch, shard_batch
from dlearner.collective import TorchCollective

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build(config, env):
    learner = config.rl_module(model_config=SMALL_MODEL).debugging(seed=0).build_learner(env=env)
    learner.build()
    return learner


def test_ppo_loss_matches_the_paper_equations(cartpole, batch):
    config = PPOConfig().training(
        clip_param=0.2, vf_clip_param=0.5, entropy_coeff=0.01, vf_loss_coeff=0.5, kl_coeff=0.3, minibatch_size=None, num_epochs=1
    )
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


def on_policy_batch(learner, rows: int = 256, seed: int = 0):
    """A PPO batch sampled by the learner's own policy (ratio exactly 1 before the first step), and
    the module's value predictions on it."""
    batch = ppo_batch(rows, seed)
    with torch.no_grad():
        out = learner.module[DEFAULT_MODULE_ID].forward_train({Columns.OBS: torch.from_numpy(batch[Columns.OBS])})
    logits = out[Columns.ACTION_DIST_INPUTS].numpy()
    logp = F.log_softmax(torch.from_numpy(logits), -1).numpy()
    batch[Columns.ACTION_DIST_INPUTS] = logits
    batch[Columns.ACTION_LOGP] = logp[np.arange(rows), batch[Columns.ACTIONS]]
    return batch, out[Columns.VF_PREDS].numpy()


def numpy_explained_variance(targets, predictions) -> float:
    """As CleanRL and Stable-Baselines3 compute it."""
    return float(1.0 - np.var(targets - predictions) / np.var(targets))


def test_ppo_reports_no_clipped_rows_on_the_first_step_where_the_ratio_is_one(cartpole):
    learner = build(PPOConfig().training(minibatch_size=None, num_epochs=1), cartpole)
    batch, _ = on_policy_batch(learner)
    assert learner.update(batch)[DEFAULT_MODULE_ID]["clip_fraction"] == 0.0


def test_ppo_clip_fraction_is_the_share_of_rows_whose_ratio_left_the_clip_range(cartpole):
    # A learning rate too small to move the policy keeps every ratio where the batch puts it, over
    # 8 minibatches and 2 epochs: the fraction is over all rows, whatever the minibatching.
    config = PPOConfig().training(clip_param=0.2, lr=1e-12, minibatch_size=32, num_epochs=2)
    learner = build(config, cartpole)
    batch, _ = on_policy_batch(learner)
    batch[Columns.ACTION_LOGP][:64] += np.log(2.0)  # ratio 0.5: below 1 - 0.2, clipped
    batch[Columns.ACTION_LOGP][64:96] -= np.log(1.1)  # ratio 1.1: inside the range, not clipped
    assert learner.update(batch)[DEFAULT_MODULE_ID]["clip_fraction"] == pytest.approx(64 / 256)


def test_ppo_explained_variance_equals_numpy_on_a_one_minibatch_update(cartpole):
    learner = build(PPOConfig().training(minibatch_size=None, num_epochs=1), cartpole)
    batch, values = on_policy_batch(learner)
    result = learner.update(batch)[DEFAULT_MODULE_ID]
    expected = numpy_explained_variance(batch[Columns.VALUE_TARGETS], values)
    assert result["vf_explained_var"] == pytest.approx(expected, rel=1e-5)
    assert not [name for name in result if name.startswith("_")]  # its ingredients are not reported


def test_ppo_explained_variance_is_pooled_over_all_rows_not_averaged_per_minibatch(cartpole):
    # With the weights (nearly) fixed, 8 minibatches of 32 rows must report the explained variance of
    # the whole batch; a mean of per-minibatch ratios would not.
    learner = build(PPOConfig().training(lr=1e-12, minibatch_size=32, num_epochs=1), cartpole)
    batch, values = on_policy_batch(learner)
    reported = learner.update(batch)[DEFAULT_MODULE_ID]["vf_explained_var"]
    assert reported == pytest.approx(numpy_explained_variance(batch[Columns.VALUE_TARGETS], values), rel=1e-5)


def test_ppo_explained_variance_is_nan_when_the_targets_do_not_vary(cartpole):
    learner = build(PPOConfig().training(minibatch_size=None, num_epochs=1), cartpole)
    batch, _ = on_policy_batch(learner)
    batch[Columns.VALUE_TARGETS][:] = 1.5
    assert np.isnan(learner.update(batch)[DEFAULT_MODULE_ID]["vf_explained_var"])


def update_on_two_learners(config, env, batch):
    """One update of ``batch`` split over two learners in threads of this process, joined by a gloo group."""
    store = torch.distributed.HashStore()
    shards = shard_batch(as_multi_batch(batch), 2)
    learners = [build(config, env) for _ in shards]
    results = [None, None]

    def run(rank):
        options = torch.distributed.ProcessGroupGloo._Options()
        options._devices = [torch.distributed.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        options._timeout = datetime.timedelta(seconds=60)
        group = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("test", store), rank, 2, options)
        learners[rank].set_collective(TorchCollective.from_process_group(group))
        shard, layout = shards[rank]
        results[rank] = learners[rank].update(shard, shard=layout)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert None not in results, "a learner thread failed"
    return results


def test_ppo_diagnostics_on_two_learners_equal_those_of_one_learner_on_the_whole_batch(cartpole):
    # The batch's behaviour logits are not the module's, so a small clip range clips some rows.
    config = PPOConfig().training(clip_param=0.05, minibatch_size=64, num_epochs=2)
    batch = ppo_batch(250)
    expected = build(config, cartpole).update(batch)[DEFAULT_MODULE_ID]
    assert 0.0 < expected["clip_fraction"] < 1.0
    for result in update_on_two_learners(config, cartpole, batch):
        for name in ("clip_fraction", "vf_explained_var"):
            assert result[DEFAULT_MODULE_ID][name] == pytest.approx(expected[name], abs=1e-6), name


def test_ppo_config_has_no_settings_that_nothing_reads():
    config = PPOConfig()
    assert not hasattr(config, "use_gae") and not hasattr(config, "use_critic")
    with pytest.raises(TypeError, match="use_gae"):
        config.training(use_gae=False)


def test_a_stored_config_with_the_retired_use_gae_and_use_critic_still_loads():
    # Checkpoints written before these settings were removed store them; GAE and the critic were
    # always on, so dropping them restores exactly what those runs trained with.
    stored = {**PPOConfig().training(lr=5e-4).to_dict(), "use_gae": True, "use_critic": False}
    config = AlgorithmConfig.from_dict(stored)
    assert isinstance(config, PPOConfig) and config.lr == 5e-4
    assert not hasattr(config, "use_gae") and not hasattr(config, "use_critic")


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
    d3 = 1.0 + gamma * 10.0 - 0.2  # bootstrapped from the final observation's value
    d2 = 1.0 + gamma * 0.2 - 0.3
    d1 = 1.0 - 0.4  # terminal: no future value (the 99 is ignored)
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
