"""A failed update or restore changes nothing: snapshots, rollback, non-finite numbers, atomic set_state.

Every test compares the learner's whole state (weights, optimizer, counters, shuffling generator,
PPO's KL coefficient) before and after; the two-learner tests run two learners in threads of this
process, joined by a real gloo group, as the LearnerGroup's actors are.
"""

from __future__ import annotations

import copy
import datetime
import threading

import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL, ppo_batch

from dlearner import DEFAULT_MODULE_ID, Columns, PPOConfig, RLModuleSpec
from dlearner.algorithms.ppo import PPOTorchLearner
from dlearner.batch import as_multi_batch, shard_batch
from dlearner.collective import TorchCollective
from dlearner.learner import LearnerSnapshot, NonFiniteUpdateError

OPTIMIZER = f"{DEFAULT_MODULE_ID}_default_optimizer"


def make_learner(env, learner_class=PPOTorchLearner, **training):
    config = (
        PPOConfig()
        .training(learner_class=learner_class, **{"minibatch_size": 64, "num_epochs": 2, **training})
        .rl_module(model_config=SMALL_MODEL)
        .debugging(seed=0)
    )
    learner = config.build_learner(env=env)
    learner.build()
    return learner


def trained_learner(env, **kwargs):
    """A learner after one update, so its optimizer state, counters and KL coefficient are not initial."""
    learner = make_learner(env, **kwargs)
    learner.update(ppo_batch(seed=1), timesteps={"num_env_steps_sampled_lifetime": 256})
    return learner


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


# ---------------------------------------------------------------------------- non-finite updates
EXTREMES = {
    "value_targets near the float32 maximum": (Columns.VALUE_TARGETS, 3e38),
    "action_logp of -1e30": (Columns.ACTION_LOGP, -1e30),
    "advantages near the float32 maximum": (Columns.ADVANTAGES, 3e38),
}


@pytest.mark.parametrize("case", sorted(EXTREMES))
def test_finite_extremes_that_make_the_update_non_finite_are_rejected_and_change_nothing(cartpole, case):
    column, value = EXTREMES[case]
    learner = trained_learner(cartpole)
    before = learner.get_state()
    batch = ppo_batch()
    batch[column][5] = value
    with pytest.raises(NonFiniteUpdateError, match=f"module '{DEFAULT_MODULE_ID}' (is (nan|inf|not finite)|are not finite)"):
        learner.update(batch)
    assert_same_state(learner.get_state(), before)


def test_a_rejected_update_leaves_the_learner_exactly_as_one_that_never_saw_it(cartpole):
    learner, twin = trained_learner(cartpole), trained_learner(cartpole)
    poisoned = ppo_batch()
    poisoned[Columns.VALUE_TARGETS][0] = 3e38
    with pytest.raises(ValueError):
        learner.update(poisoned)
    # Same next update, same results and state: nothing of the rejected one (RNG draws, Adam
    # moments, step counts, learning rate) survived.
    assert learner.update(ppo_batch(seed=2)) == twin.update(ppo_batch(seed=2))
    assert_same_state(learner.get_state(), twin.get_state())


def test_the_error_names_the_gradient_step(cartpole):
    learner = trained_learner(cartpole)
    batch = ppo_batch()
    batch[Columns.ACTION_LOGP][:] = -1e30
    with pytest.raises(NonFiniteUpdateError, match="gradient step 1 of 8"):
        learner.update(batch)


def test_updates_as_one_make_the_same_updates_as_separate_calls(cartpole):
    learner, twin = trained_learner(cartpole), trained_learner(cartpole)
    with learner.updates_as_one():
        results = [learner.update(ppo_batch(seed=seed)) for seed in (2, 3)]
    assert results == [twin.update(ppo_batch(seed=seed)) for seed in (2, 3)]
    assert_same_state(learner.get_state(), twin.get_state())


def test_a_failure_in_updates_as_one_undoes_every_update_of_the_block(cartpole):
    learner = trained_learner(cartpole)
    before = learner.get_state()
    poisoned = ppo_batch(seed=3)
    poisoned[Columns.VALUE_TARGETS][0] = 3e38  # finite in the batch, non-finite in the update
    with pytest.raises(NonFiniteUpdateError):
        with learner.updates_as_one():
            learner.update(ppo_batch(seed=2))  # applied, then undone with the block
            learner.update(poisoned)
    assert_same_state(learner.get_state(), before)
    with pytest.raises(NonFiniteUpdateError, match="gradient step 1 of 8"):
        with learner.updates_as_one():  # a non-finite loss found by the check at the block's end
            bad = ppo_batch()
            bad[Columns.ACTION_LOGP][:] = -1e30
            learner.update(ppo_batch(seed=2))
            learner.update(bad)
    assert_same_state(learner.get_state(), before)


class OverflowingSGD(PPOTorchLearner):
    """Plain SGD with a learning rate so large that one step overflows the weights to inf."""

    def configure_optimizers_for_module(self, module_id, config=None):
        params = self.get_parameters(self.module[module_id])
        self.register_optimizer(module_id=module_id, optimizer=torch.optim.SGD(params, lr=3e38), params=params)

    def compute_loss_for_module(self, **kwargs):
        return 1e3 * super().compute_loss_for_module(**kwargs)  # gradients in the hundreds: finite


def test_weights_an_optimizer_overflows_on_finite_gradients_are_rejected(cartpole):
    # One gradient step, with finite gradients: only the weights after it are non-finite.
    learner = make_learner(cartpole, learner_class=OverflowingSGD, minibatch_size=None, num_epochs=1)
    before = learner.get_state()
    with pytest.raises(NonFiniteUpdateError, match="weight .* of module 'default_policy' is not finite"):
        learner.update(ppo_batch())
    assert_same_state(learner.get_state(), before)


class FailingHook(PPOTorchLearner):
    """Raises at the end of the update, after the KL coefficient and every weight have changed."""

    def after_gradient_based_update(self, *, timesteps):
        super().after_gradient_based_update(timesteps=timesteps)
        raise RuntimeError("hook failed")


def test_an_exception_in_a_hook_rolls_the_update_back(cartpole):
    learner = make_learner(cartpole, learner_class=FailingHook)
    before = learner.get_state()
    with pytest.raises(RuntimeError, match="hook failed"):
        learner.update(ppo_batch(), timesteps={"num_env_steps_sampled_lifetime": 1000})
    assert_same_state(learner.get_state(), before)


def module_spec(env):
    return RLModuleSpec(observation_space=env.observation_space, action_space=env.action_space, model_config=SMALL_MODEL)


def test_a_module_outside_the_batch_is_not_stepped_with_gradients_of_an_earlier_update(cartpole):
    learner = make_learner(cartpole)
    learner.add_module(module_id="other", module_spec=module_spec(cartpole))
    learner.update({DEFAULT_MODULE_ID: ppo_batch(), "other": ppo_batch(seed=1)})
    other_before = learner.module["other"].get_state()
    learner.update({DEFAULT_MODULE_ID: ppo_batch(seed=2)})
    assert_same_state(learner.module["other"].get_state(), other_before)


# ----------------------------------------------------------------------------------- snapshots
def test_restore_snapshot_brings_back_weights_optimizer_counters_rng_and_kl_coefficient(cartpole):
    learner = trained_learner(cartpole)
    before = learner.get_state()
    snapshot = learner.take_snapshot()
    learner.update(ppo_batch(seed=2), timesteps={"num_env_steps_sampled_lifetime": 5000})
    learner.update(ppo_batch(seed=3))
    learner.restore_snapshot(snapshot)
    assert_same_state(learner.get_state(), before)


def test_a_snapshot_can_be_restored_again_after_further_updates(cartpole):
    learner = trained_learner(cartpole)
    snapshot = learner.take_snapshot()
    learner.update(ppo_batch(seed=2))
    learner.restore_snapshot(snapshot)
    first = learner.update(ppo_batch(seed=2))
    learner.restore_snapshot(snapshot)
    assert learner.update(ppo_batch(seed=2)) == first


def test_a_snapshot_is_torch_clones_that_do_not_follow_the_live_weights(cartpole):
    learner = trained_learner(cartpole)
    snapshot = learner.take_snapshot()
    saved = snapshot.modules[DEFAULT_MODULE_ID]
    assert all(isinstance(t, torch.Tensor) for t in saved.values())
    frozen = {name: t.clone() for name, t in saved.items()}
    learner.update(ppo_batch(seed=2))
    assert all(torch.equal(saved[name], frozen[name]) for name in saved)


def test_a_learner_refuses_another_learners_snapshot(cartpole):
    learner, other = trained_learner(cartpole), trained_learner(cartpole)
    before = learner.get_state()
    with pytest.raises(ValueError, match="another learner"):
        learner.restore_snapshot(other.take_snapshot())
    assert_same_state(learner.get_state(), before)


def test_a_snapshot_from_before_add_module_is_refused(cartpole):
    learner = trained_learner(cartpole)
    snapshot = learner.take_snapshot()
    learner.add_module(module_id="other", module_spec=module_spec(cartpole))
    with pytest.raises(ValueError, match="take a new snapshot"):
        learner.restore_snapshot(snapshot)


def test_snapshot_repr_does_not_dump_tensors(cartpole):
    snapshot = trained_learner(cartpole).take_snapshot()
    assert isinstance(snapshot, LearnerSnapshot) and len(repr(snapshot)) < 100


# --------------------------------------------------------------------------- set_state / restore
def good_state(env):
    return trained_learner(env).get_state()


BAD_STATES = {
    "optimizer slot exp_avg_sq missing": (lambda s: s["optimizer"][OPTIMIZER]["state"]["0"].pop("exp_avg_sq"), "exp_avg_sq"),
    "NaN in an optimizer slot": (
        lambda s: s["optimizer"][OPTIMIZER]["state"]["1"]["exp_avg"].flat.__setitem__(0, np.nan),
        "exp_avg",
    ),
    "learning rate missing": (lambda s: s["optimizer"][OPTIMIZER]["param_groups"][0].pop("lr"), "lr"),
    "learning rate NaN": (lambda s: s["optimizer"][OPTIMIZER]["param_groups"][0].__setitem__("lr", float("nan")), "lr"),
    "negative counter": (lambda s: s["learner_state"]["counters"].__setitem__("num_updates", -3), "num_updates"),
    "unknown counter": (lambda s: s["learner_state"]["counters"].__setitem__("bogus", 1), "bogus"),
    "garbage generator state": (lambda s: s["learner_state"]["rng"]["state"].__setitem__("state", "x"), "rng"),
    "KL coefficient NaN": (
        lambda s: s["learner_state"]["curr_kl_coeffs"].__setitem__(DEFAULT_MODULE_ID, float("nan")),
        "curr_kl_coeffs",
    ),
    "KL coefficient a string": (
        lambda s: s["learner_state"]["curr_kl_coeffs"].__setitem__(DEFAULT_MODULE_ID, "0.2"),
        "curr_kl_coeffs",
    ),
    "NaN weight": (lambda s: s["rl_module"][DEFAULT_MODULE_ID]["vf.0.bias"].__setitem__(0, np.nan), "vf.0.bias"),
    "float64 weight beyond float32": (
        lambda s: s["rl_module"][DEFAULT_MODULE_ID].__setitem__("vf.0.bias", np.full(32, 1e300)),
        "vf.0.bias",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_set_state_refuses_a_bad_state_and_changes_nothing(cartpole, case):
    corrupt, expected = BAD_STATES[case]
    state = good_state(cartpole)
    corrupt(state)
    learner = trained_learner(cartpole, lr=1e-2)  # differs from the state in every component
    before = learner.get_state()
    with pytest.raises(ValueError, match=expected):
        learner.set_state(state)
    assert_same_state(learner.get_state(), before)


class FailingSetter(PPOTorchLearner):
    """A subclass whose learner-state setter fails after the weights were already set."""

    def set_learner_state(self, state):
        super().set_learner_state(state)
        raise RuntimeError("setter failed")


def test_set_state_rolls_back_when_applying_fails_after_the_checks(cartpole):
    state = good_state(cartpole)
    learner = trained_learner(cartpole, learner_class=FailingSetter, lr=1e-2)
    before = learner.get_state()
    with pytest.raises(RuntimeError, match="setter failed"):
        learner.set_state(state)
    assert_same_state(learner.get_state(), before)


def test_a_restored_state_keeps_training(cartpole):
    state = good_state(cartpole)
    learner = make_learner(cartpole)
    learner.set_state(copy.deepcopy(state))
    result = learner.update(ppo_batch(seed=2))
    assert np.isfinite(result[DEFAULT_MODULE_ID]["total_loss"])


# ------------------------------------------------------------------------------- two learners
class TwoLearners:
    """Two learners in threads of this process, joined by a real gloo group (as LearnerGroup actors are)."""

    def __init__(self, env, learner_class=PPOTorchLearner, **training):
        self.learners = [make_learner(env, learner_class, **training) for _ in range(2)]
        store = torch.distributed.HashStore()
        self.groups = [None, None]

        def connect(rank):
            options = torch.distributed.ProcessGroupGloo._Options()
            options._devices = [torch.distributed.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
            options._timeout = datetime.timedelta(seconds=30)
            self.groups[rank] = torch.distributed.ProcessGroupGloo(torch.distributed.PrefixStore("rb", store), rank, 2, options)
            self.learners[rank].set_collective(TorchCollective.from_process_group(self.groups[rank]))

        self._run(connect)

    @staticmethod
    def _run(fn):
        outcomes = [None, None]

        def call(rank):
            try:
                outcomes[rank] = ("ok", fn(rank))
            except BaseException as error:  # noqa: BLE001 - reported to the test, which checks every rank's outcome
                outcomes[rank] = ("error", error)

        threads = [threading.Thread(target=call, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert None not in outcomes, "a learner thread hung"
        return outcomes

    def update(self, batch):
        shards = shard_batch(as_multi_batch(batch), 2)
        return self._run(lambda rank: self.learners[rank].update(shards[rank][0], shard=shards[rank][1]))

    def states(self):
        return [learner.get_state() for learner in self.learners]


def test_a_poisoned_shard_makes_both_learners_reject_the_update_and_change_nothing(cartpole):
    pair = TwoLearners(cartpole)
    pair.update(ppo_batch(seed=1))
    before = pair.states()
    batch = ppo_batch()
    batch[Columns.VALUE_TARGETS][200] = 3e38  # in rank 1's shard only
    outcomes = pair.update(batch)
    assert all(kind == "error" and isinstance(error, NonFiniteUpdateError) for kind, error in outcomes), outcomes
    assert "gradients of module 'default_policy' are not finite" in str(outcomes[0][1])
    assert "summed over all 2 learners" in str(outcomes[0][1])
    for learner, state in zip(pair.learners, before):
        assert_same_state(learner.get_state(), state)
    # Both still in step: the next update runs and leaves them identical.
    assert all(kind == "ok" for kind, _ in pair.update(ppo_batch(seed=2)))
    assert_same_state(*pair.states())


class InfiniteLossOnRankOne(PPOTorchLearner):
    """A loss that is infinite on rank 1 only, by a constant: its gradients stay finite."""

    def compute_loss_for_module(self, **kwargs):
        loss = super().compute_loss_for_module(**kwargs)
        return loss + float("inf") if self._collective.rank == 1 else loss


def test_a_non_finite_loss_on_one_learner_is_rejected_by_all_even_with_finite_gradients(cartpole):
    pair = TwoLearners(cartpole, learner_class=InfiniteLossOnRankOne)
    before = pair.states()
    outcomes = pair.update(ppo_batch())
    for kind, error in outcomes:
        assert kind == "error" and isinstance(error, NonFiniteUpdateError)
        assert "loss of module(s) 'default_policy' (on 1 of 2 learners)" in str(error)
    for learner, state in zip(pair.learners, before):
        assert_same_state(learner.get_state(), state)


def test_a_collective_that_fails_mid_update_leaves_both_learners_as_before_and_they_restore_without_it(cartpole):
    pair = TwoLearners(cartpole)
    pair.update(ppo_batch(seed=1))
    before = pair.states()
    snapshots = [learner.take_snapshot() for learner in pair.learners]

    def update_then_lose_the_group(rank):
        learner = pair.learners[rank]
        shards = shard_batch(as_multi_batch(ppo_batch()), 2)
        if rank == 1:
            # Rank 1 leaves the group at once: rank 0's next all-reduce fails ("connection closed").
            learner._collective.close()
            pair.groups[1] = None
        return learner.update(shards[rank][0], shard=shards[rank][1])

    outcomes = pair._run(update_then_lose_the_group)
    assert [kind for kind, _ in outcomes] == ["error", "error"], outcomes
    for learner, state, snapshot in zip(pair.learners, before, snapshots):
        assert_same_state(learner.get_state(), state)
        learner.set_collective(None)  # the process group is gone for good
        learner.restore_snapshot(snapshot)
        assert_same_state(learner.get_state(), state)
