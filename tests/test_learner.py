"""The Learner as users drive it: updates, results, state, modules, hooks, clipping, schedules, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL, ppo_batch

from dlearner import (
    ALL_MODULES,
    COMPONENT_OPTIMIZER,
    COMPONENT_RL_MODULE,
    DEFAULT_MODULE_ID,
    Columns,
    MultiRLModuleSpec,
    PPOConfig,
    RLModuleSpec,
)
from dlearner.algorithms.ppo import PPOTorchLearner


def make_learner(env, **training):
    config = (
        PPOConfig()
        .training(**{"minibatch_size": 64, "num_epochs": 2, **training})
        .rl_module(model_config=SMALL_MODEL)
        .debugging(seed=0)
    )
    learner = config.build_learner(env=env)
    learner.build()
    return learner


def weights(learner, module_id=DEFAULT_MODULE_ID):
    return learner.module[module_id].get_state()


def assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_arrays(a[key], b[key])
        elif isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_update_returns_plain_float_results_per_module(cartpole, batch):
    learner = make_learner(cartpole)
    result = learner.update(batch, timesteps={"num_env_steps_sampled_lifetime": 256})
    metrics = result[DEFAULT_MODULE_ID]
    for key in (
        "total_loss",
        "policy_loss",
        "vf_loss",
        "entropy",
        "mean_kl_loss",
        "curr_kl_coeff",
        "default_optimizer_learning_rate",
    ):
        assert type(metrics[key]) is float, key
    assert result[ALL_MODULES]["num_env_steps_trained"] == 256 * 2
    json.dumps(result)  # JSON-serialisable as promised


def test_update_changes_weights_and_lowers_the_loss_on_a_fixed_batch(cartpole, batch):
    learner = make_learner(cartpole, lr=1e-3)
    before = weights(learner)
    first = learner.update(batch)[DEFAULT_MODULE_ID]["total_loss"]
    for _ in range(20):
        last = learner.update(batch)[DEFAULT_MODULE_ID]["total_loss"]
    assert any(not np.array_equal(before[k], v) for k, v in weights(learner).items())
    assert last < first


def test_torch_tensors_are_accepted_as_batch_columns(cartpole, batch):
    learner = make_learner(cartpole)
    result = learner.update({k: torch.as_tensor(v) for k, v in batch.items()})
    assert np.isfinite(result[DEFAULT_MODULE_ID]["total_loss"])


def test_state_round_trips_exactly_and_the_next_update_matches(cartpole, batch):
    learner = make_learner(cartpole)
    learner.update(batch)
    state = learner.get_state()
    twin = make_learner(cartpole)
    twin.set_state(state)
    assert_same_arrays(twin.get_state(), state)
    # Same state, same batch: the same update (the shuffling generator is part of the state).
    assert learner.update(batch) == twin.update(batch)
    assert_same_arrays(learner.get_state(), twin.get_state())


def as_decimal_strings(tree):
    """A generator state as learners wrote it before big ints were left to the checkpoint encoding."""
    return {
        k: as_decimal_strings(v) if isinstance(v, dict) else str(v) if isinstance(v, int) and not isinstance(v, bool) else v
        for k, v in tree.items()
    }


def test_generator_state_holds_its_128_bit_words_as_ints_and_checkpoints_keep_them_exact(cartpole, batch, tmp_path):
    learner = make_learner(cartpole)
    learner.update(batch)
    state = learner.get_state()
    words = state["learner_state"]["rng"]["state"]["state"]
    assert all(type(w) is int for w in words.values()) and max(words.values()) > 2**53
    path = learner.save_to_path(str(tmp_path / "learner"))
    # One policy for big ints: the checkpoint encoding's exact {"$int": "..."} (never a float).
    assert any('{"$int":' in f.read_text() for f in (tmp_path / "learner").rglob("zarr.json"))
    twin = make_learner(cartpole)
    twin.restore_from_path(path)
    assert twin.get_state()["learner_state"] == state["learner_state"]
    assert learner.update(batch) == twin.update(batch)


@pytest.mark.parametrize("where", ["in memory", "checkpoint"])
def test_a_generator_state_written_as_decimal_strings_by_older_versions_still_restores(cartpole, batch, tmp_path, where):
    from dlearner.checkpoint import save_learner_state

    learner = make_learner(cartpole)
    learner.update(batch)
    state = learner.get_state()
    old = {**state, "learner_state": {**state["learner_state"], "rng": as_decimal_strings(state["learner_state"]["rng"])}}
    assert isinstance(old["learner_state"]["rng"]["state"]["state"]["state"], str)
    twin = make_learner(cartpole)
    if where == "in memory":
        twin.set_state(old)
    else:
        path = save_learner_state(
            old, str(tmp_path / "old"), learner_class=type(learner), config=learner.config, module_spec=learner.module_spec
        )
        twin.restore_from_path(path)
    assert twin.get_state()["learner_state"] == state["learner_state"]  # ints again
    assert learner.update(batch) == twin.update(batch)


def test_state_is_a_snapshot_of_numpy_copies(cartpole, batch):
    learner = make_learner(cartpole)
    state = learner.get_state()
    params = state[COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]
    assert all(isinstance(v, np.ndarray) for v in params.values())
    frozen = {k: v.copy() for k, v in params.items()}
    learner.update(batch)
    assert_same_arrays(params, frozen)


def test_components_select_parts_of_the_state(cartpole):
    learner = make_learner(cartpole)
    only_module = learner.get_state(components=COMPONENT_RL_MODULE)
    assert list(only_module) == [COMPONENT_RL_MODULE]
    by_path = learner.get_state(components=f"{COMPONENT_RL_MODULE}/{DEFAULT_MODULE_ID}")
    assert list(by_path[COMPONENT_RL_MODULE]) == [DEFAULT_MODULE_ID]
    both = learner.get_state(components=[COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER])
    assert set(both) == {COMPONENT_RL_MODULE, COMPONENT_OPTIMIZER}
    assert COMPONENT_OPTIMIZER not in learner.get_state(not_components=COMPONENT_OPTIMIZER)
    with pytest.raises(ValueError, match="no_such"):
        learner.get_state(components="rl_module/no_such")


def test_module_set_state_leaves_the_optimizer_untouched(cartpole, batch):
    learner = make_learner(cartpole)
    learner.update(batch)
    optimizer_before = learner.get_state(components=COMPONENT_OPTIMIZER)
    other = make_learner(cartpole)
    new_weights = other.get_state(components=COMPONENT_RL_MODULE)[COMPONENT_RL_MODULE]
    learner.module.set_state(new_weights)
    assert_same_arrays(learner.get_state(components=COMPONENT_OPTIMIZER), optimizer_before)
    assert_same_arrays(learner.module.get_state(), new_weights)


def test_set_state_loads_optimizer_state_exactly_whatever_the_arrays_layout(cartpole, batch):
    # Arrays from a checkpoint, a pickle or another library may be read-only, strided or big-endian;
    # the optimizer takes their values (and owns them: changing the arrays later changes nothing).
    source = make_learner(cartpole)
    source.update(batch)
    state = source.get_state()
    learner = make_learner(cartpole)
    learner.update(batch)  # the optimizer has tensors for every slot already
    slots = state[COMPONENT_OPTIMIZER]["default_policy_default_optimizer"]["state"]
    first, second = slots["0"], slots["1"]
    first["exp_avg"] = first["exp_avg"].astype(first["exp_avg"].dtype.newbyteorder(">"))
    first["exp_avg_sq"] = np.asfortranarray(first["exp_avg_sq"])
    second["exp_avg"].flags.writeable = False
    learner.set_state(state)
    assert_same_arrays(learner.get_state(), source.get_state())
    slots["2"]["exp_avg"][...] = 7.0  # an array the learner took: it keeps the values, not the array
    assert_same_arrays(learner.get_state(), source.get_state())


def test_restoring_again_keeps_the_optimizers_tensors(cartpole, batch):
    # A restore copies into the tensors an optimizer has (no new allocation; the update's rollback
    # snapshot keeps reusing its buffers), and the learner then trains exactly like the source.
    source = make_learner(cartpole)
    source.update(batch)
    learner = make_learner(cartpole)
    learner.update(batch, timesteps={"num_env_steps_sampled_lifetime": 7})
    tensors = [t for s in learner.get_optimizer().state.values() for t in s.values()]
    learner.set_state(source.get_state())
    assert all(a is b for a, b in zip([t for s in learner.get_optimizer().state.values() for t in s.values()], tensors))
    assert_same_arrays(learner.get_state(), source.get_state())
    source.update(batch)
    learner.update(batch)
    assert_same_arrays(learner.get_state(), source.get_state())


def test_set_state_with_another_architecture_fails_and_changes_nothing(cartpole):
    learner = make_learner(cartpole)
    before = learner.get_state()
    bigger = PPOConfig().rl_module(model_config={"fcnet_hiddens": [64]}).build_learner(env=cartpole)
    bigger.build()
    with pytest.raises(ValueError, match="shape|missing"):
        learner.set_state(bigger.get_state())
    assert_same_arrays(learner.get_state(), before)


def test_add_and_remove_modules(cartpole, batch):
    learner = make_learner(cartpole)
    spec = RLModuleSpec(
        observation_space=cartpole.observation_space, action_space=cartpole.action_space, model_config={"fcnet_hiddens": [8]}
    )
    learner.add_module(module_id="other", module_spec=spec)
    assert set(learner.module.keys()) == {DEFAULT_MODULE_ID, "other"}
    assert [name for name, _ in learner.get_optimizers_for_module("other")] == ["default_optimizer"]
    result = learner.update({"other": batch})
    assert "other" in result and DEFAULT_MODULE_ID not in result
    learner.remove_module("other")
    assert list(learner.module.keys()) == [DEFAULT_MODULE_ID]
    assert learner.get_optimizers_for_module("other") == []
    with pytest.raises(ValueError, match="other"):
        learner.update({"other": batch})


def test_batches_are_checked_against_the_modules_the_learner_has_now(cartpole, batch):
    import gymnasium as gym

    learner = make_learner(cartpole)
    learner.update(batch)
    narrow = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    learner.add_module(module_id="other", module_spec=RLModuleSpec(observation_space=narrow, action_space=cartpole.action_space))
    with pytest.raises(ValueError, match="obs"):
        learner.update({"other": batch})  # CartPole's 4 numbers per observation: not this module's 3
    learner.remove_module("other")
    spec = RLModuleSpec(observation_space=cartpole.observation_space, action_space=cartpole.action_space)
    learner.add_module(module_id="other", module_spec=spec)  # the same id, other spaces
    assert "other" in learner.update({"other": batch})


def test_a_multi_module_batch_updates_only_the_modules_present(cartpole, batch):
    spec = RLModuleSpec(model_config=SMALL_MODEL)
    config = PPOConfig().rl_module(rl_module_spec=MultiRLModuleSpec(rl_module_specs={"a": spec, "b": spec, "c": spec}))
    learner = config.training(minibatch_size=64).build_learner(env=cartpole)
    learner.build()
    before = learner.module.get_state()
    result = learner.update({"a": batch, "b": ppo_batch(rows=50, seed=1)})
    after = learner.module.get_state()
    assert {"a", "b"} <= set(result) and "c" not in result
    for module_id, changed in (("a", True), ("b", True), ("c", False)):
        differs = any(not np.array_equal(before[module_id][k], after[module_id][k]) for k in before[module_id])
        assert differs is changed, module_id


class RecordingLearner(PPOTorchLearner):
    def build(self):
        super().build()
        self.calls = []

    def before_gradient_based_update(self, *, timesteps):
        super().before_gradient_based_update(timesteps=timesteps)
        self.calls.append(("before", dict(timesteps)))

    def compute_loss_for_module(self, **kwargs):
        self.calls.append(("loss", kwargs["module_id"]))
        return super().compute_loss_for_module(**kwargs)

    def after_gradient_based_update(self, *, timesteps):
        super().after_gradient_based_update(timesteps=timesteps)
        self.calls.append(("after", dict(timesteps)))


def test_hooks_run_once_per_update_in_order_with_the_callers_timesteps(cartpole, batch):
    config = (
        PPOConfig().training(learner_class=RecordingLearner, minibatch_size=64, num_epochs=2).rl_module(model_config=SMALL_MODEL)
    )
    learner = config.build_learner(env=cartpole)
    learner.build()
    timesteps = {"num_env_steps_sampled_lifetime": 1234, "custom": 7}
    learner.update(batch, timesteps=timesteps)
    kinds = [c[0] for c in learner.calls]
    assert kinds == ["before"] + ["loss"] * 8 + ["after"]  # 256 rows / 64 = 4 steps x 2 epochs
    assert learner.calls[0][1] == timesteps and learner.calls[-1][1] == timesteps


@pytest.mark.parametrize("clip_by", ["global_norm", "norm", "value"])
def test_gradient_clipping_limits_the_gradients(cartpole, batch, clip_by):
    learner = make_learner(cartpole, grad_clip=1e-3, grad_clip_by=clip_by)
    seen = []

    original = learner.apply_gradients

    def spy(gradients):
        seen.append(gradients)
        original(gradients)

    learner.apply_gradients = spy
    result = learner.update(batch)
    for gradients in seen:
        grads = list(gradients.values())
        if clip_by == "global_norm":
            assert torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])) <= 1e-3 * 1.0001
        elif clip_by == "norm":
            assert all(torch.linalg.vector_norm(g) <= 1e-3 * 1.0001 for g in grads)
        else:
            assert all(g.abs().max() <= 1e-3 for g in grads)
    # The pre-clipping norm is reported, and it was far above the limit.
    assert result[DEFAULT_MODULE_ID]["gradients_default_optimizer_global_norm"] > 1e-2


def test_learning_rate_schedule_follows_the_sampled_timesteps(cartpole, batch):
    learner = make_learner(cartpole, lr=[[0, 1e-3], [1000, 1e-4]])
    key = "default_optimizer_learning_rate"
    rates = [
        learner.update(batch, timesteps={"num_env_steps_sampled_lifetime": t})[DEFAULT_MODULE_ID][key]
        for t in (0, 500, 1000, 5000)
    ]
    assert rates == pytest.approx([1e-3, 5.5e-4, 1e-4, 1e-4])


def test_register_optimizer_accepts_several_optimizers_and_schedules(cartpole, batch):
    class TwoOptimizers(PPOTorchLearner):
        def configure_optimizers_for_module(self, module_id, config=None):
            module = self.module[module_id]
            pi, vf = list(module.pi.parameters()), list(module.vf.parameters())
            self.register_optimizer(
                module_id=module_id,
                optimizer_name="policy",
                optimizer=torch.optim.Adam(pi),
                params=pi,
                lr_or_lr_schedule=[[0, 1e-3], [100, 1e-5]],
            )
            self.register_optimizer(
                module_id=module_id,
                optimizer_name="value",
                optimizer=torch.optim.SGD(vf, lr=0.1),
                params=vf,
                lr_or_lr_schedule=0.01,
            )

    learner = PPOConfig().training(learner_class=TwoOptimizers).rl_module(model_config=SMALL_MODEL).build_learner(env=cartpole)
    learner.build()
    result = learner.update(batch, timesteps={"num_env_steps_sampled_lifetime": 100})[DEFAULT_MODULE_ID]
    assert result["policy_learning_rate"] == pytest.approx(1e-5)
    assert result["value_learning_rate"] == pytest.approx(0.01)
    assert [n for n, _ in learner.get_optimizers_for_module(DEFAULT_MODULE_ID)] == ["policy", "value"]
    assert isinstance(learner.get_optimizer(DEFAULT_MODULE_ID, "value"), torch.optim.SGD)
    assert set(learner.get_state()[COMPONENT_OPTIMIZER]) == {"default_policy_policy", "default_policy_value"}


def test_custom_metrics_appear_under_their_module(cartpole, batch):
    class Metered(PPOTorchLearner):
        def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
            self.metrics.log_value((module_id, "mean_advantage"), batch[Columns.ADVANTAGES].mean())
            return super().compute_loss_for_module(module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    config = PPOConfig().training(learner_class=Metered, minibatch_size=None, num_epochs=1).rl_module(model_config=SMALL_MODEL)
    learner = config.build_learner(env=cartpole)
    learner.build()
    result = learner.update(batch)
    assert result[DEFAULT_MODULE_ID]["mean_advantage"] == pytest.approx(float(batch[Columns.ADVANTAGES].mean()), rel=1e-5)


BAD_BATCHES = {
    "missing column": (lambda b: b.pop(Columns.ADVANTAGES), "advantages"),
    "unknown column": (lambda b: b.update(bogus=np.zeros(256)), "bogus"),
    "mismatched lengths": (lambda b: b.update(actions=b[Columns.ACTIONS][:100]), "lengths"),
    "wrong obs shape": (lambda b: b.update(obs=np.zeros((256, 5), np.float32)), "obs"),
    "non-finite values": (lambda b: b[Columns.VALUE_TARGETS].__setitem__(3, np.nan), "value_targets"),
    "wrong action dtype": (lambda b: b.update(actions=b[Columns.ACTIONS].astype(np.float32)), "actions"),
    "action out of range": (lambda b: b[Columns.ACTIONS].__setitem__(0, 7), "actions"),
    "empty": (lambda b: [b.update({k: v[:0]}) for k, v in list(b.items())], "0 rows"),
    # Checked in float32, the dtype the learner computes in: finite in float64, inf in float32.
    "float64 beyond float32": (lambda b: b.update(value_targets=np.full(256, 1e300)), "value_targets.*float32"),
    "masked array hiding a NaN": (
        lambda b: b.update(advantages=np.ma.masked_invalid(np.where(np.arange(256) == 3, np.nan, b[Columns.ADVANTAGES]))),
        "advantages.*masked",
    ),
    "integer action_dist_inputs": (
        lambda b: b.update(action_dist_inputs=b[Columns.ACTION_DIST_INPUTS].astype(np.int64)),
        "action_dist_inputs.*floating",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_batches_raise_naming_the_problem_and_change_nothing(cartpole, case):
    learner = make_learner(cartpole)
    learner.update(ppo_batch())
    before = learner.get_state()
    corrupt, expected = BAD_BATCHES[case]
    bad = ppo_batch()
    corrupt(bad)
    with pytest.raises((ValueError, TypeError), match=expected):
        learner.update(bad)
    assert_same_arrays(learner.get_state(), before)  # weights, optimizer, counters and RNG


def test_unknown_module_and_malformed_batches_raise(cartpole, batch):
    learner = make_learner(cartpole)
    with pytest.raises(ValueError, match="nobody"):
        learner.update({"nobody": batch})
    with pytest.raises(ValueError, match="mixes"):
        learner.update({DEFAULT_MODULE_ID: batch, Columns.OBS: batch[Columns.OBS]})
    with pytest.raises(ValueError, match="empty"):
        learner.update({})
    with pytest.raises(TypeError):
        learner.update([1, 2, 3])


def test_learner_must_be_built_first(cartpole):
    learner = PPOConfig().build_learner(env=cartpole)
    with pytest.raises(RuntimeError, match="build"):
        learner.update(ppo_batch())


def test_one_torch_thread_per_learner_by_default(cartpole):
    torch.set_num_threads(2)
    make_learner(cartpole)
    assert torch.get_num_threads() == 1


def test_a_shard_of_a_larger_batch_needs_the_other_learners(cartpole, batch):
    from dlearner.batch import shard_batch, validate_batch

    learner = make_learner(cartpole)
    (first, layout), _ = shard_batch(validate_batch(batch, learner.batch_specs()), 2)
    with pytest.raises(ValueError, match="collective"):
        learner.update(first, shard=layout)


def test_the_extension_points_are_marked_and_the_mark_costs_nothing():
    from dlearner.learner import Learner, TorchLearner, override_point

    def hook(self):
        return 1

    assert override_point(hook) is hook and hook.is_override_point
    marked = {name for name in dir(TorchLearner) if getattr(getattr(TorchLearner, name), "is_override_point", False)}
    assert marked == {
        "build",
        "configure_optimizers_for_module",
        "get_parameters",
        "before_gradient_based_update",
        "after_gradient_based_update",
        "log_step_metrics",
        "compute_loss_for_module",
        "compute_gradients",
        "postprocess_gradients",
        "postprocess_gradients_for_module",
        "apply_gradients",
        "get_learner_state",
        "set_learner_state",
        "_check_learner_state",
    }
    assert not getattr(Learner.update, "is_override_point", False)  # the machinery is not an extension point


def test_the_learner_knows_nothing_about_dask():
    import subprocess
    import sys

    code = (
        "import sys, dlearner.learner; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed') or m.startswith('dlearner.backends')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
